"""Low-rank transforms (tree wiring; the math lives in :mod:`compressjax.factorize`).

* :func:`svd` plain truncated SVD (data-free) at a rank or a parameter fraction, per layer or
  with ranks allocated across all selected layers under one budget;
* :func:`asvd` the activation-aware (whitened) variant: the best rank-r factors in output error
  on the calibration inputs (SVD-LLM / ASVD style), budgets allocated within each block;
* :func:`eora` wraps any compressing transform (quantizer, pruner or chain) and adds a rank-r
  correction of what it changed, fitted in the activations' eigenspace;
* :func:`lq_lora` quantized + low-rank decomposition by alternation.

Results are :class:`~compressjax.formats.LowRank` leaves (factors stored in ``factor_dtype``, or
as RTN codes with ``factor_bits``) or
``SumArray((base, LowRank))`` for compensated / decomposed weights.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import formats
from compressjax.factorize import lowrank_core
from compressjax.formats import LowRank, SumArray
from compressjax.quantize import rtn_core
from compressjax.transforms.base import (DEFAULT_WHERE, PLANNING, Transform, _map, _real_stats,
                                         _visible, leafwise, leaves_with_paths_marked)
from compressjax.transforms.quantize import (SUPPORTED_BITS, _check_dense_2d, check_damping,
                                             check_grid_args)
from compressjax.transforms.selection import Selector

__all__ = ["svd", "asvd", "eora", "lq_lora"]


def _check_rank(rank: int, shape) -> int:
  """``rank`` if a ``(K, N)`` kernel has it (``rank <= min(K, N)``); never clamped silently."""
  if rank > min(shape):
    raise ValueError(f"rank {rank} exceeds min(K, N) = {min(shape)} of the kernel's shape "
                     f"{tuple(shape)}")
  return int(rank)


def _rank(shape, rank, keep_fraction):
  k, n = shape
  if rank is not None:
    return _check_rank(rank, (k, n))
  return lowrank_core.rank_for_fraction(k, n, keep_fraction)


def _check_budget(name, rank, keep_fraction):
  if (rank is None) == (keep_fraction is None):
    raise ValueError(f"{name}: give exactly one of rank= or keep_fraction=, got rank={rank!r}, "
                     f"keep_fraction={keep_fraction!r}")
  if rank is not None and (not isinstance(rank, int) or rank < 1):
    raise ValueError(f"{name}: rank must be a positive int, got {rank!r}")
  if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"{name}: keep_fraction must be in (0, 1], got {keep_fraction!r}")


def _factor_store(name, factor_dtype, factor_bits, factor_group_size):
  """How factors are stored: ``factor_dtype`` floats, or (``factor_bits`` set) symmetric RTN codes
  with ``factor_dtype`` scales, in groups of ``factor_group_size`` along each factor's input
  dimension (per-channel where that dimension is not a multiple of it, e.g. ``B``'s rank rows).
  Returns ``store(a, b, dtype) -> LowRank``."""
  if factor_bits is not None and factor_bits not in SUPPORTED_BITS:
    raise ValueError(f"{name}: factor_bits must be None or one of {SUPPORTED_BITS}, "
                     f"got {factor_bits!r}")
  if factor_group_size is not None and (not isinstance(factor_group_size, int)
                                        or factor_group_size < 1):
    raise ValueError(f"{name}: factor_group_size must be None or a positive int, "
                     f"got {factor_group_size!r}")

  def quantize(f):
    g = factor_group_size
    g = g if g is not None and f.shape[0] % g == 0 else None
    return rtn_core.quantize_rtn(f.astype(jnp.float32), bits=factor_bits, group_size=g,
                                 scale_dtype=factor_dtype)

  def store(a, b, dtype):
    if factor_bits is None:
      return LowRank(a.astype(factor_dtype), b.astype(factor_dtype), dtype=dtype)
    return LowRank(quantize(a), quantize(b), dtype=dtype)

  return store


def _budgeted(name, with_stats, rank, keep_fraction, allocate, store, where, percdamp):
  """Per-leaf factorization, or ranks allocated across the leaves one update sees."""
  _check_budget(name, rank, keep_fraction)
  check_damping(name, percdamp)

  def hess(stats):
    return None if stats is None else stats.hessian

  def fn(path, w, *st):
    del path
    _check_dense_2d(w, name)
    r = _rank(w.shape, rank, keep_fraction)
    a, b = lowrank_core.factorize(w, r, hess(st[0]) if st else None, percdamp)
    return store(a, b, w.dtype)

  per_leaf = leafwise(fn, where, name=name, with_stats=with_stats)
  if not allocate:
    return per_leaf

  def update(params, state, stats=None):
    if stats is PLANNING or (with_stats and not _real_stats(stats)):
      return per_leaf.update(params, state, stats)  # shapes of the uniform budget
    sel = set(state.paths)
    leaves = {p: w for p, w in leaves_with_paths_marked(params) if p in sel and _visible(w)}
    if not leaves:
      return params, state
    h = {}
    for p, w in leaves.items():
      _check_dense_2d(w, name)
      if with_stats:
        if p not in stats:
          raise ValueError(f"{name} at parameter {p!r} needs calibration statistics")
        h[p] = stats[p].hessian
      else:
        h[p] = None
    spectra = {p: np.asarray(lowrank_core.spectrum(w, h[p], percdamp)) for p, w in leaves.items()}
    shapes = {p: tuple(w.shape) for p, w in leaves.items()}
    budget = sum(_rank(s, rank, keep_fraction) * (s[0] + s[1]) for s in shapes.values())
    ranks = lowrank_core.allocate_ranks(spectra, shapes, budget)
    new = {}
    for p, w in leaves.items():
      a, b = lowrank_core.factorize(w, ranks[p], h[p], percdamp)
      new[p] = store(a, b, w.dtype)
    return _map(lambda p, x: new.get(p, x), params), state

  # svd ranks one budget across every selected kernel; asvd's (with statistics) within a block.
  return Transform(per_leaf.init, update, scope="block" if with_stats else "global")


def svd(rank: int | None = None, *, keep_fraction: float | None = None, allocate: bool = False,
        factor_dtype: Any = jnp.float16, factor_bits: int | None = None,
        factor_group_size: int | None = 64, where: Selector = DEFAULT_WHERE) -> Transform:
  """Truncated SVD ``W ~ A @ B`` of the selected kernels (data-free).

  Args:
    rank: the rank of every kernel; or
    keep_fraction: the fraction of each kernel's parameters the factors may hold
      (``r (K + N) <= keep_fraction K N``).
    allocate: spend the same total budget with per-layer ranks allocated greedily on relative
      energy across all selected kernels (:func:`compressjax.factorize.allocate_ranks`).
    factor_dtype: dtype of the stored factors (of their scales with ``factor_bits``).
    factor_bits: store the factors as RTN codes of this many bits (2, 3, 4 or 8) instead of
      floats; ``factor_group_size`` rows per scale along each factor's input dimension
      (per-channel where that dimension is not a multiple of it). The budget (``rank`` /
      ``keep_fraction``) counts factor parameters, not bits.
    where: which parameters (default: the decoder's linear kernels).

  References:
    Eckart & Young 1936.
  """
  store = _factor_store("svd", factor_dtype, factor_bits, factor_group_size)
  return _budgeted("svd", False, rank, keep_fraction, allocate, store, where, 0.0)


def asvd(rank: int | None = None, *, keep_fraction: float | None = None, allocate: bool = False,
         percdamp: float = 1e-4, factor_dtype: Any = jnp.float16, factor_bits: int | None = None,
         factor_group_size: int | None = 64, where: Selector = DEFAULT_WHERE) -> Transform:
  """Activation-aware SVD: the rank-r factors minimizing ``||X W - X A B||`` on the calibration
  inputs (whitening by ``X^T X``). Arguments as :func:`svd`; with ``allocate`` the ranks are
  allocated across the kernels of each block (the calibration engine shows one block at a time).
  Needs calibration statistics.

  References:
    Wang et al. 2024, SVD-LLM (arXiv:2403.07378); Yuan et al. 2023, ASVD (arXiv:2312.05821).
  """
  store = _factor_store("asvd", factor_dtype, factor_bits, factor_group_size)
  return _budgeted("asvd", True, rank, keep_fraction, allocate, store, where, percdamp)


def eora(base: Transform, rank: int, *, percdamp: float = 1e-4,
         factor_dtype: Any = jnp.float16, factor_bits: int | None = None,
         factor_group_size: int | None = 64) -> Transform:
  """EoRA: runs ``base`` (any compressing transform) and adds to every leaf it changed a rank-r
  correction of its residual in the activations' eigenspace: ``SumArray((base_leaf, LowRank))``.

  ``eora(gptq(3, 64), 32)`` is GPTQ then EoRA; ``eora(chain(sparsegpt(pattern="2:4"), ...), 16)``
  compensates a whole chain. Needs calibration statistics (the layer inputs' ``X^T X``).
  ``factor_bits`` stores the correction's factors as RTN codes (as :func:`svd`); EoRA reports
  4-bit factors losing little against float16 ones.

  References:
    Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace
    Low-Rank Approximation", arXiv:2410.21271.
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"eora: rank must be a positive int, got {rank!r}")
  check_damping("eora", percdamp)
  store = _factor_store("eora", factor_dtype, factor_bits, factor_group_size)

  def update(params, state, stats=None):
    new_params, state = base.update(params, state, stats)
    before = dict(leaves_with_paths_marked(params))
    out = {}
    for p, leaf in leaves_with_paths_marked(new_params):
      old = before.get(p)
      if leaf is old or not _visible(leaf) or not isinstance(leaf, formats.CompressedArray):
        continue
      if getattr(old, "ndim", None) != 2 or isinstance(old, formats.CompressedArray):
        raise ValueError(f"eora at parameter {p!r}: the base transform's input must be a dense "
                         f"2-D kernel, got {type(old).__name__}")
      if stats is PLANNING:
        h = jnp.eye(old.shape[0], dtype=jnp.float32)
      else:
        st = (stats or {}).get(p)
        if st is None:
          raise ValueError(f"eora at parameter {p!r} needs calibration statistics")
        h = st.hessian
      try:
        r = _check_rank(rank, old.shape)
      except ValueError as e:
        raise ValueError(f"eora at parameter {p!r}: {e}") from e
      a, b = lowrank_core.eora_factors(old, leaf.materialize(), h, r, percdamp)
      out[p] = SumArray((leaf, store(a, b, old.dtype)), shape=old.shape,
                        dtype=old.dtype)
    return _map(lambda p, x: out.get(p, x), new_params), state

  return Transform(base.init, update, base.restat, base.scope)


def lq_lora(bits: int, group_size: int | None = None, rank: int = 32, *, iters: int = 5,
            symmetric: bool = True, scale_dtype: Any = jnp.float16,
            factor_dtype: Any = jnp.float16, factor_bits: int | None = None,
            factor_group_size: int | None = 64, data_aware: bool = True, percdamp: float = 1e-4,
            where: Selector = DEFAULT_WHERE) -> Transform:
  """Quantized + low-rank decomposition ``W ~ RTN(W - A B) + A B`` by alternation (LQ-LoRA's
  initialization), output-error weighted by ``X^T X`` when ``data_aware`` (needs calibration
  statistics then). The result is ``SumArray((QuantizedArray, LowRank))``. ``factor_bits``
  quantizes the final factors (as :func:`svd`) after the alternation.

  References:
    Guo et al. 2024, LQ-LoRA (arXiv:2311.12023).
  """
  check_grid_args("lq_lora", bits, group_size, percdamp=percdamp)
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"lq_lora: rank must be a positive int, got {rank!r}")
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
    raise ValueError(f"lq_lora: iters must be a positive int, got {iters!r}")
  store = _factor_store("lq_lora", factor_dtype, factor_bits, factor_group_size)
  quant = jax.jit(functools.partial(rtn_core.quantize_rtn, bits=bits, group_size=group_size,
                                    symmetric=symmetric, scale_dtype=scale_dtype))

  def fn(path, w, *st):
    del path
    _check_dense_2d(w, "lq_lora")
    r = _check_rank(rank, w.shape)
    h = st[0].hessian if st else None
    if isinstance(w, jax.core.Tracer):  # planning: shapes only
      q, a, b = quant(w), jnp.zeros((w.shape[0], r)), jnp.zeros((r, w.shape[1]))
    else:
      q, a, b, _ = lowrank_core.lq_decompose(w, quant, r, h, iters, percdamp)
    return SumArray((q, store(a, b, w.dtype)), shape=w.shape, dtype=w.dtype)

  return leafwise(fn, where, name=f"lq_lora(bits={bits}, rank={rank})", with_stats=data_aware)
