"""Quantization transforms (tree wiring; the math lives in :mod:`compressjax.quantize`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import BitmaskSparse, CompressedArray, NMSparse, QuantizedArray
from compressjax.formats.sparse import compact_nm
from compressjax.quantize import gptq_core, rtn_core, spqr_core
from compressjax.transforms.base import (DEFAULT_WHERE, Transform, _real_stats, _visible,
                                         leaves_with_paths_marked, leafwise)
from compressjax.transforms.selection import Selector

__all__ = ["rtn", "gptq", "spqr", "owq"]

SUPPORTED_BITS = (2, 3, 4, 8)

#: Widest concatenation of output columns GPTQ solves in one fused sweep: q/k/v of the reference
#: model (960) measured 1.9x less CPU time fused, gate+up (3072) 1.2x more
#: (``experiments/bench_solver.py --fused``), so wider groups are solved per layer.
_FUSE_MAX_COLUMNS = 2048


def check_positive_int(name: str, arg: str, value, *, optional: bool = False) -> None:
  """Raises ``ValueError`` naming transform ``name`` and ``arg`` unless ``value`` is an int
  >= 1 (or ``None`` when ``optional``)."""
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name}: {arg} must be a positive int{' or None' if optional else ''}, "
                     f"got {value!r}")


def check_damping(name: str, percdamp) -> None:
  """Raises ``ValueError`` unless ``percdamp`` (the damping fraction) is a finite float >= 0."""
  if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not (
      0 <= percdamp < float("inf")):
    raise ValueError(f"{name}: percdamp (damping) must be a finite float >= 0, got {percdamp!r}")


def check_grid_args(name: str, bits: int, group_size: int | None = None, *,
                    blocksize: int | None = None, percdamp: float | None = None) -> None:
  """Validates a quantizer's arguments when it is built (before any data is seen).

  ``group_size`` must be ``None`` or a positive int (whether it divides a kernel's width is
  checked when the recipe is planned, per kernel); ``blocksize`` a positive int; ``percdamp``
  a finite float >= 0. Errors name the transform and the argument.
  """
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"{name}: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
  check_positive_int(name, "group_size", group_size, optional=True)
  if blocksize is not None:
    check_positive_int(name, "blocksize", blocksize)
  if percdamp is not None:
    check_damping(name, percdamp)


def rtn(bits: int, group_size: int | None = None, *, symmetric: bool = True,
        scale_dtype=jnp.float16, where: Selector = DEFAULT_WHERE) -> Transform:
  """Round-to-nearest quantization of the selected kernels into packed :class:`QuantizedArray` s.

  Args:
    bits: code width, one of 2, 3, 4, 8.
    group_size: quantization group along the input dimension (``None``: one group per output
      channel). Must divide every selected kernel's input width.
    symmetric: symmetric codes around zero (GPTQ convention) or asymmetric min/scale.
    scale_dtype: dtype the scales (and zeros) are stored in.
    where: which parameters (default: every linear kernel of the decoder blocks, or what the
      enclosing :func:`select` rule selected).

  Examples:
    >>> import jax.numpy as jnp
    >>> from compressjax import transforms as T
    >>> params = {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.ones((64, 16))}}}}}
    >>> q, _ = T.apply(T.rtn(bits=4, group_size=32), params)
    >>> q["layers"][0]["mlp"]["up_proj"]["kernel"].bits
    4

  References:
    Frantar et al. 2022, GPTQ (the RTN baseline and its symmetric grid).
  """
  check_grid_args("rtn", bits, group_size)
  quant = jax.jit(functools.partial(rtn_core.quantize_rtn, bits=bits, group_size=group_size,
                                    symmetric=symmetric, scale_dtype=scale_dtype))

  def fn(path, w):
    del path
    sparse = _sparse_input(w, "rtn")
    if group_size is not None and w.shape[0] % group_size:
      # Validate eagerly so the message names group_size and the width even under jit.
      rtn_core.quantize_rtn(jax.ShapeDtypeStruct(w.shape, w.dtype), bits=bits,
                            group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    if isinstance(sparse, NMSparse):
      # The kept values are a dense (K n/m, N) matrix; a dense group of `gs` rows is
      # `gs n/m` compacted rows, so the grid is that of the group's kept entries.
      gs = (group_size or w.shape[0]) * sparse.n // sparse.m
      values = rtn_core.quantize_rtn(sparse.values.astype(sparse.dtype), bits=bits,
                                     group_size=gs, symmetric=symmetric, scale_dtype=scale_dtype)
      return dataclasses.replace(sparse, values=values)
    if isinstance(sparse, BitmaskSparse):
      keep = sparse.keep_mask()
      codes, scale, zero = _masked_rtn(sparse.materialize(), keep, bits=bits,
                                       group_size=group_size or w.shape[0], symmetric=symmetric,
                                       scale_dtype=scale_dtype)
      return BitmaskSparse.from_codes(codes, keep, scale, zero, bits=bits,
                                      group_size=group_size or w.shape[0], symmetric=symmetric,
                                      dtype=sparse.dtype, nnz=sparse.nnz)
    return quant(w)

  return leafwise(fn, where, name=f"rtn(bits={bits}, group_size={group_size})")


def _sparse_input(w, name):
  """Validates a quantizer's input: a dense 2-D kernel (returns ``None``) or a sparse leaf with
  float values (returned: its mask is kept and only the kept values are quantized)."""
  if isinstance(w, NMSparse) and not isinstance(w.values, CompressedArray):
    return w
  if isinstance(w, BitmaskSparse) and w.bits is None:
    return w
  _check_dense_2d(w, name)
  return None


def _masked_rtn(w, keep, *, bits, group_size, symmetric, scale_dtype):
  """RTN codes of ``w`` on grids fitted to the kept entries only (pruned entries ignored, as
  GPTQ's ``_fit_grid`` ignores SpQR outliers)."""
  k, n = w.shape
  wg = w.reshape(k // group_size, group_size, n)
  fit = functools.partial(gptq_core._fit_grid, bits=bits, symmetric=symmetric,  # pylint: disable=protected-access
                          dtype=scale_dtype)
  scale, zero = jax.vmap(fit)(wg, jnp.logical_not(keep.reshape(wg.shape)))
  zero = None if symmetric else zero
  codes = rtn_core.quantize_codes(wg, scale[:, None, :], None if zero is None else zero[:, None, :],
                                  bits=bits, symmetric=symmetric)
  return codes.reshape(k, n), scale, zero


def _check_dense_2d(w, name):
  if isinstance(w, CompressedArray):
    raise ValueError(f"{name} expects a dense kernel but the parameter is already compressed "
                     f"({type(w).__name__})")
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"{name} expects a 2-D (in, out) kernel, got shape {getattr(w, 'shape', None)}")


def gptq(bits: int, group_size: int | None = None, *, symmetric: bool = True,
         scale_dtype=jnp.float16, blocksize: int = 128, percdamp: float = 0.01,
         act_order: bool = False, static_groups: bool = False,
         where: Selector = DEFAULT_WHERE) -> Transform:
  """GPTQ quantization of the selected kernels, using each layer's input Hessian.

  Needs calibration statistics: run it through :func:`compressjax.calibration.run_sequential`
  (or the ``compress`` entry point, which does). Arguments as in
  :func:`compressjax.quantize.gptq_quantize`; the output format is the same packed
  :class:`QuantizedArray` as :func:`rtn`'s, so both chain and load alike.

  References:
    Frantar et al. 2022, GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers.
  """
  check_grid_args("gptq", bits, group_size, blocksize=blocksize, percdamp=percdamp)
  quant = jax.jit(functools.partial(
      gptq_core.gptq_quantize, bits=bits, group_size=group_size, symmetric=symmetric,
      scale_dtype=scale_dtype, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
      static_groups=static_groups))
  quant_masked = jax.jit(functools.partial(
      gptq_core.gptq_masked, bits=bits, group_size=group_size, symmetric=symmetric,
      scale_dtype=scale_dtype, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
      static_groups=static_groups))
  quant_fused = jax.jit(functools.partial(
      gptq_core.gptq_quantize_fused, bits=bits, group_size=group_size, symmetric=symmetric,
      scale_dtype=scale_dtype, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
      static_groups=static_groups))
  name = f"gptq(bits={bits}, group_size={group_size})"

  def shared_input_solves(params, paths, stats) -> dict:
    """Solves the selected dense kernels that share one Hessian (the engine hands the linears
    reading the same input one statistics array: q/k/v, gate/up) as one GPTQ sweep each group
    (:func:`gptq_core.gptq_quantize_fused`: the same codes and scales as per-layer solves).
    Returns ``{path: QuantizedArray}``; everything else is left to the per-leaf path."""
    if not _real_stats(stats) or not isinstance(stats, dict):
      return {}
    groups: dict[tuple, list[tuple[str, jax.Array]]] = {}
    selected = set(paths)
    for path, w in leaves_with_paths_marked(params):
      st = stats.get(path)
      if (path not in selected or not _visible(w) or st is None
          or not isinstance(w, (jax.Array, np.ndarray)) or w.ndim != 2
          or getattr(st, "columns", None) is not None or getattr(st, "hessian", None) is None
          or (group_size is not None and w.shape[0] % group_size)):
        continue
      groups.setdefault((id(st.hessian), id(st.n), w.dtype), []).append((path, w))
    out = {}
    for group in groups.values():
      # Up to _FUSE_MAX_COLUMNS output columns per sweep (wider ones measured slower on CPU).
      chunks, cur = [], []
      for pw in group:
        if cur and sum(w.shape[1] for _, w in cur) + pw[1].shape[1] > _FUSE_MAX_COLUMNS:
          chunks.append(cur)
          cur = []
        cur.append(pw)
      chunks.append(cur)
      out.update(solve_chunks([c for c in chunks if len(c) > 1], stats))
    return out

  def solve_chunks(chunks, stats) -> dict:
    out = {}
    for members in chunks:
      h = stats[members[0][0]].gptq_hessian()
      if not bool(jnp.all(jnp.isfinite(h))) or not all(
          bool(jnp.all(jnp.isfinite(w))) for _, w in members):
        continue  # the per-leaf path raises its clear error
      qs, info = quant_fused([w for _, w in members], h)
      if not jnp.isfinite(info["loss"]):
        raise ValueError(f"{name} at parameters {[p for p, _ in members]}: the GPTQ solver's "
                         "loss is not finite (a degenerate Hessian?)")
      out.update({p: q for (p, _), q in zip(members, qs)})
    return out

  def make_fn(solved: dict):
    def fn(path, w, stats):
      if path in solved:
        return solved[path]
      return solve_one(w, stats)
    return fn

  def solve_one(w, stats):
    sparse = _sparse_input(w, "gptq")
    if group_size is not None and w.shape[0] % group_size:
      rtn_core.quantize_rtn(jax.ShapeDtypeStruct(w.shape, w.dtype), bits=bits,
                            group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    if sparse is None and getattr(stats, "columns", None) is not None:
      # On a mesh: each device solves its share of the output columns (same codes).
      q, info = gptq_core.gptq_quantize(
          w, stats.gptq_hessian(), bits=bits, group_size=group_size, symmetric=symmetric,
          scale_dtype=scale_dtype, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
          static_groups=static_groups, split=stats.columns)
    elif sparse is None:
      q, info = quant(w, stats.gptq_hessian())
    if sparse is None:
      if not isinstance(info["loss"], jax.core.Tracer) and not jnp.isfinite(info["loss"]):
        raise ValueError("the GPTQ solver's loss is not finite (a degenerate Hessian?)")
      return q
    # Sparse input: GPTQ with the mask fixed (SparseGPT's joint sparsify-and-quantize).
    gs = group_size or w.shape[0]
    keep = sparse.keep_mask()
    codes, scale, zero, _ = quant_masked(sparse.materialize(), stats.gptq_hessian(), keep)
    if isinstance(sparse, NMSparse):
      ccodes, _ = compact_nm(codes, keep, n=sparse.n, m=sparse.m)
      values = QuantizedArray.from_codes(ccodes, scale, zero, bits=bits,
                                         group_size=gs * sparse.n // sparse.m,
                                         symmetric=bool(symmetric), dtype=sparse.dtype)
      return dataclasses.replace(sparse, values=values)
    return BitmaskSparse.from_codes(codes, keep, scale, zero, bits=bits, group_size=gs,
                                    symmetric=bool(symmetric), dtype=sparse.dtype, nnz=sparse.nnz)

  per_leaf = leafwise(make_fn({}), where, name=name, with_stats=True)

  def update(params, state, stats=None):
    solved = shared_input_solves(params, state.paths, stats)
    return leafwise(make_fn(solved), where, name=name, with_stats=True).update(params, state,
                                                                                stats)

  return Transform(per_leaf.init, update)


def spqr(bits: int = 3, group_size: int = 16, *, symmetric: bool = False,
         stats_bits: int | None = 3, stats_group_size: int = 16,
         outlier_threshold: float = 0.2, scale_dtype=jnp.float16, blocksize: int = 128,
         percdamp: float = 0.01, where: Selector = DEFAULT_WHERE) -> Transform:
  """SpQR: GPTQ with small groups, quantized statistics and sparse ``float16`` outliers.

  Produces ``SumArray((QuantizedArray, SparseOutliers))`` leaves (see
  :func:`compressjax.quantize.spqr_quantize` for the arguments); needs calibration statistics.

  References:
    Dettmers et al. 2023, SpQR (arXiv:2306.03078).
  """
  check_grid_args("spqr", bits, group_size, blocksize=blocksize, percdamp=percdamp)
  kw = dict(bits=bits, group_size=group_size, symmetric=symmetric, stats_bits=stats_bits,
            stats_group_size=stats_group_size, outlier_threshold=outlier_threshold,
            scale_dtype=scale_dtype, blocksize=blocksize, percdamp=percdamp)
  return _hessian_leafwise(spqr_core.spqr_quantize, kw, where,
                           f"spqr(bits={bits}, group_size={group_size})",
                           multiple=stats_group_size if stats_bits else 1)


def _hessian_leafwise(quantize, kw, where, name, multiple: int = 1) -> Transform:
  """A leaf-wise transform calling ``quantize(w, H, **kw) -> (leaf, info)`` with GPTQ's ``H``.

  On a mesh (``stats.columns``) ``quantize`` gets ``split=``: each device solves its share of
  the output columns, in multiples of ``multiple`` (SpQR's second-level groups); a kernel whose
  columns do not split so is solved whole.
  """

  def fn(path, w, stats):
    del path
    _check_dense_2d(w, name.split("(")[0])
    split = getattr(stats, "columns", None)
    if split is not None and w.shape[1] % (split.size * multiple):
      split = None
    leaf, _ = quantize(w, stats.gptq_hessian(), **kw, split=split)
    return leaf

  return leafwise(fn, where, name=name, with_stats=True)


def owq(bits: int, group_size: int | None = None, *, symmetric: bool = True,
        keep_fraction: float = 0.01, n_keep: int | None = None, scale_dtype=jnp.float16,
        blocksize: int = 128, percdamp: float = 0.01,
        where: Selector = DEFAULT_WHERE) -> Transform:
  """OWQ: GPTQ with the most sensitive input rows kept in ``float16``.

  Produces ``SumArray((QuantizedArray, KeptRows))`` leaves (see
  :func:`compressjax.quantize.owq_quantize`); needs calibration statistics.

  References:
    Lee et al. 2024, OWQ (arXiv:2306.02272).
  """
  check_grid_args("owq", bits, group_size, blocksize=blocksize, percdamp=percdamp)
  kw = dict(bits=bits, group_size=group_size, symmetric=symmetric, keep_fraction=keep_fraction,
            n_keep=n_keep, scale_dtype=scale_dtype, blocksize=blocksize, percdamp=percdamp)
  return _hessian_leafwise(spqr_core.owq_quantize, kw, where,
                           f"owq(bits={bits}, group_size={group_size})")
