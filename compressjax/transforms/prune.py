"""Pruning transforms (tree wiring; the math lives in :mod:`compressjax.prune`).

* :func:`magnitude` ``|W|`` per layer, or one global threshold (optionally on LAMP scores, which
  gives layer-adaptive sparsities); data-free.
* :func:`wanda` ``|W| * ||X||`` compared per output; needs the calibration engine's ``sq_sum``.
* :func:`sparsegpt` OBS mask selection and reconstruction with the layer Hessian.
* :func:`structured` removes MLP channels (and optionally query heads) so that the matrices
  really shrink; calibrated scores and a least-squares refit of the reading layer.

Unstructured results are :class:`~compressjax.formats.BitmaskSparse` leaves and N:M results
(``pattern="2:4"``) :class:`~compressjax.formats.NMSparse` leaves, both with ``float16`` values
by default. Chaining a quantizer after a pruner (``chain(sparsegpt(...), gptq(...))``) quantizes
the kept values and keeps the mask (GPTQ then compensates with the mask fixed, as SparseGPT's
joint mode).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import BitmaskSparse, NMSparse
from compressjax.prune import masks, sparsegpt_core, structured_core
from compressjax.quantize import obs_core
from compressjax.transforms.base import (DEFAULT_WHERE, PLANNING, Transform, _map, _real_stats,
                                         _visible, leaves_with_paths_marked, leafwise)
from compressjax.transforms.quantize import _check_dense_2d, check_damping, check_positive_int
from compressjax.transforms.selection import Selector

__all__ = ["magnitude", "wanda", "sparsegpt", "structured", "StructuredState"]


def _sparse_leaf(w, keep, nm, nnz, value_dtype):
  if nm is not None:
    return NMSparse.from_dense(w, keep, n=nm[0], m=nm[1], value_dtype=value_dtype, dtype=w.dtype)
  return BitmaskSparse.from_dense(w, keep, value_dtype=value_dtype, dtype=w.dtype, nnz=nnz)


def _mask(score, sparsity, nm, per_output):
  if nm is not None:
    return masks.nm_mask(score, *nm)
  return masks.unstructured_mask(score, sparsity, per_output=per_output)


def _nnz(shape, sparsity, nm, per_output) -> int:
  k, n = shape
  if nm is not None:
    return k * n * nm[0] // nm[1]
  if per_output:
    return n * (k - int(round(sparsity * k)))
  return k * n - int(round(sparsity * k * n))


def _args(sparsity, pattern):
  nm = masks.parse_pattern(pattern)
  if nm is None:
    masks.check_sparsity(sparsity)
  return nm


def _name(kind, sparsity, nm):
  return f"{kind}({'%d:%d' % nm if nm else 'sparsity=%g' % sparsity})"


def magnitude(sparsity: float = 0.5, pattern: str | None = None, *, scope: str = "layer",
              budget: str | None = None, value_dtype: Any = jnp.float16,
              where: Selector = DEFAULT_WHERE) -> Transform:
  """Magnitude pruning of the selected kernels.

  Args:
    sparsity: fraction of weights pruned (unstructured).
    pattern: ``None`` or ``"n:m"`` (``n`` kept in every ``m`` input rows; per layer only).
    scope: ``"layer"`` (every kernel at ``sparsity``) or ``"global"`` (one threshold across all
      selected kernels, so layers get different sparsities).
    budget: with ``scope="global"``: ``None`` ranks ``|W|`` directly; ``"lamp"`` ranks LAMP
      scores (layer-adaptive magnitude pruning, Lee et al. 2021).
    value_dtype: dtype of the stored kept values.
    where: which parameters (default: the decoder's linear kernels).

  With ``scope="global"`` the per-kernel counts depend on the weights, so :func:`plan` reports
  the uniform-sparsity shapes.

  References:
    Han et al. 2015; Lee et al. 2021, LAMP (arXiv:2010.07611).
  """
  nm = _args(sparsity, pattern)
  if scope not in ("layer", "global"):
    raise ValueError(f"magnitude: scope must be 'layer' or 'global', got {scope!r}")
  if budget not in (None, "lamp"):
    raise ValueError(f"magnitude: budget must be None or 'lamp', got {budget!r}")
  if (budget is not None or scope == "global") and nm is not None:
    raise ValueError("magnitude: N:M patterns are per layer by definition; use scope='layer' "
                     "and budget=None with pattern")
  if budget is not None and scope != "global":
    raise ValueError("magnitude: budget='lamp' needs scope='global' (a global ranking)")
  name = _name("magnitude", sparsity, nm)

  def fn(path, w):
    del path
    _check_dense_2d(w, "magnitude")
    keep = _mask(jnp.abs(w), sparsity, nm, per_output=False)
    return _sparse_leaf(w, keep, nm, _nnz(w.shape, sparsity, nm, False), value_dtype)

  per_layer = leafwise(fn, where, name=name)
  if scope == "layer":
    return per_layer

  def update(params, state, stats=None):
    if stats is PLANNING:
      return per_layer.update(params, state, stats)
    selected = set(state.paths)
    leaves = {p: w for p, w in leaves_with_paths_marked(params) if p in selected and _visible(w)}
    for p, w in leaves.items():
      try:
        _check_dense_2d(w, "magnitude")
      except ValueError as e:
        raise ValueError(f"{name} at parameter {p!r}: {e}") from e
    score = {p: (masks.lamp_score(w) if budget == "lamp" else jnp.abs(w)) for p, w in leaves.items()}
    keeps = masks.global_threshold_masks(score, sparsity)
    new = {p: _sparse_leaf(w, keeps[p], None, None, value_dtype) for p, w in leaves.items()}
    return _map(lambda p, x: new.get(p, x), params), state

  return Transform(per_layer.init, update, scope="global")


def wanda(sparsity: float = 0.5, pattern: str | None = None, *, value_dtype: Any = jnp.float16,
          where: Selector = DEFAULT_WHERE) -> Transform:
  """Wanda: prune the lowest ``|W_ij| * ||X_j||_2`` of every output (or every N:M group).

  Needs calibration statistics (the input's ``sq_sum``); no weight update.

  References:
    Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
    Models", arXiv:2306.11695.
  """
  nm = _args(sparsity, pattern)

  def fn(path, w, stats):
    del path
    _check_dense_2d(w, "wanda")
    keep = _mask(masks.wanda_score(w, stats.sq_sum), sparsity, nm, per_output=True)
    return _sparse_leaf(w, keep, nm, _nnz(w.shape, sparsity, nm, True), value_dtype)

  return leafwise(fn, where, name=_name("wanda", sparsity, nm), with_stats=True)


def sparsegpt(sparsity: float = 0.5, pattern: str | None = None, *, blocksize: int = 128,
              percdamp: float = 0.01, value_dtype: Any = jnp.float16,
              where: Selector = DEFAULT_WHERE) -> Transform:
  """SparseGPT pruning with OBS reconstruction (see :func:`compressjax.prune.sparsegpt_prune`).

  Needs calibration statistics (the layer Hessian). For the joint sparse + quantized mode chain
  a quantizer after it: ``chain(sparsegpt(0.5), gptq(bits=4, group_size=64))``.

  References:
    Frantar & Alistarh 2023, SparseGPT (arXiv:2301.00774).
  """
  nm = _args(sparsity, pattern)
  check_positive_int("sparsegpt", "blocksize", blocksize)
  check_damping("sparsegpt", percdamp)

  def nnz(shape):
    if nm is not None:
      return _nnz(shape, sparsity, nm, False)
    k, n = shape
    b = min(blocksize, k)
    sizes = [min(b, k - i) for i in range(0, k, b)]
    return sum(r * n - int(np.round(sparsity * r * n)) for r in sizes)

  def fn(path, w, stats):
    del path
    _check_dense_2d(w, "sparsegpt")
    wp, keep, _ = sparsegpt_core.sparsegpt_prune(w, stats.gptq_hessian(), sparsity=sparsity,
                                                 pattern=pattern, blocksize=blocksize,
                                                 percdamp=percdamp,
                                                 split=getattr(stats, "columns", None))
    return obs_core.place_leaf(_sparse_leaf(wp, keep, nm, nnz(w.shape), value_dtype),
                               getattr(stats, "columns", None))

  return leafwise(fn, where, name=_name("sparsegpt", sparsity, nm), with_stats=True)


# ------------------------------------------------------------------------------------------
# Structured pruning.
# ------------------------------------------------------------------------------------------


class StructuredState(NamedTuple):
  """``kept[path]``: the input rows kept of each reading layer (``down_proj``/``o_proj``
  kernel path -> ``int32`` indices), filled as blocks are pruned (used to slice the
  calibration statistics of the layers chained after)."""

  kept: dict[str, np.ndarray]


def structured(fraction: float, *, prune_heads: bool = False, head_dim: int | None = None,
               num_kv_heads: int | None = None, compensate: bool = True, multiple_of: int = 64,
               percdamp: float = 0.01, block_pattern: str = r"layers/\d+/",
               mlp_in: Sequence[str] = ("mlp/gate_proj", "mlp/up_proj"),
               mlp_out: str = "mlp/down_proj",
               attn: Sequence[str] = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj"),
               head_in: str = "attn/q_proj", head_out: str = "attn/o_proj") -> Transform:
  """Removes MLP channels (and optionally one query head per KV group) of every decoder block.

  The result is a normal parameter tree with smaller kernels (``gate_proj``/``up_proj``
  ``(D, F')``, ``down_proj`` ``(F', D)``, ``q_proj`` ``(D, H' hd)``, ``o_proj`` ``(H' hd, D)``);
  the model infers head counts from the kernel shapes.

  Args:
    fraction: fraction of each block's linear parameters to remove, in ``[0, 1)``; with
      ``prune_heads`` the heads' share is taken first and the rest comes from the MLP.
    prune_heads: also remove the lowest-scored query head of every KV group (needs
      ``head_dim`` and ``num_kv_heads``).
    head_dim, num_kv_heads: the model's attention geometry (``model.cfg``).
    compensate: refit the kept rows of ``down_proj``/``o_proj`` by least squares on the
      calibration inputs (:func:`compressjax.prune.structured_core.compensate_rows`).
    multiple_of: the kept MLP width is rounded to a multiple of this (64 keeps group-64
      quantization valid after pruning).
    percdamp: relative damping of the least-squares refit.
    block_pattern: regular expression matching a block's path prefix (``layers/<i>/``).
    mlp_in, mlp_out: the block's MLP linears (relative to the block, without ``/kernel``): the
      channels are columns of every ``mlp_in`` kernel (and of its bias) and rows of ``mlp_out``.
      Llama defaults; a GPT-2-style block passes ``mlp_in=("mlp/c_fc",),
      mlp_out="mlp/c_proj"``.
    attn: the block's other linears, counted in the parameter budget.
    head_in, head_out: the query projection and the attention output projection
      (``prune_heads``; separate q/k/v projections only).

  Needs calibration statistics (run through the calibration engine). With ``fraction=0`` the
  tree is returned unchanged (bit for bit).

  References:
    An et al. 2024, FLAP (arXiv:2312.11983); Ashkboos et al. 2024, SliceGPT (arXiv:2401.15024).
  """
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
      0.0 <= fraction < 1.0):
    raise ValueError(f"structured: fraction must be in [0, 1), got fraction={fraction!r}")
  if prune_heads and (not head_dim or not num_kv_heads):
    raise ValueError("structured: prune_heads=True needs head_dim and num_kv_heads (model.cfg)")
  if not isinstance(multiple_of, int) or multiple_of <= 0:
    raise ValueError(f"structured: multiple_of must be a positive int, got {multiple_of!r}")

  mlp_in, attn = tuple(mlp_in), tuple(attn)
  out_re = re.compile(f"({block_pattern}){re.escape(mlp_out)}/kernel")

  def init(params):
    paths = [p for p, leaf in leaves_with_paths_marked(params)
             if _visible(leaf) and out_re.fullmatch(p)]
    if not paths and any(_visible(leaf) for _, leaf in leaves_with_paths_marked(params)):
      raise ValueError(f"structured: found no parameter matching "
                       f"{block_pattern + mlp_out + '/kernel'!r} (block_pattern, mlp_out)")
    return StructuredState({})

  def plan_block(leaves, pre):
    def get(name):
      path = f"{pre}{name}/kernel"
      if path not in leaves:
        raise ValueError(f"structured: block {pre!r} has no parameter {path!r} (mlp_in, mlp_out, "
                         f"attn, head_in, head_out name the block's linears)")
      return leaves[path]
    names = mlp_in + (mlp_out,) + attn + ((head_in, head_out) if prune_heads else ())
    for name in names:
      _check_dense_2d(get(name), f"structured at parameter '{pre}{name}/kernel'")
    d, f = get(mlp_in[0]).shape
    total = sum(int(np.prod(get(n).shape)) for n in dict.fromkeys(attn + mlp_in + (mlp_out,)))
    n_in = len(mlp_in) + 1  # parameters per MLP channel, in units of d
    remove = fraction * total
    heads_keep = None
    if prune_heads and fraction > 0:
      h = get(head_in).shape[1] // head_dim
      g = h // num_kv_heads
      if g < 2:
        raise ValueError(f"structured: prune_heads needs at least 2 query heads per KV group in "
                         f"block {pre!r}, found {g}")
      heads_keep = g - 1
      remove -= num_kv_heads * head_dim * 2 * d
    n_remove = max(0.0, remove) / (n_in * d)
    f_keep = int(round((f - n_remove) / multiple_of)) * multiple_of
    f_keep = min(f, max(multiple_of, f_keep)) if fraction > 0 else f
    return f_keep, heads_keep

  def update(params, state, stats=None):
    leaves = {p: w for p, w in leaves_with_paths_marked(params) if _visible(w)}
    prefixes = sorted(m.group(1) for m in map(out_re.fullmatch, leaves) if m)
    new, kept = {}, dict(state.kept)

    def narrow(name, idx):  # keep the output columns idx of a kernel (and its bias)
      new[pre + name + "/kernel"] = leaves[pre + name + "/kernel"][:, idx]
      if pre + name + "/bias" in leaves:
        new[pre + name + "/bias"] = leaves[pre + name + "/bias"][idx]

    for pre in prefixes:
      f_keep, heads_keep = plan_block(leaves, pre)
      down_path = pre + mlp_out + "/kernel"
      down = leaves[down_path]
      if f_keep < down.shape[0]:
        idx, down_new = _select(down, stats, down_path, f_keep, None)
        new[down_path] = down_new
        for name in mlp_in:
          narrow(name, idx)
        if _real_stats(stats):
          kept[down_path] = np.asarray(idx)
      if heads_keep is not None:
        o_path = pre + head_out + "/kernel"
        o, q = leaves[o_path], leaves[pre + head_in + "/kernel"]
        geom = dict(num_heads=q.shape[1] // head_dim, num_kv_heads=num_kv_heads,
                    head_dim=head_dim, keep_per_group=heads_keep)
        idx, o_new = _select(o, stats, o_path, None, geom)
        new[o_path] = o_new
        narrow(head_in, idx)
        if _real_stats(stats):
          kept[o_path] = np.asarray(idx)
    return _map(lambda p, x: new.get(p, x), params), StructuredState(kept)

  def _select(w_out, stats, path, n_keep, geom):
    if not _real_stats(stats):  # planning: shapes only
      count = n_keep if geom is None else (
          geom["num_kv_heads"] * geom["keep_per_group"] * geom["head_dim"])
      idx = jnp.arange(count, dtype=jnp.int32)
      return idx, w_out[idx]
    st = stats.get(path)
    if st is None:
      raise ValueError(f"structured at parameter {path!r} needs calibration statistics; run it "
                       "through compressjax.calibration.run_sequential")
    score = structured_core.channel_scores(w_out, st.sq_sum)
    idx = (structured_core.top_channels(score, n_keep) if geom is None
           else structured_core.top_heads(score, **geom))
    if compensate:
      return idx, structured_core.compensate_rows(w_out, st.hessian, idx, percdamp=percdamp)
    return idx, w_out[idx]

  def restat(state, stats):
    out = dict(stats)
    for path, idx in state.kept.items():
      st = out.get(path)
      if st is None or st.sq_sum.shape[0] == len(idx):
        continue
      out[path] = dataclasses.replace(st, hessian=st.hessian[idx][:, idx], sq_sum=st.sq_sum[idx],
                                      abs_sum=st.abs_sum[idx])
    return out

  return Transform(init, update, restat)
