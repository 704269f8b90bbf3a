"""Sequential calibration engine shared by every data-aware method (GPTQ, AWQ, SparseGPT, ...).

The model is run block by block over the calibration windows. For each decoder block:

1. the block's inputs ``X`` (one ``(n, T, D)`` array for all windows) are fed through the
   *original* block, accumulating per-linear-input statistics (:class:`LayerStats`: the Hessian
   proxy ``X^T X``, per-channel sums of ``x^2`` and ``|x|``, the token count) without keeping the
   activations;
2. the transform's ``update`` is called on a view of the parameter tree that shows only this
   block's parameters, with ``stats`` keyed by parameter path, and its rewrite is merged back;
3. the next block's inputs are the *compressed* block's outputs (``mode="sequential"``, the GPTQ
   reference's default) or the original block's outputs (``mode="original"``).

Peak memory is one block's parameters plus two copies of ``X``, not the model's activations.
With ``resume_dir`` every finished block is checkpointed atomically (compressed parameters so
far, the next block's inputs, the transform state); a killed run restarted with the same
arguments continues from the last finished block and gives the same result as an uninterrupted
run.

References:
  Frantar et al. 2022, GPTQ (sequential block-by-block calibration);
  Sun et al. 2023, Wanda (input norms); Lin et al. 2023, AWQ (mean activation magnitudes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from compressjax import checkpoint
from compressjax.io.loading import _int_keys, build_model, model_params
from compressjax.model import Block, rope_cos_sin
from compressjax.transforms.base import Transform, _UNSELECTED, _map
from compressjax.transforms.selection import leaves_with_paths

__all__ = ["LayerStats", "block_stats", "run_sequential"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerStats:
  """Statistics of one linear layer's input ``x`` (rows are tokens), accumulated over calibration.

  Invariants: ``hessian`` is ``(K, K)`` float32 ``sum_t x_t x_t^T`` (the GPTQ Hessian is
  ``2 * hessian / n``); ``sq_sum`` and ``abs_sum`` are ``(K,)`` float32 sums of ``x^2`` and ``|x|``
  over tokens (Wanda's norm is ``sqrt(sq_sum)``; AWQ's activation scale is ``abs_sum / n``);
  ``n`` is the float32 token count.
  """

  hessian: jax.Array
  sq_sum: jax.Array
  abs_sum: jax.Array
  n: jax.Array

  @classmethod
  def zeros(cls, k: int) -> "LayerStats":
    return cls(jnp.zeros((k, k), jnp.float32), jnp.zeros((k,), jnp.float32),
               jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32))

  def add(self, x: jax.Array) -> "LayerStats":
    xf = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return LayerStats(self.hessian + xf.T @ xf, self.sq_sum + jnp.sum(xf * xf, 0),
                      self.abs_sum + jnp.sum(jnp.abs(xf), 0), self.n + xf.shape[0])

  def gptq_hessian(self) -> jax.Array:
    """``2 X^T X / n``, as the GPTQ reference accumulates it."""
    return 2.0 * self.hessian / jnp.maximum(self.n, 1.0)


def _block_fn(graphdef):
  """Jitted ``(block_state, x, cos, sin, pos) -> (out, captured inputs)``."""

  @jax.jit
  def run(state, x, cos, sin, pos):
    block = nnx.merge(graphdef, state)
    cap: dict[str, jax.Array] = {}
    out, _ = block(x, cos, sin, pos, pos, None, cap)
    return out, cap

  return run


def _batches(n: int, bs: int):
  return [(i, min(i + bs, n)) for i in range(0, n, bs)]


def block_stats(block: Block, x: np.ndarray | jax.Array, cos, sin, pos, *,
                batch_size: int) -> tuple[dict[str, LayerStats], jax.Array]:
  """Runs one block over all inputs; returns (stats per captured input, block outputs)."""
  graphdef, state = nnx.split(block)
  run = _block_fn(graphdef)

  @jax.jit
  def accumulate(stats, cap):
    return {k: stats[k].add(v) for k, v in cap.items()}

  stats = None
  outs = []
  for a, b in _batches(x.shape[0], batch_size):
    out, cap = run(state, jnp.asarray(x[a:b]), cos[: b - a], sin[: b - a], pos[: b - a])
    if stats is None:
      stats = {k: LayerStats.zeros(v.shape[-1]) for k, v in cap.items()}
    stats = accumulate(stats, cap)
    outs.append(out)
  return stats, jnp.concatenate(outs)


def _block_outputs(block: Block, x, cos, sin, pos, *, batch_size: int) -> jax.Array:
  graphdef, state = nnx.split(block)
  run = _block_fn(graphdef)
  return jnp.concatenate([run(state, jnp.asarray(x[a:b]), cos[: b - a], sin[: b - a],
                              pos[: b - a])[0] for a, b in _batches(x.shape[0], batch_size)])


def _view(params, prefix: str):
  """The tree with every leaf outside ``prefix`` hidden from transforms."""
  return _map(lambda p, x: x if p.startswith(prefix) else _UNSELECTED, params)


def _merge_block(params, new_view, prefix: str):
  flat = dict(leaves_with_paths(new_view))
  return _map(lambda p, x: flat[p] if p.startswith(prefix) else x, params)


def _block_params(params, i: int):
  return params["layers"][i]


def _fingerprint(windows: np.ndarray, mode: str, n_layers: int, extra: str) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256(np.ascontiguousarray(windows).tobytes())
  h.update(f"{mode}|{n_layers}|{extra}".encode())
  return h.hexdigest()[:16]


def run_sequential(model, windows: np.ndarray, transform: Transform, *, batch_size: int = 8,
                   mode: str = "sequential", resume_dir: str | None = None,
                   recipe_key: str = "", progress: bool = True) -> tuple[Any, Any]:
  """Compresses ``model`` block by block with calibration statistics.

  Args:
    model: a :class:`compressjax.model.Llama`.
    windows: int ``(n, T)`` calibration windows.
    transform: the compression transform; its ``update`` receives ``stats`` mapping each of the
      current block's linear kernel paths (``layers/{i}/attn/q_proj/kernel``...) to the
      :class:`LayerStats` of that layer's input.
    batch_size: windows per jitted block call.
    mode: ``"sequential"`` (next block sees the compressed block's outputs) or ``"original"``.
    resume_dir: where to checkpoint after each block and resume from; ``None`` disables it.
    recipe_key: a string identifying the recipe (part of the resume fingerprint, so a resume dir
      is never reused by a different recipe or data).

  Returns:
    ``(new_params, transform_state)``. Parameters outside the decoder blocks are passed through
    the transform last, with ``stats=None``.
  """
  if mode not in ("sequential", "original"):
    raise ValueError(f"mode must be 'sequential' or 'original', got {mode!r}")
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2:
    raise ValueError(f"windows must be (n, seq_len), got shape {windows.shape}")
  cfg = model.cfg
  params = model_params(model)
  state = transform.init(params)
  n, t = windows.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (min(batch_size, n), t))
  cos, sin = rope_cos_sin(cfg, pos, t)
  fp = _fingerprint(windows, mode, cfg.num_layers, recipe_key)

  start = 0
  x = None
  if resume_dir:
    start, x, params, state = _try_resume(resume_dir, fp, params, state)
  if x is None:
    embed = jax.jit(lambda e, tok: e[tok])
    emb = model.embed.embedding.get_value()
    x = jnp.concatenate([embed(emb, jnp.asarray(windows[a:b])) for a, b in _batches(n, batch_size)])

  graphdef = nnx.graphdef(model.layers[0])
  bar = tqdm(range(start, cfg.num_layers), desc="calibrate", disable=not progress, unit="block",
             initial=start, total=cfg.num_layers)
  for i in bar:
    prefix = f"layers/{i}/"
    block = nnx.merge(graphdef, _as_state(model.layers[i], _block_params(params, i)))
    cap_stats, orig_out = block_stats(block, x, cos, sin, pos, batch_size=batch_size)
    stats = {f"layers/{i}/{lin}/kernel": cap_stats[src] for lin, src in Block.LINEAR_INPUTS.items()}
    new_view, state = transform.update(_view(params, prefix), state, stats)
    params = _merge_block(params, new_view, prefix)
    if mode == "sequential":
      cblock = nnx.merge(graphdef, _as_state(model.layers[i], _block_params(params, i)))
      x = _block_outputs(cblock, x, cos, sin, pos, batch_size=batch_size)
    else:
      x = orig_out
    x = jax.block_until_ready(x)
    if resume_dir:
      _save_resume(resume_dir, fp, i + 1, x, params, state)
  # Anything the transform selected outside the blocks (e.g. an untied head) is data-free.
  rest_view = _map(lambda p, v: _UNSELECTED if p.startswith("layers/") else v, params)
  new_rest, state = transform.update(rest_view, state, None)
  params = _map(lambda p, v: v if p.startswith("layers/") else dict(leaves_with_paths(new_rest))[p],
                params)
  return params, state


def _as_state(block_module, block_params):
  _, st = nnx.split(block_module)
  st = jax.tree.map(lambda v: v, st)
  nnx.replace_by_pure_dict(st, _int_keys(block_params))
  return st


def _save_resume(resume_dir: str, fp: str, next_block: int, x, params, state) -> None:
  """Checkpoints a finished block: parameters, next inputs and the transform state, as data
  only (the state's structure in the metadata, its arrays beside the parameters)."""
  spec, state_arrays = checkpoint.encode_pytree(state, where="calibration transform state")
  os.makedirs(resume_dir, exist_ok=True)
  path = os.path.join(resume_dir, "latest")
  checkpoint.save(path, {"params": params, "x": np.asarray(x), "state": state_arrays},
                  metadata={"fingerprint": fp, "next_block": next_block, "state": spec},
                  overwrite=True)


def _try_resume(resume_dir: str, fp: str, params, state):
  path = os.path.join(resume_dir, "latest")
  if not os.path.isdir(path):
    return 0, None, params, state
  saved, meta = checkpoint.restore(path)
  if meta.get("fingerprint") != fp:
    raise checkpoint.CheckpointError(
        f"resume_dir {resume_dir!r} holds a run with other calibration data, mode or recipe "
        f"(fingerprint {meta.get('fingerprint')} != {fp}); use another resume_dir or delete it")
  if not isinstance(meta.get("next_block"), int) or "state" not in meta:
    raise checkpoint.CheckpointError(f"resume_dir {resume_dir!r}: {path!r} is not a calibration "
                                     "resume point (no next_block/state in its metadata)")
  saved_state = checkpoint.decode_pytree(
      meta["state"], saved.get("state", {}),
      where=f"resume_dir {resume_dir!r}: transform state in {path!r}")
  return int(meta["next_block"]), saved["x"], _int_keys(saved["params"]), saved_state
