"""Sequential calibration engine shared by every data-aware method (GPTQ, AWQ, SparseGPT, ...).

The model is run block by block over the calibration windows. For each block:

1. the block's inputs ``X`` (all windows, ``(batches, batch_size, T, D)``) are fed through the
   *original* block in one jitted ``lax.scan`` over the batches, accumulating per-linear-input
   statistics (:class:`LayerStats`: the Hessian proxy ``X^T X``, per-channel sums of ``x^2`` and
   ``|x|``, the token count) inside the same program, so captured activations never leave it;
   only one triangle of each ``X^T X`` is multiplied (tiles of 256 inputs), then mirrored;
   each batch runs as micro-steps of about :data:`MICRO_ROWS` tokens per device (an inner
   scan), so the pass's temporaries do not grow with ``batch_size``;
2. the transform's ``update`` sees only this block's parameters (every other leaf hidden), with
   ``stats`` keyed by parameter path, and its rewrite is kept;
3. the next block's inputs are the *compressed* block's outputs (``mode="sequential"``, the GPTQ
   reference's default) or the original block's outputs (``mode="original"``); the last
   block's outputs feed nothing, so its propagation pass is skipped.

The model is any :class:`compressjax.blocks.BlockModel` (an NNX
:class:`compressjax.model.Llama` is adapted automatically); its weights may be lazily loaded
(:func:`compressjax.io.open_model`): a block is read when the engine reaches it and its dense
weights are dropped once it is compressed, so peak memory is about one dense block, the
compressed blocks so far and two copies of ``X`` -- not the model.

**Data parallel**: with ``mesh``, the windows of every batch are split over the mesh axes
``data_axis`` (all axes by default): the block forward passes run on all devices, the statistics
are summed across them by the compiled program (XLA all-reduce), and the solvers run on the
summed statistics. **Solvers split over the mesh** (``shard_solvers=True``, the default with a
mesh): each layer's :class:`LayerStats` carries ``columns``, a
:class:`~compressjax.quantize.obs_core.ColumnSplit` of the layer's output columns over all mesh
axes (when they divide ``N``); the transforms that can use it (GPTQ, SparseGPT, E8P/RVQ, SpQR,
OWQ) solve with
``W``'s columns split over the devices (``jax.shard_map``, the Hessian replicated) and return
leaves whose codes, scales, values and masks stay split ``P(None, axes)``; the other transforms
ignore it (GPTVQ and AQLM: their codebooks are shared by all output columns). Tested on one
process with 8 simulated CPU devices (``tests/test_engine_sharded.py``,
``tests/test_mesh_solvers.py``, ``tests/test_mesh_solvers_more.py``). With several processes (``jax.distributed``; on CPU with
``jax_cpu_collectives_implementation="gloo"``) every process passes the same windows and a mesh
over all processes' devices, feeds its own devices' slices (:meth:`_Placement.put`) and ends with
the same compressed model, whose split leaves then hold only this process's columns (gather
with ``jax.experimental.multihost_utils.process_allgather``, or save them from every process
with :func:`compressjax.checkpoint.save`, which writes each process's shards without
gathering; ``tests/test_engine_distributed.py``: two processes on localhost).
On a TPU pod or a multi-GPU host: call ``jax.distributed.initialize()`` in every process, build
the mesh from ``jax.devices()`` and call :func:`run_sequential` with the same arguments everywhere.

**Block fine-tuning** (``block_finetune``, any method): after a block is compressed, the
continuous children of its compressed leaves (and optionally its norms) are tuned with Adam so
that its outputs match the *uncompressed* block's outputs on the same inputs
(:mod:`compressjax.finetune.block`, AQLM's recipe); the tuned block is what the next block sees,
what is saved for resume and what is returned. It keeps the uncompressed outputs of the block
as targets: one more copy of ``X`` in memory.

**Resume**: with ``resume_dir`` every finished block is written once, as its own small
checkpoint (``blocks/<i>``: the compressed block), and ``latest`` records the next block's
inputs and the transform state, atomically. A killed run restarted with the same arguments
continues from the last written block and gives the same result as an uninterrupted run.
The resume point holds the next block's inputs as a host array in one process (also on a
mesh); with several processes every process calls :func:`compressjax.checkpoint.save`, which
writes each process's windows and each process's columns of the split compressed leaves
without gathering them. On resume every process reads the inputs and the finished blocks in
full (the finished blocks then come back whole in every process, not split over the mesh).

References:
  Frantar et al. 2022, GPTQ (sequential block-by-block calibration);
  Sun et al. 2023, Wanda (input norms); Lin et al. 2023, AWQ (mean activation magnitudes).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from compressjax import checkpoint
from compressjax import checkpoint_stream
from compressjax import engine_profile
from compressjax import finetune
from compressjax import formats
from compressjax import host_memory
from compressjax.blocks import BlockModel, as_block_model, nest, unflatten
from compressjax.quantize import obs_core
from compressjax.transforms.base import Transform, _UNSELECTED, _map, plan
from compressjax.transforms.selection import leaves_with_paths
from compressjax.engine_profile import EngineProfile, obs_solver_flops

__all__ = ["EngineProfile", "LayerStats", "block_stats", "gram", "obs_solver_flops",
           "run_sequential"]

_TILE = 256  # inputs per tile of the one-triangle X^T X


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerStats:
  """Statistics of one linear layer's input ``x`` (rows are tokens), accumulated over calibration.

  Invariants: ``hessian`` is ``(K, K)`` float32 ``sum_t x_t x_t^T`` (the GPTQ Hessian is
  ``2 * hessian / n``), exactly symmetric; ``sq_sum`` and ``abs_sum`` are ``(K,)`` float32 sums
  of ``x^2`` and ``|x|`` over tokens (Wanda's norm is ``sqrt(sq_sum)``; AWQ's activation scale is
  ``abs_sum / n``); ``n`` is the float32 token count. ``columns`` (static) is where a solver
  may split the layer's output columns (:class:`~compressjax.quantize.obs_core.ColumnSplit`,
  set by :func:`run_sequential` on a mesh), or ``None``: one device.
  """

  hessian: jax.Array
  sq_sum: jax.Array
  abs_sum: jax.Array
  n: jax.Array
  columns: Any = dataclasses.field(default=None, metadata=dict(static=True))

  @classmethod
  def zeros(cls, k: int) -> "LayerStats":
    return cls(jnp.zeros((k, k), jnp.float32), jnp.zeros((k,), jnp.float32),
               jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32))

  def add(self, x: jax.Array, weight: jax.Array | None = None) -> "LayerStats":
    """Adds the rows of ``x`` (``(..., K)``); ``weight`` (0/1 per row) drops padding rows."""
    xf = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if weight is not None:
      xf = xf * weight.reshape(-1, 1).astype(jnp.float32)
    n = xf.shape[0] if weight is None else jnp.sum(weight.astype(jnp.float32))
    return LayerStats(self.hessian + gram(xf), self.sq_sum + jnp.sum(xf * xf, 0),
                      self.abs_sum + jnp.sum(jnp.abs(xf), 0), self.n + n, self.columns)

  def gptq_hessian(self) -> jax.Array:
    """``2 X^T X / n``, as the GPTQ reference accumulates it."""
    return 2.0 * self.hessian / jnp.maximum(self.n, 1.0)


def _tiles(k: int, tile: int) -> list[int]:
  return list(range(0, k, tile)) + [k]


def _gram_upper(xf: jax.Array, tile: int = _TILE) -> jax.Array:
  """``X^T X`` on and above the diagonal tiles (zeros below): ``(nt + 1) / 2nt`` of the work.
  Accumulated in float32 whatever ``xf``'s dtype (bfloat16 products are exact in float32)."""
  k = xf.shape[1]
  if k < 2 * tile:
    return _mm32(xf.T, xf)
  b = _tiles(k, tile)
  rows = [jnp.pad(_mm32(xf[:, a:e].T, xf[:, a:]), ((0, 0), (a, 0))) for a, e in zip(b[:-1], b[1:])]
  return jnp.concatenate(rows, axis=0)


def _mm32(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _gram_row_blocks(xf: jax.Array, tile: int = _TILE) -> tuple[jax.Array, ...]:
  """The tile rows of :func:`_gram_upper` (row ``i``: ``(tile, K - i * tile)``, from its
  diagonal on), unpadded, for a carry that adds them batch after batch.

  The form the bfloat16 passes use: XLA CPU multiplies these row-major bfloat16 operands on its
  fast bfloat16 path (AMX here), while :func:`_gram_upper`'s transposed-operand form falls to a
  slower one (~2x at K=576, 1.35x at K=1536 in a 4-batch scan, 2-core Xeon); for float32 the
  padded form is the faster of the two (1.2-1.3x), so float32 keeps it.
  """
  k = xf.shape[1]
  if k < 2 * tile:
    return (_mm32(xf.T, xf),)
  xt = xf.T
  b = _tiles(k, tile)
  return tuple(_mm32(xt[a:e], xf[:, a:]) for a, e in zip(b[:-1], b[1:]))


def _assemble_upper(rows: Sequence[jax.Array], k: int) -> jax.Array:
  """The ``(K, K)`` upper-tile matrix of :func:`_gram_row_blocks`' rows."""
  if len(rows) == 1:
    return rows[0]
  return jnp.concatenate([jnp.pad(r, ((0, 0), (k - r.shape[1], 0))) for r in rows], axis=0)


def _mirror(upper: jax.Array, tile: int = _TILE) -> jax.Array:
  """The symmetric matrix whose diagonal tiles and upper part are ``upper``'s."""
  k = upper.shape[0]
  if k < 2 * tile:
    return upper
  blk = jnp.arange(k) // tile
  return jnp.where(blk[:, None] > blk[None, :], upper.T, upper)


def gram(xf: jax.Array, tile: int = _TILE) -> jax.Array:
  """``X^T X`` of ``(rows, K)``, computing one triangle of ``tile``-wide tiles and mirroring."""
  return _mirror(_gram_upper(xf, tile), tile)


def block_stats(model: BlockModel, block: dict[str, Any], xs: jax.Array, weights=None, *,
                keep_outputs: bool = False):
  """Runs one block over all batches ``xs`` ``(nb, bs, T, D)`` in one jitted scan.

  Returns ``(stats, outputs)``: ``stats`` maps each capture name to its :class:`LayerStats`
  (rows weighted by ``weights`` ``(nb, bs)``, 0 for padding windows); ``outputs`` is the
  block's outputs ``(nb, bs, T, D)`` with ``keep_outputs``, else ``None`` (then the compiled
  program drops the work only the output needs).
  """
  return _Passes(model).stats(keep_outputs)(block, xs, weights)


class _Passes:
  """The jitted programs of one engine run (compiled once, reused by every block).

  With ``matmul_dtype`` (the model already built with it, :meth:`BlockModel.with_matmul_dtype`)
  each linear input is rounded to it before its ``X^T X`` and sums, as the layer multiplies it,
  and the forward pass multiplies the compressed block's dequantized kernels (dense for the
  block's program) so they take the same reduced-precision matmuls.
  """

  def __init__(self, model: BlockModel, matmul_dtype: str | None = None, data_size: int = 1):
    self.model = model
    self.matmul_dtype = matmul_dtype
    self.data_size = data_size
    self._stats = {}

    def prepare(block):  # once per pass, outside the loop over batches
      if matmul_dtype is not None:  # block: {path: leaf}
        block = {p: formats.materialize(v) for p, v in block.items()}
      return block

    def one_batch(block, x):
      d, m = self._micro(x.shape)
      outs = jax.lax.map(lambda xm: model.apply_block(block, xm, None), _micro_split(x, d, m))
      return _micro_join(outs, d, m).astype(x.dtype)

    def forward(block, xs):
      block = prepare(block)

      def body(i, xs):  # batch i is read, then overwritten: XLA updates the buffer in place
        y = one_batch(block, jax.lax.dynamic_index_in_dim(xs, i, 0, keepdims=False))
        return jax.lax.dynamic_update_index_in_dim(xs, y, i, 0)
      return jax.lax.fori_loop(0, xs.shape[0], body, xs)

    #: ``forward(block, xs)``: the block applied to every batch of ``xs`` ``(nb, bs, T, D)``,
    #: consuming ``xs``: its buffer is donated and overwritten batch by batch, so the pass holds
    #: one copy of the activations, not two (the compiled program's output aliases its input,
    #: with no temporary of its size: ``tests/test_calibration.py``). Pass a copy to keep ``xs``.
    self.forward = jax.jit(forward, donate_argnums=1)
    self.embed = jax.jit(lambda outside, toks: jax.lax.map(
        lambda tk: model.embed(outside, tk), toks))

  def stats(self, keep_outputs: bool):
    if keep_outputs not in self._stats:
      self._stats[keep_outputs] = jax.jit(functools.partial(self._run_stats,
                                                            keep_outputs=keep_outputs))
    return self._stats[keep_outputs]

  def _micro(self, batch_shape) -> tuple[int, int]:
    """``(d, m)``: a batch of ``bs`` windows (``d`` data-parallel devices) runs as micro-steps
    of ``m`` windows per device (:func:`micro_windows`)."""
    bs, t = batch_shape[0], batch_shape[1]  # bs: a multiple of data_size (run_sequential)
    return self.data_size, micro_windows(bs // self.data_size, t)

  def micro_steps(self, xs_shape) -> int:
    """Micro-steps per batch of ``xs`` ``(nb, bs, T, ...)`` (the profile's FLOPs: XLA's cost
    analysis counts a scan body once, so one batch's program counts one micro-step)."""
    d, m = self._micro(xs_shape[1:])
    return xs_shape[1] // (d * m)

  def _run_stats(self, block, xs, weights, *, keep_outputs):
    model = self.model

    def capture_shapes(block, x):
      cap: dict[str, jax.Array] = {}
      model.apply_block(block, x, cap)
      return cap

    caps = jax.eval_shape(capture_shapes, block, xs[0])
    md = self.matmul_dtype
    # carry per capture: (upper X^T X (with matmul_dtype: its tile rows), sum x^2, sum |x|, rows)
    init = {k: (jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
                    _gram_row_blocks, jax.ShapeDtypeStruct((1, v.shape[-1]), md)))
                if md is not None else jnp.zeros((v.shape[-1],) * 2, jnp.float32),
                jnp.zeros((v.shape[-1],)), jnp.zeros((v.shape[-1],)), jnp.zeros(()))
            for k, v in caps.items()}
    t = xs.shape[2]
    d, m = self._micro(xs.shape[1:])

    def micro_body(carry, inp):
      x, w = inp
      cap: dict[str, jax.Array] = {}
      out = model.apply_block(block, x, cap)
      rw = None if w is None else jnp.repeat(w, t)[:, None]
      new = {}
      for k, (up, sq, ab, n) in carry.items():
        xf = cap[k].reshape(-1, cap[k].shape[-1]).astype(md or jnp.float32)
        if rw is not None:
          xf = xf * rw.astype(xf.dtype)  # 0/1 row weights: exact in any dtype
        up = (tuple(map(jnp.add, up, _gram_row_blocks(xf))) if md is not None else
              up + _gram_upper(xf))
        xf = xf.astype(jnp.float32)
        rows = xf.shape[0] if rw is None else jnp.sum(rw)
        new[k] = (up, sq + jnp.sum(xf * xf, 0), ab + jnp.sum(jnp.abs(xf), 0), n + rows)
      return new, (out if keep_outputs else None)

    def body(carry, inp):
      x, w = inp
      ws = None if w is None else _micro_split(w, d, m)
      carry, outs = jax.lax.scan(micro_body, carry, (_micro_split(x, d, m), ws))
      return carry, (_micro_join(outs, d, m) if keep_outputs else None)

    carry, outs = jax.lax.scan(body, init, (xs, weights))
    if md is not None:
      carry = {k: (_assemble_upper(up, sq.shape[0]), sq, ab, n)
               for k, (up, sq, ab, n) in carry.items()}
    stats = {k: LayerStats(_mirror(up), sq, ab, n) for k, (up, sq, ab, n) in carry.items()}
    return stats, outs


#: Rows (tokens) per device that one micro-step of the block passes aims for: enough for full
#: matmul speed, few enough that the step's activations stay small (a 1.28B block at 8 x 512
#: windows per step needed 1.27 GB of XLA temporaries in the statistics pass, 0.44 GB at 2).
MICRO_ROWS = 1024


def micro_windows(per_device: int, seq_len: int) -> int:
  """Windows per device in one micro-step of a batch with ``per_device`` windows per device:
  the largest divisor of ``per_device`` with at most :data:`MICRO_ROWS` rows (at least 1).

  The block passes run each scan step's batch as such micro-steps (an inner scan), so their
  temporaries are those of ``MICRO_ROWS`` tokens per device whatever ``batch_size`` is;
  the statistics are the same sums, added in a different order (float32 rounding only)."""
  target = max(1, MICRO_ROWS // max(seq_len, 1))
  return max(c for c in range(1, per_device + 1) if per_device % c == 0 and c <= target)


def _micro_split(a: jax.Array, d: int, m: int) -> jax.Array:
  """``(bs, ...) -> (bs / (d m), d m, ...)``: micro-step ``j`` takes windows ``j m .. j m + m``
  of each device's contiguous ``bs / d`` (a batch split over ``d`` devices stays split the same
  way: each micro-step has ``m`` windows on every device)."""
  bs = a.shape[0]
  s = bs // (d * m)
  a = jnp.swapaxes(a.reshape((d, s, m) + a.shape[1:]), 0, 1)
  return a.reshape((s, d * m) + a.shape[3:])


def _micro_join(a: jax.Array, d: int, m: int) -> jax.Array:
  """The inverse of :func:`_micro_split`."""
  s = a.shape[0]
  a = jnp.swapaxes(a.reshape((s, d, m) + a.shape[2:]), 0, 1)
  return a.reshape((s * d * m,) + a.shape[3:])


def _fingerprint(windows: np.ndarray, mode: str, n_blocks: int, extra: str) -> str:
  h = hashlib.sha256(np.ascontiguousarray(windows).tobytes())
  h.update(f"{mode}|{n_blocks}|{extra}".encode())
  return h.hexdigest()[:16]


class _Placement:
  """Where the engine's arrays live: one device, or a mesh (data-parallel over windows)."""

  def __init__(self, mesh, data_axis):
    self.mesh = mesh
    if mesh is None:
      self.data_size = 1
      return
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      # The engine's programs are sharded by their inputs (Auto axes of the same devices).
      mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                               axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
      self.mesh = mesh
    axes = tuple(mesh.axis_names) if data_axis is None else (
        (data_axis,) if isinstance(data_axis, str) else tuple(data_axis))
    for a in axes:
      if a not in mesh.axis_names:
        raise ValueError(f"data_axis {a!r} is not an axis of the mesh {mesh.axis_names}")
    self.axes = axes
    self.data_size = int(np.prod([mesh.shape[a] for a in axes]))

  def batches(self, shape) -> Any:
    """Sharding of an ``(nb, bs, ...)`` array: windows of a batch split over the data axes."""
    if self.mesh is None:
      return None
    return NamedSharding(self.mesh, P(None, self.axes, *([None] * (len(shape) - 2))))

  def put(self, a, sharding=None):
    """A global array from host data every process holds in full."""
    if self.mesh is None:
      return jnp.asarray(a)
    sharding = sharding or NamedSharding(self.mesh, P())
    if isinstance(a, jax.Array) and a.is_fully_addressable and jax.process_count() == 1:
      return jax.device_put(a, sharding)
    if isinstance(a, jax.Array) and not a.is_fully_addressable:  # split over processes
      return jax.jit(lambda v: v, out_shardings=sharding)(a)
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  def put_tree(self, tree):
    return jax.tree.map(self.put, tree)

  def local(self, tree):
    """Replicated results as ordinary arrays of this process (for the solvers)."""
    if self.mesh is None:
      return tree
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a.addressable_data(0))), tree)

  def columns(self, n: int, enabled: bool):
    """The split of ``n`` output columns over all mesh axes for the solvers, or ``None``."""
    if self.mesh is None or not enabled:
      return None
    split = obs_core.ColumnSplit(self.mesh, tuple(self.mesh.axis_names))
    return split if split.size > 1 and n % split.size == 0 else None

  def resume_inputs(self, x):
    """The next block's inputs as the resume point stores them: a host array, or with several
    processes the global array itself (each process saves its own windows, never gathered)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    return np.asarray(x)


def _check_scope(transform: Transform) -> None:
  scope = getattr(transform, "scope", "block")
  if scope == "global":
    raise ValueError(
        "the recipe holds a step with a global scope (magnitude(scope='global') or "
        "svd(allocate=True): one threshold or rank budget across all layers), but the "
        "calibration engine shows a transform one block at a time, where it would silently "
        "become per-block. Run that step data-free before calibration (transforms.apply), or use "
        "its per-layer form")


def run_sequential(model, windows: np.ndarray, transform: Transform, *, batch_size: int = 8,
                   mode: str = "sequential", resume_dir: str | None = None,
                   recipe_key: str = "", progress: bool = True, mesh=None,
                   data_axis: str | Sequence[str] | None = None,
                   block_finetune: finetune.BlockFinetune | None = None,
                   shard_solvers: bool = True,
                   profile: EngineProfile | None = None,
                   output: checkpoint_stream.StreamWriter | None = None,
                   matmul_dtype: str | None = None) -> tuple[Any, Any]:
  """Compresses ``model`` block by block with calibration statistics.

  Args:
    model: a :class:`compressjax.model.Llama` or any :class:`compressjax.blocks.BlockModel`
      (e.g. :class:`compressjax.blocks.LlamaBlocks` over lazily loaded weights).
    windows: int ``(n, T)`` calibration windows.
    transform: the compression transform; its ``update`` receives ``stats`` mapping each of the
      current block's linear kernel paths (``layers/{i}/attn/q_proj/kernel``...) to the
      :class:`LayerStats` of that layer's input.
    batch_size: windows per step of the block scan (a multiple of the data axes' size with a
      mesh); a short last batch is padded with windows that carry zero weight. Each step runs
      as micro-steps of about :data:`MICRO_ROWS` tokens per device, so memory does not grow
      with it.
    mode: ``"sequential"`` (next block sees the compressed block's outputs) or ``"original"``.
    resume_dir: where to write each finished block and resume from; ``None`` disables it.
    recipe_key: a string identifying the recipe (part of the resume fingerprint, so a resume dir
      is never reused by a different recipe or data).
    progress: show a progress bar.
    mesh: a ``jax.sharding.Mesh`` to run the block passes data-parallel on (Auto or Explicit
      axes); ``None``: the default device.
    data_axis: the mesh axis (or axes) the windows are split over; default all.
    block_finetune: tune each compressed block's continuous parameters to the uncompressed
      block's outputs (:class:`compressjax.finetune.BlockFinetune`); ``None``: off.
    shard_solvers: with a mesh, let the solvers that can (GPTQ, SparseGPT, E8P/RVQ, SpQR, OWQ)
      split each layer's output columns over all mesh axes (``LayerStats.columns``); their
      compressed leaves then
      stay split ``P(None, axes)`` (with several processes: split over the processes too).
      ``False``: every device solves every layer whole.
    profile: an :class:`EngineProfile` to fill with the wall seconds, compile seconds and
      FLOPs of each phase, per block and in total (:mod:`compressjax.engine_profile`); each
      phase then ends with a sync. ``None`` (default): no timers, no extra syncs. The results
      are the same either way.
    output: a :class:`compressjax.checkpoint_stream.StreamWriter`: each finished block is
      written to it as soon as it is done and dropped from memory (the engine then holds no
      finished block: peak memory does not grow with depth); at the end the parameters outside
      the blocks are written and the writer is finalized (every block's checksums checked,
      manifest complete); the caller commits it (:meth:`~compressjax.checkpoint_stream.
      StreamWriter.commit`) or aborts it. With several processes every process passes a
      writer of the same path (each writes its shards of every block; module docstring of
      :mod:`compressjax.checkpoint_stream`). With ``resume_dir`` the blocks that the resume
      directory writes are hard-linked into the output, not written twice; on resume the
      finished blocks are linked, never read into memory. ``None`` (default): the finished
      blocks are kept and returned.
    matmul_dtype: ``None`` (default: the model's own matmuls, float32 for a float32 model) or
      ``"bfloat16"``: the block passes multiply bfloat16-rounded operands with float32
      accumulation (linear layers, attention, and each ``X^T X``; norms, RoPE, softmax and the
      statistics' sums stay float32), as GPU runs of the GPTQ reference do in half precision.
      Faster where the hardware has bfloat16 matrix units (AMX on recent Xeons, tensor cores,
      TPU MXUs): measured on a 2-core AMX Xeon, the matmuls 4-5x, the propagation pass 2.2x,
      the statistics pass ~1.5x, a whole GPTQ run ~1.15x (README "bfloat16 matmuls in the
      engine"); the solvers still see the float32 weights and float32 statistics. The model
      must offer it (:meth:`~compressjax.blocks.BlockModel.with_matmul_dtype`;
      :class:`compressjax.model.Llama` does).

  Returns:
    ``(new_params, transform_state)``: the whole parameter tree with the compressed blocks.
    Parameters outside the blocks are passed through the transform last, with ``stats=None``
    (with ``output`` one leaf at a time).
    With ``output`` every leaf is an abstract placeholder (``jax.ShapeDtypeStruct``
    children, the compressed leaves' structure and static metadata kept); the written
    checkpoint holds their values (``output.restore()``).

  Raises:
    ValueError: bad ``mode``/``windows``/``batch_size``, a recipe step with a global scope, a
      ``block_finetune`` whose selectors match nothing the recipe compresses, or a
      ``resume_dir`` of another run.
  """
  with engine_profile.recorder(profile) as prof:
    return _run_sequential(model, windows, transform, prof, batch_size=batch_size, mode=mode,
                           resume_dir=resume_dir, recipe_key=recipe_key, progress=progress,
                           mesh=mesh, data_axis=data_axis, block_finetune=block_finetune,
                           shard_solvers=shard_solvers, output=output, matmul_dtype=matmul_dtype)


def _run_sequential(model, windows, transform, prof, *, batch_size, mode, resume_dir, recipe_key,
                    progress, mesh, data_axis, block_finetune, shard_solvers, output=None,
                    matmul_dtype=None):
  if mode not in ("sequential", "original"):
    raise ValueError(f"mode must be 'sequential' or 'original', got {mode!r}")
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[0] < 1:
    raise ValueError(f"windows must be (n >= 1, seq_len), got shape {windows.shape}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  _check_scope(transform)
  bm = as_block_model(model)
  if matmul_dtype is not None:
    from compressjax.model import MATMUL_DTYPES  # pylint: disable=g-import-not-at-top
    if matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
    bm = bm.with_matmul_dtype(matmul_dtype)
    recipe_key = f"{recipe_key}|matmul_dtype={matmul_dtype}"
  place = _Placement(mesh, data_axis)
  if batch_size % place.data_size:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the data axes' size "
                     f"{place.data_size} (mesh {dict(place.mesh.shape)})")
  if not isinstance(shard_solvers, bool):
    raise ValueError(f"shard_solvers must be a bool, got {shard_solvers!r}")
  if output is not None and not isinstance(output, checkpoint_stream.StreamWriter):
    raise ValueError(f"output must be a compressjax.checkpoint_stream.StreamWriter or None, got "
                     f"{type(output).__name__}")
  if block_finetune is not None and not isinstance(block_finetune, finetune.BlockFinetune):
    raise ValueError(f"block_finetune must be a compressjax.finetune.BlockFinetune or None, got "
                     f"{type(block_finetune).__name__}")
  abstract = bm.abstract_params()
  state = transform.init(abstract)
  tuner = None
  if block_finetune is not None:  # selectors that match nothing fail here, before any work
    planned = _flatten(plan(transform, abstract, state))
    block_finetune.check({p: v for p, v in planned.items()
                          if any(p.startswith(bm.block_prefix(i)) for i in range(bm.num_blocks))})
    tuner = finetune.BlockTuner(bm, block_finetune)
    recipe_key = f"{recipe_key}|block_finetune({block_finetune.key()})"
  n, t = windows.shape
  bs = batch_size if place.mesh is not None else min(batch_size, n)
  nb = -(-n // bs)
  pad = nb * bs - n
  toks = np.concatenate([windows, np.repeat(windows[:1], pad, 0)]).reshape(nb, bs, t)
  weights = None
  if pad:
    weights = place.put(np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
                        .reshape(nb, bs), place.batches((nb, bs)))
  fp = _fingerprint(windows, mode, bm.num_blocks, recipe_key)
  passes = _Passes(bm, matmul_dtype, place.data_size)

  # compressed block leaves by full path (with ``output``: their abstract placeholders)
  done: dict[str, Any] = {}
  start, x = 0, None
  if resume_dir:
    start, x, state, done = prof.run("resume", _try_resume, resume_dir, fp, state, abstract, bm,
                                     output)
  xshape = (nb, bs, t)
  if x is None:
    outside = prof.run("transfer", place.put_tree, prof.run("read", bm.embed_params))
    toks_d = prof.run("transfer", place.put, toks, place.batches(xshape))
    x = prof.run("embed", passes.embed, outside, toks_d)
    prof.pass_flops("embed", passes.embed, (outside, toks_d), (1,), nb)
    del outside, toks_d
  elif start < bm.num_blocks:
    x = prof.run("transfer", place.put, x, place.batches(x.shape))

  bar = tqdm(range(start, bm.num_blocks), desc="calibrate", disable=not progress, unit="block",
             initial=start, total=bm.num_blocks)
  for i in bar:
    prof.block_start(i)
    prefix = bm.block_prefix(i)
    dense = prof.run("read", bm.block_params, i)
    keep = mode == "original" or tuner is not None  # fine-tuning targets the dense outputs
    dense_d = prof.run("transfer", place.put_tree, dense)
    stats_by_cap, orig_out = prof.run("stats", passes.stats(keep), dense_d, x, weights)
    prof.pass_flops("stats", passes.stats(keep), (dense_d, x, weights), (1, 2),
                    nb * passes.micro_steps(x.shape))
    del dense_d
    stats_by_cap = prof.run("transfer", place.local, stats_by_cap)
    stats = {prefix + k: stats_by_cap[src] for k, src in bm.linear_inputs.items()}
    stats = {p: dataclasses.replace(
        st, columns=place.columns(_out_dim(dense.get(p[len(prefix):])), shard_solvers))
             for p, st in stats.items()}
    view = _map(lambda p, a: dense[p[len(prefix):]] if p.startswith(prefix) else _UNSELECTED,
                abstract)
    if prof.solves_flops:
      prof.add_flops("solver", sum(prof.solver_flops(st.hessian.shape[0],
                                                     _out_dim(dense.get(p[len(prefix):])))
                                   for p, st in stats.items()))
    del dense
    new_view, state = prof.run("solver", transform.update, view, state, stats)
    del view, stats, stats_by_cap
    block = {p[len(prefix):]: v for p, v in leaves_with_paths(new_view) if p.startswith(prefix)}
    del new_view
    if tuner is not None:
      block, (before, after) = prof.run("finetune", tuner.tune, i, prefix,
                                        prof.run("transfer", place.put_tree, block), x, orig_out,
                                        n, put=place.put)
      block = prof.run("transfer", place.local, block)
      bar.set_postfix(ft_mse=f"{before:.3g}->{after:.3g}")
    if mode == "original":
      x = orig_out
    elif i + 1 < bm.num_blocks:
      block_d = prof.run("transfer", place.put_tree, block)
      x = prof.run("forward", passes.forward, block_d, x)
      prof.pass_flops("forward", passes.forward, (block_d, x), (1,),
                      nb * passes.micro_steps(x.shape))
      del block_d
    else:  # the last block's outputs feed nothing: its propagation pass is not run
      x = None
    del orig_out
    if x is not None:
      x = jax.block_until_ready(x)
    if output is None:
      done.update({prefix + p: v for p, v in block.items()})
    else:
      done.update({prefix + p: _placeholder(v) for p, v in block.items()})
    if resume_dir:
      prof.run("save", lambda: _save_resume(
          resume_dir, fp, i, _NO_INPUTS if x is None else place.resume_inputs(x), block, state))
    if output is not None:  # written (or linked from the resume directory), then dropped
      prof.run("save", lambda: output.add_block(
          i, prefix, None if resume_dir else block,
          source=_block_dir(resume_dir, i) if resume_dir else None))
    del block
    host_memory.release_free_memory()  # the block's freed host copies and writes (glibc keeps them)
    prof.block_end()
  # Anything the transform selected outside the blocks (e.g. an untied head) is data-free.
  new_params, state = prof.run("outside", _finish, bm, abstract, transform, state, done, output)
  if output is not None:
    prof.run("save", output.finalize, abstract)
    host_memory.release_free_memory()  # the parts read back to check them
  return new_params, state


def _finish(bm: BlockModel, abstract, transform: Transform, state, done: dict[str, Any],
            output=None):
  """The data-free update of the parameters outside the blocks; the whole new tree. With
  ``output`` one leaf at a time: read, updated, written and dropped (a placeholder in the
  tree), so only one of them is in memory."""
  paths = [p for p, _ in leaves_with_paths(abstract) if p not in done]
  flat = dict(done)
  for group in ([[p] for p in paths] if output is not None else [paths]):
    outside = bm.outside_params_at(group)
    rest_view = _map(lambda p, a, o=outside: o.get(p, _UNSELECTED), abstract)
    new_rest, state = transform.update(rest_view, state, None)
    rest = {p: v for p, v in leaves_with_paths(new_rest) if p in outside}
    del outside, rest_view, new_rest
    if output is not None:
      output.add_leaves(rest)
      rest = {p: _placeholder(v) for p, v in rest.items()}
      host_memory.release_free_memory()
    flat.update(rest)
    del rest
  return nest(abstract, flat), state


#: The resume point's inputs after the last block (nothing reads them: the run is complete).
_NO_INPUTS = np.zeros((0,), np.float32)


def _placeholder(leaf):
  """``leaf`` with every array replaced by its ``jax.ShapeDtypeStruct`` (sharding kept)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=a.sharding if checkpoint._is_sharded(a) else None),  # pylint: disable=protected-access
                      leaf)


def _block_dir(resume_dir: str, i: int) -> str:
  return os.path.join(resume_dir, "blocks", f"{i:05d}")


def _out_dim(w) -> int:
  shape = getattr(w, "shape", ())
  return int(shape[1]) if len(shape) == 2 else 0


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
  return {prefix + p: v for p, v in leaves_with_paths(tree)}


def _save_resume(resume_dir: str, fp: str, i: int, x, block: dict[str, Any],
                 state) -> None:
  """Writes finished block ``i`` (``blocks/<i>``, once) and then the resume point ``latest``
  (next block's inputs -- empty after the last block --, transform state,
  ``next_block = i + 1``), each atomically, as data only (the state's structure in the metadata,
  its arrays beside)."""
  spec, state_arrays = checkpoint.encode_pytree(state, where="calibration transform state")
  os.makedirs(os.path.join(resume_dir, "blocks"), exist_ok=True)
  checkpoint.save(_block_dir(resume_dir, i), unflatten(block),
                  metadata={"fingerprint": fp, "block": i}, overwrite=True)
  checkpoint.save(os.path.join(resume_dir, "latest"), {"x": x, "state": state_arrays},
                  metadata={"fingerprint": fp, "next_block": i + 1, "state": spec},
                  overwrite=True)


def _try_resume(resume_dir: str, fp: str, state, abstract, bm: BlockModel, output=None):
  """``(next block, its inputs, transform state, finished blocks' leaves)`` of the resume
  point (``(0, None, state, {})`` without one). With ``output`` the finished blocks are
  hard-linked into it (checked against their checksums when it is finalized), never read: the
  leaves returned are their abstract placeholders."""
  path = os.path.join(resume_dir, "latest")
  if not os.path.isdir(path):
    return 0, None, state, {}
  saved, meta = checkpoint.restore(path)
  if meta.get("fingerprint") != fp:
    raise checkpoint.CheckpointError(
        f"resume_dir {resume_dir!r} holds a run with other calibration data, mode or recipe "
        f"(fingerprint {meta.get('fingerprint')} != {fp}); use another resume_dir or delete it")
  if not isinstance(meta.get("next_block"), int) or "state" not in meta or "x" not in saved:
    raise checkpoint.CheckpointError(f"resume_dir {resume_dir!r}: {path!r} is not a calibration "
                                     "resume point (no next_block/state/x in it)")
  saved_state = checkpoint.decode_pytree(
      meta["state"], saved.get("state", {}),
      where=f"resume_dir {resume_dir!r}: transform state in {path!r}")
  done: dict[str, Any] = {}
  for i in range(meta["next_block"]):
    bpath = _block_dir(resume_dir, i)
    if not os.path.isdir(bpath):
      raise checkpoint.CheckpointError(f"resume_dir {resume_dir!r}: finished block {i} is "
                                       f"missing ({bpath!r}); delete the directory to restart")
    if output is not None:
      bmanifest = checkpoint.read_manifest(bpath)
      bmeta = bmanifest["metadata"]
    else:
      block, bmeta = checkpoint.restore(bpath)
    if bmeta.get("fingerprint") != fp:
      raise checkpoint.CheckpointError(f"resume_dir {resume_dir!r}: {bpath!r} belongs to "
                                       "another run; delete the directory to restart")
    if output is not None:
      output.add_block(i, bm.block_prefix(i), source=bpath)
      done.update(_flatten(checkpoint_stream.abstract_leaves(bpath, bmanifest),
                           bm.block_prefix(i)))
    else:
      done.update(_flatten(block, bm.block_prefix(i)))
  return int(meta["next_block"]), np.asarray(saved["x"]), saved_state, done
