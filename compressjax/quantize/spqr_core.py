"""SpQR and OWQ: GPTQ plus a few weights kept in higher precision. Pure math on arrays.

Both run the same jitted GPTQ recursion (:mod:`compressjax.quantize.gptq_core`) with one of its
extensions switched on, and both return the same kind of leaf: a
:class:`~compressjax.formats.SumArray` of the packed :class:`~compressjax.formats.QuantizedArray`
and a sparse term holding what is kept exactly.

* **SpQR** (Dettmers et al. 2023): small groups (``group_size=16``) whose scales and zeros are
  themselves quantized (``stats_bits=3`` in groups of ``stats_group_size=16`` output channels:
  a :class:`~compressjax.formats.Transposed` ``QuantizedArray`` of the statistics), and
  unstructured outliers: a weight whose Hessian-weighted GPTQ error ``((w - q) / d)^2`` exceeds
  ``outlier_threshold`` times the layer's mean ``var(W[k]) / d_k^2`` is kept in ``float16``
  (:class:`~compressjax.formats.SparseOutliers`, 32 bits per outlier plus column pointers).
  Each group's grid is fitted after leaving out its likely outliers (leave-one-out test).
* **OWQ** (Lee et al. 2024): the few input features ("weak columns" of the paper's
  ``(out, in)`` weight, rows here) with the largest sensitivity ``H_jj * ||W_j - RTN(W_j)||^2``
  are kept in ``float16`` (:class:`~compressjax.formats.KeptRows`); GPTQ quantizes the other
  rows first and lets the kept rows absorb the error.

Bits per parameter are counted from what is stored: codes, first- and second-level statistics,
outlier values, indices and pointers, kept rows and their indices.

References:
  Dettmers et al., "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight
  Compression", ICLR 2024, arXiv:2306.03078 (Algorithm 1; ``spqr_engine.py``: the outlier
  threshold scale, leave-one-out grid fitting, bilevel statistics).
  Lee et al., "OWQ: Outlier-Aware Weight Quantization for Efficient Fine-Tuning and Inference of
  Large Language Models", AAAI 2024, arXiv:2306.02272 (weak columns, kept last in GPTQ order).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import KeptRows, QuantizedArray, SparseOutliers, SumArray, Transposed
from compressjax.quantize import gptq_core, obs_core, rtn_core

# pylint: disable=invalid-name

__all__ = ["owq_quantize", "owq_sensitivity", "spqr_quantize"]


def _stats_leaf(S, *, stats_bits, stats_group_size, scale_dtype):
  """The stored form of first-level statistics ``S`` ``(G, N)``: quantized along ``N``."""
  return Transposed(rtn_core.quantize_rtn(jnp.asarray(S, jnp.float32).T, bits=stats_bits,
                                          group_size=stats_group_size, symmetric=False,
                                          scale_dtype=scale_dtype))


def spqr_quantize(W: jax.Array, H: jax.Array, *, bits: int = 3, group_size: int = 16,
                  symmetric: bool = False, stats_bits: int | None = 3,
                  stats_group_size: int = 16, outlier_threshold: float = 0.2,
                  scale_dtype: Any = jnp.float16, outlier_dtype: Any = jnp.float16,
                  blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                  split: obs_core.ColumnSplit | None = None,
                  ) -> tuple[SumArray | QuantizedArray, dict[str, Any]]:
  """SpQR-quantizes a ``(K, N)`` weight given its input Hessian ``H`` (not jittable: the
  number of outliers decides the shape of the result).

  Args:
    W, H: as :func:`~compressjax.quantize.gptq_quantize`.
    bits: code width of the weights.
    group_size: first-level group along ``K`` (SpQR's ``beta_1``; the paper uses 8-32).
    symmetric: first-level grid (SpQR uses asymmetric min/max).
    stats_bits: code width of the first-level scales and zeros (``None``: keep them in
      ``scale_dtype``, plain GPTQ statistics).
    stats_group_size: second-level group along ``N`` (``beta_2``); must divide ``N``.
    outlier_threshold: relative outlier threshold (``float("inf")``: no outliers).
    scale_dtype: dtype of the second-level statistics (or of the first-level ones without
      ``stats_bits``).
    outlier_dtype: dtype of the outlier values.
    blocksize, percdamp, act_order: as GPTQ; ``act_order`` needs ``group_size=None`` here,
      since groups must stay contiguous in the stored format.
    split: solve with ``W``'s output columns split over mesh axes
      (:class:`~compressjax.quantize.obs_core.ColumnSplit`), each device its own columns with
      the replicated ``H``; ``N`` must split in multiples of ``stats_group_size`` (the
      second-level groups run along the outputs and stay whole on one device). The outlier
      threshold is computed from all columns (gathered), so codes, statistics and outliers equal
      one device's. The packed codes and statistics come back split as
      :func:`compressjax.formats.partition_specs` gives for ``P(None, axis)``; the outliers (a
      flat CSC list, built on the host) replicated. ``None``: one device.

  Returns:
    ``(leaf, info)``: ``SumArray((QuantizedArray, SparseOutliers))`` (just the
    ``QuantizedArray`` if there are no outliers) and GPTQ's ``info`` plus ``outliers`` (count)
    and ``outlier_fraction``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> X = jax.random.normal(jax.random.key(0), (512, 64))
    >>> W = jax.random.normal(jax.random.key(1), (64, 32)).at[3, 5].set(40.0)
    >>> leaf, info = spqr_quantize(W, 2 * X.T @ X / 512, bits=3, group_size=16)
    >>> leaf
    SumArray(shape=(64, 32), dtype=float32, terms=(QuantizedArray, SparseOutliers))
    >>> bool(abs(leaf.materialize()[3, 5] - 40.0) < 0.05)
    True
  """
  if stats_bits is not None:
    rtn_core._check_bits(stats_bits)  # pylint: disable=protected-access
    n = W.shape[1]
    if (not isinstance(stats_group_size, int) or stats_group_size <= 0
        or n % stats_group_size):
      raise ValueError(f"stats_group_size must be a positive divisor of N={n} (statistics are "
                       f"grouped along the output dimension), got {stats_group_size!r}")
  if not (outlier_threshold > 0):
    raise ValueError(f"outlier_threshold must be > 0 (float('inf') disables outliers), got "
                     f"{outlier_threshold!r}")
  gs = gptq_core._check_args(W, H, bits, group_size, blocksize, percdamp, act_order,  # pylint: disable=protected-access
                             False)
  codes, scale, zero, _, resid, info = gptq_core._gptq_split(  # pylint: disable=protected-access
      W, H, split=split, bits=bits, group_size=gs, symmetric=bool(symmetric),
      scale_dtype=scale_dtype, blocksize=blocksize, percdamp=float(percdamp),
      act_order=bool(act_order), static_groups=False, with_q=False,
      outlier_threshold=float(outlier_threshold), stats_bits=int(stats_bits or 0),
      stats_group_size=int(stats_group_size))
  if stats_bits:
    sq = lambda S: _stats_leaf(S, stats_bits=stats_bits, stats_group_size=stats_group_size,
                               scale_dtype=scale_dtype)
    scale = sq(scale)
    zero = None if zero is None else sq(zero)
  base = QuantizedArray.from_codes(codes, scale, zero, bits=bits, group_size=gs,
                                   symmetric=bool(symmetric), dtype=W.dtype)
  info = dict(info)
  if isinstance(resid, jax.core.Tracer):  # planned on abstract arrays (``T.plan``): the number
    # of outliers depends on the data, so the plan has the structure with none of them.
    k, n = W.shape
    rows_dtype = np.uint16 if k <= 65536 else np.int32
    sparse = SparseOutliers(jnp.zeros((n + 1,), jnp.int32), jnp.zeros((0,), rows_dtype),
                            jnp.zeros((0,), outlier_dtype), shape=W.shape, dtype=W.dtype)
    return SumArray((base, sparse), shape=W.shape, dtype=W.dtype), info
  base = obs_core.place_leaf(base, split)
  resid = None if resid is None else np.asarray(obs_core.whole(resid, split))
  if resid is None or not np.any(resid):
    info["outlier_fraction"] = 0.0
    return base, info
  sparse = SparseOutliers.from_dense(resid, value_dtype=outlier_dtype, dtype=W.dtype)
  sparse = obs_core.place_leaf(sparse, split)
  info["outlier_fraction"] = sparse.nnz / (W.shape[0] * W.shape[1])
  return SumArray((base, sparse), shape=W.shape, dtype=W.dtype), info


def owq_sensitivity(W: jax.Array, H: jax.Array, *, bits: int, group_size: int | None = None,
                    symmetric: bool = True) -> jax.Array:
  """OWQ's per-input-feature sensitivity ``H_jj * ||W_j - RTN(W)_j||^2`` (``(K,)``)."""
  q = rtn_core.quantize_rtn(W, bits=bits, group_size=group_size, symmetric=symmetric,
                            scale_dtype=jnp.float32).materialize()
  return jnp.diag(H) * jnp.sum((W - q)**2, axis=1)


def owq_quantize(W: jax.Array, H: jax.Array, *, bits: int, group_size: int | None = None,
                 symmetric: bool = True, n_keep: int | None = None, keep_fraction: float = 0.01,
                 scale_dtype: Any = jnp.float16, keep_dtype: Any = jnp.float16,
                 blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                 split: obs_core.ColumnSplit | None = None
                 ) -> tuple[SumArray | QuantizedArray, dict[str, Any]]:
  """OWQ: GPTQ with the ``n_keep`` most sensitive input rows kept in ``keep_dtype``.

  Args:
    W, H, bits, symmetric, scale_dtype, blocksize, percdamp, act_order: as GPTQ.
    group_size: ``None`` (per-channel, as the paper) or a group size; grids are computed up
      front (static groups) without the kept rows, since those are processed last.
    n_keep: number of rows kept; default ``round(keep_fraction * K)``.
    keep_fraction: used when ``n_keep`` is ``None``.
    split: solve with ``W``'s output columns split over mesh axes
      (:class:`~compressjax.quantize.obs_core.ColumnSplit`). The kept rows are chosen first,
      from all outputs (the sensitivity of the whole ``W``, gathered, computed as on one device);
      then each device runs GPTQ on its own columns with the replicated ``H`` and rows, giving
      one device's codes, scales and kept values. The codes, scales and kept values come back
      split as :func:`compressjax.formats.partition_specs` gives for ``P(None, axis)``.

  Returns:
    ``(SumArray((QuantizedArray, KeptRows)), info)`` (the bare ``QuantizedArray`` if
    ``n_keep == 0``); ``info["kept_rows"]`` lists the kept input rows.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> X = jax.random.normal(jax.random.key(0), (512, 64)) * jnp.linspace(0.1, 3.0, 64)
    >>> W = jax.random.normal(jax.random.key(1), (64, 16))
    >>> leaf, info = owq_quantize(W, 2 * X.T @ X / 512, bits=3, n_keep=2)
    >>> leaf.terms[1]
    KeptRows(shape=(64, 16), dtype=float32, rows=2)
  """
  K = W.shape[0]
  if n_keep is None:
    if not (0 <= keep_fraction < 1):
      raise ValueError(f"keep_fraction must be in [0, 1), got {keep_fraction!r}")
    n_keep = int(round(keep_fraction * K))
  if isinstance(n_keep, bool) or not isinstance(n_keep, (int, np.integer)) or not (
      0 <= n_keep < K):
    raise ValueError(f"n_keep must be an int in [0, K={K}), got {n_keep!r}")
  gs = gptq_core._check_args(W, H, bits, group_size, blocksize, percdamp, act_order,  # pylint: disable=protected-access
                             True)
  # The rows are chosen from all outputs, before any split (the whole W, as one device has it).
  sens = owq_sensitivity(jnp.asarray(obs_core.whole(W, split), jnp.float32),
                         jnp.asarray(obs_core.whole(H, split), jnp.float32), bits=bits,
                         group_size=gs, symmetric=symmetric)
  # jnp (not numpy) so that planning on abstract arrays (``T.plan``) traces through.
  rows = jnp.sort(jnp.argsort(-sens, stable=True)[:n_keep]).astype(jnp.int32)
  keep = jnp.zeros((K,), bool).at[rows].set(True)
  codes, scale, zero, _, resid, info = gptq_core._gptq_split(  # pylint: disable=protected-access
      W, H, keep, split=split, bits=bits, group_size=gs, symmetric=bool(symmetric),
      scale_dtype=scale_dtype, blocksize=blocksize, percdamp=float(percdamp),
      act_order=bool(act_order), static_groups=True, with_q=False)
  base = QuantizedArray.from_codes(codes, scale, zero, bits=bits, group_size=gs,
                                   symmetric=bool(symmetric), dtype=W.dtype)
  info = dict(info, kept_rows=None if isinstance(rows, jax.core.Tracer) else rows.tolist())
  if n_keep == 0:
    return obs_core.place_leaf(base, split), info
  at = rows if split is None else obs_core.place(rows, split.replicated())  # beside resid
  kept = KeptRows(jnp.asarray(rows), jnp.asarray(resid)[at].astype(keep_dtype), shape=W.shape,
                  dtype=W.dtype)
  return obs_core.place_leaf(SumArray((base, kept), shape=W.shape, dtype=W.dtype), split), info
