"""Pruning masks from importance scores: unstructured (per matrix or per output), N:M, LAMP.

Pure functions of arrays. Kernels are ``(K, N) = (in, out)``, so one *output* (a row of the
papers' ``(out, in)`` weight) is a column here, and N:M groups run along ``K`` (the input
dimension, as sparse tensor cores require).

Every mask keeps an exact count: ties are broken by position (a stable ranking), never by
``score > threshold``, so "every group of M has exactly N kept" holds for any input.

References:
  Han et al. 2015 (magnitude pruning); Sun et al. 2023, Wanda (arXiv:2306.11695: the
  ``|W| * ||X||`` score compared per output); Lee et al. 2021, LAMP (arXiv:2010.07611);
  Mishra et al. 2021 (2:4 sparsity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_sparsity", "check_nm", "ranks", "smallest", "unstructured_mask", "nm_mask",
           "wanda_score", "lamp_score", "parse_pattern", "global_threshold_masks"]


def check_sparsity(sparsity) -> float:
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
      0.0 < sparsity < 1.0):
    raise ValueError(f"sparsity must be a float in (0, 1), got sparsity={sparsity!r}")
  return float(sparsity)


def check_nm(n, m, k: int | None = None) -> tuple[int, int]:
  if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
    raise ValueError(f"N:M sparsity needs integers 0 < n < m, got n={n!r}, m={m!r}")
  if k is not None and k % m:
    raise ValueError(f"N:M sparsity {n}:{m} needs m={m} to divide the input width K={k}")
  return n, m


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
  """``None``/``"unstructured"`` -> ``None``; ``"2:4"`` -> ``(2, 4)`` (n kept of every m)."""
  if pattern in (None, "", "unstructured"):
    return None
  if isinstance(pattern, str) and ":" in pattern:
    a, b = pattern.split(":", 1)
    if a.strip().isdigit() and b.strip().isdigit():
      return check_nm(int(a), int(b))
  raise ValueError(f"pattern must be None, 'unstructured' or 'N:M' such as '2:4', got "
                   f"pattern={pattern!r}")


def ranks(score: jax.Array, axis: int | None = None) -> jax.Array:
  """Rank (0 = smallest) of each entry along ``axis`` (``None``: the whole array); stable."""
  if axis is None:
    flat = score.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(flat.size)).reshape(score.shape)
  order = jnp.argsort(score, axis=axis, stable=True)
  return jnp.argsort(order, axis=axis, stable=True)


def _sortable_key(score: jax.Array) -> jax.Array:
  """int32 keys ordered as the float32 values (``-0.0`` as ``0.0``; NaNs above ``+inf``)."""
  x = score.astype(jnp.float32)
  x = jnp.where(x == 0, jnp.zeros((), x.dtype), jnp.where(jnp.isnan(x), jnp.nan, x))
  b = jax.lax.bitcast_convert_type(x, jnp.int32)
  return b ^ ((b >> 31) & jnp.int32(0x7FFFFFFF))


def smallest(score: jax.Array, n) -> jax.Array:
  """Mask of the ``n`` smallest entries of ``score`` (ties: lower flat index first).

  Exactly ``ranks(score) < n`` (``n`` may be traced), without sorting: the ``n``-th smallest
  value is found by bisection over the 32-bit keys of the floats (33 counting passes), and ties
  at it are taken in flat order with a cumulative sum. A sort of a SparseGPT block's
  ``blocksize x N`` saliencies costs about ten times as much on CPU.
  """
  key = _sortable_key(score).reshape(-1)
  n = jnp.asarray(n, jnp.int32)

  def body(_, lohi):  # invariant: count(key <= lo) < n <= count(key <= hi)
    lo, hi = lohi
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
    enough = jnp.sum(key <= mid, dtype=jnp.int32) >= n
    return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

  i32 = jnp.iinfo(jnp.int32)
  _, v = jax.lax.fori_loop(0, 33, body, (jnp.asarray(i32.min, jnp.int32),
                                          jnp.asarray(i32.max, jnp.int32)))
  below = key < v
  at = key == v
  take = jnp.logical_or(below, jnp.logical_and(
      at, jnp.cumsum(at, dtype=jnp.int32) <= n - jnp.sum(below, dtype=jnp.int32)))
  return jnp.logical_and(take, n > 0).reshape(score.shape)


def unstructured_mask(score: jax.Array, sparsity: float, *, per_output: bool = False) -> jax.Array:
  """Keep mask pruning the ``round(sparsity * count)`` lowest scores.

  Args:
    score: ``(K, N)`` importance, larger is more important.
    sparsity: fraction to prune.
    per_output: compare within each output column (Wanda's comparison group; ``round(sparsity
      * K)`` pruned per column) instead of across the whole matrix.
  """
  sparsity = check_sparsity(sparsity)
  if per_output:
    n_prune = int(round(sparsity * score.shape[0]))
    return ranks(score, axis=0) >= n_prune
  n_prune = int(round(sparsity * score.size))
  return ranks(score) >= n_prune


def nm_mask(score: jax.Array, n: int, m: int) -> jax.Array:
  """Keep mask with exactly ``n`` kept (the largest scores) in every ``m`` consecutive rows."""
  k, cols = score.shape
  check_nm(n, m, k)
  r = ranks(score.reshape(k // m, m, cols), axis=1)
  return (r >= m - n).reshape(k, cols)


def wanda_score(w: jax.Array, sq_sum: jax.Array) -> jax.Array:
  """Wanda's ``|W_ij| * ||X_j||_2``; here ``(K, N)`` with the input norm along ``K``."""
  return jnp.abs(w) * jnp.sqrt(jnp.maximum(sq_sum, 0.0))[:, None]


def lamp_score(w: jax.Array) -> jax.Array:
  """LAMP score ``w_u^2 / sum_{v >= u} w_v^2`` (weights sorted by magnitude, ``v >= u`` the
  same or larger), comparable across layers: one global threshold gives layer-adaptive
  sparsities."""
  flat = jnp.square(w.reshape(-1).astype(jnp.float32))
  order = jnp.argsort(flat, stable=True)
  sorted_sq = flat[order]
  tail = jnp.cumsum(sorted_sq[::-1])[::-1]  # sum of this and all larger
  s = sorted_sq / jnp.maximum(tail, jnp.finfo(jnp.float32).tiny)
  return jnp.zeros_like(flat).at[order].set(s).reshape(w.shape)


def global_threshold_masks(scores: dict[str, jax.Array], sparsity: float) -> dict[str, jax.Array]:
  """Keep masks pruning the ``round(sparsity * total)`` lowest scores across all matrices."""
  sparsity = check_sparsity(sparsity)
  names = list(scores)
  flat = np.concatenate([np.asarray(scores[k], np.float32).reshape(-1) for k in names])
  n_prune = int(round(sparsity * flat.size))
  order = np.argsort(flat, kind="stable")
  keep = np.ones(flat.size, bool)
  keep[order[:n_prune]] = False
  out, start = {}, 0
  for k in names:
    size = int(np.prod(scores[k].shape))
    out[k] = jnp.asarray(keep[start:start + size].reshape(scores[k].shape))
    start += size
  return out
