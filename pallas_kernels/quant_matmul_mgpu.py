"""Pallas Mosaic GPU (Hopper) kernel: activations times packed 2/3/4/8-bit weights, grouped scales.

Dequantize-then-``wgmma``, in the style of JAX's
``pallas/ops/gpu/hopper_mixed_type_matmul_mgpu.py``, computing ``y^T = W^T x^T`` so that the
weight is the 64-row ``A`` operand and the activations (zero-padded to a multiple of 8 rows,
the ``wgmma`` minimum of its ``N`` dimension) are the ``B`` operand. One kernel, parameterized
by the code width ``bits``; every width the stored :class:`~compressjax.formats.QuantizedArray`
holds is read as stored, ``cpw = packing.codes_per_word(bits)`` codes per ``uint32`` word with
**word ``r`` of a column holding codes ``cpw r + p``, ``p < cpw``, in bits ``bits p ..``** (the
bitstream layout for 2, 4 and 8 bits never straddles a word; 3-bit codes are packed 10 per word
since packing layout 2, bits 30-31 zero). So:

* the ``(kw, 64)`` word tile of a pipeline step (``kw`` a power of 2 >= 16: ``tk = cpw kw``
  codes) is copied to shared memory and loaded into registers *through a transposed view*
  (``WGMMA_TRANSPOSED`` layout, then a cheap ``layout_cast`` to ``WGMMA``): the register tile
  is ``(64 outputs, kw words)``, already ``W^T``'s orientation;
* plane ``p`` (``(words >> bits p) & (2**bits - 1)``, centred by ``2**(bits-1)``, one shift
  and one mask: :func:`dequant_plane`) times the step's scale tile is the ``A`` tile ``(64,
  kw)`` in ``bfloat16`` (``float16`` for ``float16`` activations), multiplied by ``wgmma``
  with plane ``p`` of the activations, permuted outside the kernel to ``(cpw, M, K / cpw)``
  (:func:`pallas_kernels._common.plane_major`, cheap: ``x`` is small);
* scales (:func:`step_scale`): one ``(64,)`` row vector per group broadcast over the tile's
  columns; a step holding several groups selects each column's group with 0/1 column masks
  (a tiny constant input, :func:`column_masks`). 2/4/8 bits: ``group % cpw == 0``, so a word
  lies inside one group and every plane shares one scale tile. 3 bits: 10 codes per word and
  groups of e.g. 32, 64 or 128 codes, so a word can straddle two groups (never more when
  ``group >= 10``); the step holds whole words *and* whole groups (``10 kw`` a multiple of
  ``group``: 640 codes for g128, 5 groups) and plane ``p`` picks, per column, the scale of the
  word's first or last group (``select`` on a 0/1 column mask: one select per plane, both
  candidate tiles built once per step);
* asymmetric weights: the kernel multiplies the centred codes; the zero-point term
  ``sum_g rowsum(x_g) (z_g + 2**(bits-1) s_g)`` is a small ``(M, G) @ (G, N)`` product
  outside it.

A ragged last K step (``ceil(K / cpw)`` words not a multiple of ``kw``) and a ragged last
column block (``N`` not a multiple of 64) read past the ends of the words and scales;
Mosaic GPU's TMA copies fill such reads with zeros (``OOBFillMode.ZEROS``, the default) and
clip the stores, and the activations are zero-padded here, so those positions add nothing.

Verified without a GPU (jax 0.10.2): lowering for ``cuda`` to the ``mosaic_gpu`` custom call
(``tests/test_pallas_mgpu_lowering.py``), and on CPU the kernel's arithmetic -- the same
:func:`dequant_plane` / :func:`step_scale` / :func:`column_masks` and step geometry, looped
over steps in ``jax.numpy`` by :func:`emulate` -- against the reference. Not run here: the
kernel itself (jax 0.10.2's Mosaic GPU interpreter rejects its non-trivial BlockSpec windows,
so there is no interpret mode), compiling to SASS and running on a Hopper GPU; correctness and
speed are checked by ``tests/test_pallas_gpu.py`` / ``experiments/gpu_kernels.sh`` when one is
lent. Status: lowers; not yet run on a GPU.

References:
  Frantar et al., "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on Large
  Language Models", arXiv:2408.11743 (dequantize in registers, feed tensor cores);
  JAX ``pallas/ops/gpu/hopper_mixed_type_matmul_mgpu.py`` (dequantize, then ``wgmma``);
  NVIDIA PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate" (``wgmma`` shapes:
  ``M = 64``, ``N`` a multiple of 8 up to 256, ``K = 16`` for 16-bit inputs); the packed
  layouts of :mod:`compressjax.formats.packing` (``pallas_kernels/NOTE_3bit_layout.md``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from compressjax.formats import packing
from compressjax.formats import quantized
from pallas_kernels import _common
from pallas_kernels.quant_matmul_ref import quant_matmul_ref

__all__ = ["BITS", "CONFIG", "MgpuConfig", "Plan", "can_use", "column_masks", "dequant_plane",
           "emulate", "on_hopper", "plan", "quant_matmul_mgpu", "step_codes", "step_scale", "supports"]

#: Code widths the kernel reads.
BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
  """Tile sizes of the Mosaic GPU kernel.

  Attributes:
    block_n: outputs per program (the ``wgmma`` ``M``: 64, one warpgroup).
    block_m: most activation rows per program (the ``wgmma`` ``N``: a multiple of 8, <= 256);
      more rows run as several row blocks.
    block_k: most codes (inputs) per pipeline step of the 2/4/8-bit widths, a power of 2 (a
      step has ``block_k / cpw`` words; at least 16, the 16-bit ``wgmma`` ``K``, so the
      step is at least ``16 cpw`` codes whatever ``block_k`` says).
    max_words_3bit: most words per step of 3-bit codes (a power of 2 >= 16); the step is the
      fewest power-of-2 words whose ``10 kw`` codes hold whole groups, so 3-bit groups need
      ``10 max_words_3bit`` to be a multiple of them (g32..g256 at 128).
    max_groups: most scale groups in one step (each adds a masked term to the scale tile).
    x_stage_bytes: most bytes of one step's activation tile (shared memory; ``block_k`` is
      halved, or for 3 bits the row block, until it fits).
    max_concurrent_steps: pipeline depth (steps whose copies are in flight).
  """

  block_n: int = 64
  block_m: int = 128
  block_k: int = 512
  max_words_3bit: int = 128
  max_groups: int = 16
  x_stage_bytes: int = 65536
  max_concurrent_steps: int = 2


#: The Hopper configuration.
CONFIG = MgpuConfig()


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static geometry of one call: ``bm`` rows per program, ``kw`` words (``tk = cpw kw``
  codes) per step, ``gs`` groups per step (1 when the step lies inside one group),
  ``steps`` K steps, ``straddle`` (3 bits: some word holds codes of two groups),
  ``tile_rows`` (rows of the word tile's shared-memory tiling, 8 or 2: TMA's tiled copies
  need the packed rows ``ceil(K / cpw)`` to be a multiple of it)."""

  bits: int
  bm: int
  kw: int
  tk: int
  gs: int
  steps: int
  straddle: bool
  tile_rows: int


def step_codes(m_block: int, k: int, group: int, config: MgpuConfig = CONFIG,
               bits: int = 4) -> int:
  """Codes per pipeline step ``tk`` of the 2/4/8-bit widths: a power of 2 in ``[16 cpw,
  max(block_k, 16 cpw)]`` whose activation tile ``(m_block, tk)`` fits ``x_stage_bytes``, not
  much above ``K``, and either a multiple or a divisor of ``group`` (so a step holds whole
  groups or lies inside one)."""
  least = 16 * packing.codes_per_word(bits)
  tk = max(config.block_k, least)
  while tk > least and (m_block * tk * 2 > config.x_stage_bytes
                        or tk >= 2 * _common.pow2_at_least(k)
                        or (group % tk and tk % group)):
    tk //= 2
  return tk


def _words_3bit(group: int, config: MgpuConfig) -> int | None:
  """Fewest power-of-2 words (>= 16) whose ``10 kw`` codes hold whole groups, or ``None``."""
  kw = 16
  while kw <= config.max_words_3bit:
    if (10 * kw) % group == 0:
      return kw
    kw *= 2
  return None


def plan(bits: int, rows: int, k: int, group: int, config: MgpuConfig = CONFIG) -> Plan | None:
  """The kernel's geometry for ``rows`` activation rows times a ``(K, N)`` ``bits``-bit weight
  with groups of ``group``, or ``None`` when the kernel does not apply (static ints only)."""
  if bits not in BITS:
    return None
  cpw = packing.codes_per_word(bits)
  bm = min(config.block_m, _common.round_up(max(rows, 1), 8))
  if bits in packing.PER_WORD_BITS:
    kw = _words_3bit(group, config) if group >= cpw else None
    if kw is None:
      return None
    tk = cpw * kw
    while bm > 8 and bm * tk * 2 > config.x_stage_bytes:
      bm = max(8, (bm // 2) // 8 * 8)
    straddle = group % cpw != 0
  else:
    if group % cpw:
      return None
    tk = step_codes(bm, k, group, config, bits)
    kw = tk // cpw
    if group % tk and tk % group:
      return None
    straddle = False
  if bm * tk * 2 > config.x_stage_bytes:
    return None
  gs = max(1, tk // group)
  if gs > config.max_groups:
    return None
  n_words = packing.packed_length(k, bits)
  tile_rows = next((t for t in (8, 2) if n_words % t == 0), None)  # 4: no transfer plan
  if tile_rows is None:  # an odd word count (3 bits, e.g. K = 11008): no tiled TMA view
    return None
  return Plan(bits=bits, bm=bm, kw=kw, tk=tk, gs=gs, steps=pl.cdiv(n_words, kw),
              straddle=straddle, tile_rows=tile_rows)


def supports(x: jax.Array, w: quantized.QuantizedArray, config: MgpuConfig = CONFIG) -> bool:
  """Cheap static check: 2-D 2/3/4/8-bit weight with a :func:`plan` (2/4/8 bits: ``group %
  cpw == 0``, a divisor or multiple of the K step; 3 bits: ``group >= 10`` dividing ``10 kw``
  for a power-of-2 ``kw <= max_words_3bit``), floating ``x``; any ``N`` and ``K``."""
  if not (isinstance(w, quantized.QuantizedArray) and w.bits in BITS
          and len(w.packed.shape) == 2 and jnp.issubdtype(x.dtype, jnp.floating)
          and x.ndim >= 1 and x.shape[-1] == w.shape[0] and w.shape[1] % 32 == 0):
    return False
  return plan(w.bits, 8, w.shape[0], w.group_size, config) is not None


def on_hopper() -> bool:
  """Whether the default backend is an NVIDIA Hopper GPU (compute capability 9.x), where
  ``wgmma`` exists."""
  if jax.default_backend() not in ("gpu", "cuda"):
    return False
  dev = jax.devices()[0]
  cc = str(getattr(dev, "compute_capability", ""))
  return cc.startswith("9") or any(h in dev.device_kind for h in ("H100", "H200", "H800", "GH200"))


def can_use(x: jax.Array, w: quantized.QuantizedArray) -> bool:
  """The dispatch predicate of ``"pallas_mgpu"``: :func:`supports` on a Hopper backend
  (:func:`on_hopper`); cheap (static shapes and the backend name)."""
  return supports(x, w) and on_hopper()


def column_masks(bits: int, kw: int, group: int) -> np.ndarray | None:
  """The constant 0/1 column masks of a step holding several groups (``float32``), or ``None``.

  Rows ``0 .. gs-1``: ``lo[gi, r] = 1`` where word ``r`` of the step starts in group ``gi`` of
  the step; rows ``gs .. 2 gs - 1`` (3 bits with straddling words only): ``hi[gi, r] = 1``
  where word ``r`` ends in group ``gi``; rows ``2 gs .. 2 gs + cpw - 1`` (the same case):
  ``sel[p, r] = 1`` where code ``p`` of word ``r`` lies in the word's last group, not its
  first. Steps start on a group boundary, so the masks are the same for every step.
  """
  cpw = packing.codes_per_word(bits)
  tk = cpw * kw
  gs = tk // group
  if gs <= 1:
    return None
  first = np.arange(kw) * cpw  # first code of each word, within the step
  lo = (first[None, :] // group == np.arange(gs)[:, None])
  if group % cpw == 0:
    return lo.astype(np.float32)
  hi = ((first + cpw - 1)[None, :] // group == np.arange(gs)[:, None])
  sel = ((first[None, :] + np.arange(cpw)[:, None]) // group != first[None, :] // group)
  return np.concatenate([lo, hi, sel]).astype(np.float32)


def step_scale(srows, mask_col, shape):
  """The step's ``(bn, kw)`` ``float32`` scale tile: each column's scale of its group.

  Args:
    srows: the ``gs`` group scale rows of the step, each ``(bn,)``.
    mask_col: ``gi -> (kw,)`` 0/1 column vector saying which columns take group ``gi`` (rows
      of :func:`column_masks`; unused when ``gs == 1``).
    shape: ``(bn, kw)``.
  """
  rows = [jax.lax.broadcast_in_dim(s, shape, (0,)) for s in srows]
  if len(rows) == 1:
    return rows[0]
  tile = None
  for gi, r in enumerate(rows):  # one nonzero term per column: the sum is exact
    term = r * jax.lax.broadcast_in_dim(mask_col(gi), shape, (1,))
    tile = term if tile is None else tile + term
  return tile


def _plane_scale(lo, hi, sel_col, p, shape):
  """Scale tile of plane ``p``: ``lo``, or per column ``hi`` where code ``p`` of the word lies
  in its last group (3 bits, straddling words)."""
  if hi is None:
    return lo
  sel = jax.lax.broadcast_in_dim(sel_col(p), shape, (1,))
  return jnp.where(sel > 0.5, hi, lo)


def dequant_plane(words, p: int, bits: int, scale, cdtype):
  """``s (q_p - 2**(bits-1))`` in ``cdtype``, ``q_p = (words >> bits p) & (2**bits - 1)``: code
  ``p`` of every word of the ``(bn, kw)`` tile (shift and mask in registers), times ``scale``
  (``float32``, same shape), rounded once to the 16-bit compute dtype."""
  q = ((words >> np.uint32(bits * p)) & np.uint32((1 << bits) - 1)).astype(jnp.int32)
  q = q - (1 << (bits - 1))
  return (q.astype(jnp.float32) * scale).astype(cdtype)


def _kernel(xp_gmem, w_gmem, s_gmem, *rest, pl_, group, cdtype, config):
  """One program: outputs ``j*64 .. j*64+63`` of rows ``i*bm ..``; a pipeline over K steps."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  if len(rest) == 2:
    m_gmem, o_ref = rest
  else:
    (o_ref,), m_gmem = rest, None
  bits, kw, tk, gs, bm = pl_.bits, pl_.kw, pl_.tk, pl_.gs, pl_.bm
  cpw = packing.codes_per_word(bits)
  bn = config.block_n
  shape = (bn, kw)
  j = pl.program_id(0)
  i = pl.program_id(1)
  swizzle = min(128, kw * 2)  # bytes of one activation plane row of the step
  x_transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))
  # Words: (tile_rows, 32) tiles, 128-byte swizzle (32 words); 8 rows where ceil(K / cpw)
  # allows (an untiled/1-row tile finds no bank-conflict-free transfer for the transposed load).
  w_transforms = (plgpu.TilingTransform((pl_.tile_rows, 32)), plgpu.SwizzleTransform(128))
  row = plgpu.Layout.WGMMA.reduce(1)  # (64,) along the tile's rows (outputs)
  col = plgpu.Layout.WGMMA.reduce(0)  # (kw,) along its columns (words)

  def scoped(acc_ref):
    def body(_, x_smem, w_smem, s_smem, *m_smem):
      words = plgpu.load(plgpu.transpose_ref(w_smem, (1, 0)), (),
                         layout=plgpu.Layout.WGMMA_TRANSPOSED)
      words = plgpu.layout_cast(words, plgpu.Layout.WGMMA)  # (64, kw) = W^T's words
      mask_col = lambda r: plgpu.load(m_smem[0], (r,), layout=col)
      srows = [plgpu.load(s_smem, (gi,), layout=row) for gi in range(gs)]
      lo = step_scale(srows, mask_col, shape)
      hi = step_scale(srows, lambda r: mask_col(gs + r), shape) if pl_.straddle else None
      for p in range(cpw):
        scale = _plane_scale(lo, hi, lambda q: mask_col(2 * gs + q), p, shape)
        a = dequant_plane(words, p, bits, scale, cdtype)
        plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(x_smem.at[p], (1, 0)))
      plgpu.wgmma_wait(0)

    if group >= tk:
      s_spec = plgpu.BlockSpec((1, bn), lambda s: ((s * tk) // group, j))
    else:
      s_spec = plgpu.BlockSpec((gs, bn), lambda s: (s, j))
    in_specs = [plgpu.BlockSpec((cpw, bm, kw), lambda s: (0, i, s), transforms=x_transforms),
                plgpu.BlockSpec((kw, bn), lambda s: (s, j), transforms=w_transforms), s_spec]
    operands = [xp_gmem, w_gmem, s_gmem]
    if m_gmem is not None:
      in_specs.append(plgpu.BlockSpec(m_gmem.shape, lambda s: (0, 0)))
      operands.append(m_gmem)
    plgpu.emit_pipeline(body, grid=(pl_.steps,), in_specs=in_specs,
                        max_concurrent_steps=config.max_concurrent_steps)(*operands)
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)

  pl.run_scoped(scoped, plgpu.ACC((bn, bm), jnp.float32))


def _prepare(x, w, config):
  """What the kernel and :func:`emulate` share: the plan, rows, the plane-major activations
  ``(cpw, Mp, steps kw)`` in the compute dtype, the ``float32`` scales, the masks."""
  k, _ = w.shape
  g = w.group_size
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  p = plan(w.bits, m, k, g, config)
  if p is None:
    raise NotImplementedError(_unsupported(x, w, config))
  cpw = packing.codes_per_word(w.bits)
  cdtype = jnp.float16 if x.dtype == jnp.float16 else jnp.bfloat16
  mp = _common.round_up(max(m, 1), p.bm)
  kp = p.steps * p.tk
  xc = jnp.pad(x2.astype(cdtype), ((0, mp - m), (0, kp - k)))
  xp = _common.plane_major(xc, cpw)  # (cpw, Mp, Kp/cpw): xp[q, m, r] = x[m, cpw r + q]
  masks = column_masks(w.bits, p.kw, g)
  return p, x2, m, mp, cdtype, xp, w.scale_values().astype(jnp.float32), masks


def _finish(y, x2, w, scale, out_dtype, batch):
  """``y (M, N)`` plus the zero-point term of asymmetric weights, reshaped to ``batch + (N,)``."""
  m, k = x2.shape
  g = w.group_size
  if not w.symmetric:  # sum_g rowsum(x_g) * (z_g + c s_g), a (M, G) @ (G, N) product
    offset = w.zero_values().astype(jnp.float32) + 2.0**(w.bits - 1) * scale
    xsum = jnp.sum(x2.astype(jnp.float32).reshape(m, k // g, g), axis=-1)
    y = y.astype(jnp.float32) + xsum @ offset
  return y.astype(out_dtype).reshape(batch + (w.shape[1],))


def _forward(x, w, *, interpret=False, config=None, target_name=None):
  del target_name
  if interpret:  # jax 0.10.2's Mosaic GPU interpreter needs trivial BlockSpec windows
    raise NotImplementedError("quant_matmul_mgpu has no interpret mode (jax 0.10.2's Mosaic GPU "
                              "interpreter rejects its BlockSpec windows); use emulate() or "
                              "quant_matmul_ref.")
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  config = config or CONFIG
  if not supports(x, w, config):
    raise NotImplementedError(_unsupported(x, w, config))
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  n = w.shape[1]
  g = w.group_size
  p, x2, m, mp, cdtype, xp, scale, masks = _prepare(x, w, config)
  operands = [xp, w.packed, scale]
  if masks is not None:
    operands.append(jnp.asarray(masks))
  kernel = functools.partial(_kernel, pl_=p, group=g, cdtype=cdtype, config=config)
  yt = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n, mp), out_dtype),
      grid=(pl.cdiv(n, config.block_n), mp // p.bm),
      in_specs=[pl.BlockSpec(memory_space=plgpu.GMEM)] * len(operands),
      out_specs=plgpu.BlockSpec((config.block_n, p.bm), lambda j, i: (j, i)),
      name=f"quant_matmul_mgpu_{w.bits}b_g{g}",
  )(*operands)
  return _finish(yt[:, :m].T, x2, w, scale, out_dtype, x.shape[:-1])


def emulate(x: jax.Array, w: quantized.QuantizedArray, *,
            config: MgpuConfig | None = None) -> jax.Array:
  """The kernel's arithmetic in ``jax.numpy`` (any backend, CPU included), for tests.

  Runs :func:`quant_matmul_mgpu`'s plan step by step over all columns at once with the kernel's
  own :func:`dequant_plane`, :func:`step_scale` and :func:`column_masks`: per step the word
  tile ``(N, kw)`` (``W^T``'s words, zero rows past the end as TMA's zero fill gives), the
  step's scale rows (zero past the last group), the per-plane scale tiles, the ``cdtype``
  operands and a ``float32`` ``A @ B`` per plane as ``wgmma`` computes it. What it does not
  check: the Mosaic GPU lowering, shared-memory transforms, TMA and ``wgmma`` themselves.
  """
  config = config or CONFIG
  if not supports(x, w, config):
    raise NotImplementedError(_unsupported(x, w, config))
  return _emulate(x, w, config)


@functools.partial(jax.jit, static_argnums=2)
def _emulate(x, w, config):
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  n = w.shape[1]
  g = w.group_size
  p, x2, m, mp, cdtype, xp, scale, masks = _prepare(x, w, config)
  cpw = packing.codes_per_word(w.bits)
  words = jnp.pad(w.packed, ((0, p.steps * p.kw - w.packed.shape[0]), (0, 0))).T  # (N, Kw)
  g_rows = p.steps * p.gs if g < p.tk else scale.shape[0]
  srows_all = jnp.pad(scale, ((0, max(0, g_rows - scale.shape[0])), (0, 0)))
  shape = (n, p.kw)
  mask_col = lambda r: jnp.asarray(masks[r])
  acc = jnp.zeros((n, mp), jnp.float32)
  for s in range(p.steps):
    wt = words[:, s * p.kw:(s + 1) * p.kw]
    first = (s * p.tk) // g if g >= p.tk else s * p.gs
    srows = [srows_all[first + gi] for gi in range(p.gs)]
    lo = step_scale(srows, mask_col, shape)
    hi = step_scale(srows, lambda r: mask_col(p.gs + r), shape) if p.straddle else None
    for q in range(cpw):
      sc = _plane_scale(lo, hi, lambda c: mask_col(2 * p.gs + c), q, shape)
      a = dequant_plane(wt, q, w.bits, sc, cdtype)
      b = xp[q, :, s * p.kw:(s + 1) * p.kw].T  # (kw, Mp)
      acc = acc + jnp.matmul(a, b, preferred_element_type=jnp.float32)
  return _finish(acc[:, :m].T, x2, w, scale, out_dtype, x.shape[:-1])


def _unsupported(x, w, config):
  return (f"pallas quant_matmul_mgpu supports 2-D {BITS}-bit QuantizedArray weights whose "
          f"group_size is a multiple of the codes per word (2/4/8 bits) and a divisor or "
          f"multiple of the K step, or (3 bits) >= 10 and dividing 10 * kw codes for a "
          f"power-of-2 kw <= {config.max_words_3bit}, and floating x; got {w!r}, "
          f"x.dtype={x.dtype}, x.shape={x.shape}.")


_differentiable = _common.differentiable_factory(_forward, quant_matmul_ref)


def quant_matmul_mgpu(x: jax.Array, w: quantized.QuantizedArray, *,
                      config: MgpuConfig | None = None) -> jax.Array:
  """``x @ W`` for a 2/3/4/8-bit :class:`~compressjax.formats.QuantizedArray`, Mosaic GPU.

  Lowers for ``cuda`` (Hopper, ``wgmma``); not yet run on a GPU.

  Args:
    x: ``(..., K)`` floating activations (multiplied in ``bfloat16``, or ``float16`` when
      ``x`` is ``float16``).
    w: the packed weight, symmetric or asymmetric, any ``N`` (a ragged last column block is
      zero-filled by TMA) and ``K``.
    config: tile sizes; default :data:`CONFIG`.

  Returns:
    ``(..., N)`` in ``result_type(x.dtype, w.dtype)``, accumulated in ``float32``; each
    dequantized weight ``s (q - 2**(bits-1))`` is rounded to the 16-bit compute dtype before
    the tensor cores multiply it. Gradients come from :func:`quant_matmul_ref`.

  Raises:
    NotImplementedError: for unsupported shapes (see :func:`supports`).
  """
  config = config or CONFIG
  if not supports(x, w, config):
    raise NotImplementedError(_unsupported(x, w, config))
  return _differentiable(False, config, None)(x, w)
