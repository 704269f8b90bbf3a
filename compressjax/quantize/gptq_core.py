"""GPTQ: second-order, error-compensating quantization of one weight. Pure math on arrays.

No trees, configs, calibration or parameter paths here (the transform that
wires GPTQ into a model collects ``H`` and calls :func:`gptq_quantize`); only
functions of one ``(K, N)`` weight and its ``(K, K)`` input Hessian proxy.

The problem (Frantar et al. 2022, eq. 1): for a linear layer with calibration
inputs ``X`` (``n`` tokens by ``K`` input features), find quantized ``Q``
minimizing ``||X W - X Q||_F^2``; its Hessian with respect to each output
column is ``H = 2 X^T X`` (we take ``H = 2 X^T X / n``; the scale cancels).

Layout and transposition. The paper (and IST-DASLab ``gptq.py``, qwix
``gptq_core.py``) write the weight as ``W_paper`` of shape ``(rows, columns) =
(out, in)`` and quantize it *column by column*, a column being one input
feature. compressjax kernels are ``W`` of shape ``(K, N) = (in, out)``, i.e.
``W = W_paper^T``; so here a paper column ``W_paper[:, i]`` is our row
``W[i, :]``, and every column operation of the paper becomes the same row
operation here:

==========================================  ===========================================
paper / reference, ``W_paper`` (out, in)    here, ``W`` (K, N) = (in, out)
==========================================  ===========================================
``w = W1[:, i]``                            ``w = W1[i]``
``W1[:, i:] -= outer(err1, Hinv1[i, i:])``  ``W1[i:] -= outer(Hinv1[i, i:], err1)``
``W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]``    ``W[i2:] -= Hinv[i1:i2, i2:]^T @ Err1``
==========================================  ===========================================

``H``, ``Hinv`` (the upper Cholesky factor of ``H^{-1}``), ``d = Hinv[i, i]``
and ``blocksize`` are indexed by input feature in both layouts and need no
transposition.

Algorithm (paper, Algorithm 1), with the reference's preparation. Steps 1-3 are the shared OBS
solver :mod:`compressjax.quantize.obs_core` (``drop_dead``, ``hinv_cholesky``, ``sweep``); this
module supplies GPTQ's rounding rule (grids, SpQR outliers, OWQ kept rows, a fixed mask):

1. Dead inputs (``H[i, i] == 0``: the feature is always zero) get
   ``H[i, i] = 1`` and ``W[i, :] = 0``.
2. Damping ``H += damp * I`` with ``damp = percdamp * mean(diag(H))``;
   ``Hinv = cholesky(H^{-1}, upper=True)``. If that Cholesky fails (``H`` not
   numerically positive definite), ``percdamp`` is raised tenfold and the
   factorization retried (see :data:`DAMP_RETRIES`); the damping used is
   reported. If every retry fails (e.g. ``H`` holds NaNs), ``Hinv = I``, which
   makes GPTQ plain RTN, and ``info["cholesky_ok"]`` is ``False``.
3. Lazy batch updates: for each block of ``blocksize`` rows ``[i1, i2)``, for
   each row ``i`` of the block, quantize ``w = W[i]`` to the RTN grid of its
   group (``q``), set ``err1 = (w - q) / d`` and apply the OBS update
   ``W[i:i2] -= outer(Hinv[i, i:i2], err1)`` inside the block; after the block,
   ``W[i2:] -= Hinv[i1:i2, i2:]^T @ Err1`` in one matmul. This equals the
   unblocked recursion ``W[i+1:] -= outer(Hinv[i, i+1:], err1)`` (implemented
   directly by :func:`gptq_reference`).
4. ``Losses = (w - q)^2 / d^2 / 2``, summed into ``info["loss"]``.

Grids. Each group's grid (``scale``/``zero`` of :func:`rtn_core.rtn_params`,
stored in ``scale_dtype``) is computed when the quantizer reaches the group's
first row, from the *current*, error-updated rows of the group (all updates of
earlier rows applied). IST-DASLab ``gptq.py`` and qwix read those rows from
the weight as of the start of the current block, missing updates pending inside
the block; the two agree whenever ``group_size`` is a multiple of
``blocksize``, and ours does not depend on ``blocksize``. With
``static_groups=True`` all grids are computed up front from the original
weight. Codes and the ``q`` used for the error feedback are computed against
the stored ``scale_dtype`` values, so ``QuantizedArray.materialize()`` returns
exactly the ``Q`` the algorithm used.

Activation order (``act_order=True``, the reference's ``actorder``): rows are
processed in order of decreasing ``diag(H)``, then codes are put back in the
original row order, so the output is a normal :class:`QuantizedArray` whose
groups are contiguous ranges of original rows (the packed format and its
matmul are unchanged). This needs ``static_groups=True`` when
``group_size < K``: groups formed on the fly in the permuted order are not
contiguous in the original order and cannot be stored, so that combination
raises a ``ValueError``. Per-channel (``group_size=None``) has a single group
and needs no ``static_groups``.

References:
  Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers", ICLR 2023,
  arXiv:2210.17323 (Algorithm 1; Cholesky reformulation, lazy batch updates).
  Frantar, Singh, Alistarh, "Optimal Brain Compression", NeurIPS 2022,
  arXiv:2208.11580 (the OBS update). IST-DASLab ``gptq/gptq.py``
  (``fasterquant``: dead inputs, ``percdamp``, ``actorder``,
  ``static_groups``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats.quantized import QuantizedArray
from compressjax.formats.quantized import dequantize
from compressjax.quantize import obs_core
from compressjax.quantize import rtn_core
from compressjax.quantize.rtn_core import quantize_codes
from compressjax.quantize.rtn_core import rtn_params

# The paper's variable names (H, Hinv, W, Q, Err1, ...) are kept on purpose.
# pylint: disable=invalid-name

__all__ = ["DAMP_RETRIES", "gptq_quantize", "gptq_quantize_fused", "gptq_masked",
           "gptq_reference"]

DAMP_RETRIES = obs_core.DAMP_RETRIES


def _check_args(W, H, bits, group_size, blocksize, percdamp, act_order, static_groups) -> int:
  """Validates arguments; returns the resolved group size."""
  rtn_core._check_bits(bits)  # pylint: disable=protected-access
  rtn_core._check_weight(W)  # pylint: disable=protected-access
  k = W.shape[0]
  gs = rtn_core._resolve_group_size(group_size, k)  # pylint: disable=protected-access
  if getattr(H, "ndim", None) != 2 or tuple(H.shape) != (k, k):
    raise ValueError(f"H must be the (K, K) = ({k}, {k}) input Hessian of W with shape "
                     f"{tuple(W.shape)}, got H.shape={getattr(H, 'shape', None)}.")
  if not jnp.issubdtype(H.dtype, jnp.floating):
    raise ValueError(f"H must have a floating dtype, got {H.dtype}.")
  if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
    raise ValueError(f"blocksize must be a positive int, got blocksize={blocksize!r}.")
  if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not (
      percdamp >= 0 and np.isfinite(percdamp)):
    raise ValueError(f"percdamp must be a finite float >= 0, got percdamp={percdamp!r}.")
  if act_order and gs < k and not static_groups:
    raise ValueError(
        f"act_order=True with group_size={group_size} < K={k} requires static_groups=True: "
        "groups formed in activation order are not contiguous in the original row order, "
        "which QuantizedArray cannot store. Pass static_groups=True (grids computed up front "
        "from the original weight) or use act_order=False.")
  return gs


# ----------------------------------------------------------------------------------------
# Lazy-batch GPTQ (jitted).
# ----------------------------------------------------------------------------------------


def stats_roundtrip(S: jax.Array, *, stats_bits: int, stats_group_size: int,
                    scale_dtype: Any) -> jax.Array:
  """SpQR's second quantization level: decodes ``S`` ``(G, N)`` after quantizing its transpose.

  Each first-level statistic (a group's scale or zero) is quantized to ``stats_bits`` with an
  asymmetric min/max grid shared by ``stats_group_size`` consecutive *output* channels, whose own
  scale and zero are stored in ``scale_dtype``. This is exactly what
  ``Transposed(quantize_rtn(S.T, ...)).materialize()`` returns (same functions, same order).
  """
  codes, s2, z2 = rtn_core.rtn_codes(S.T.astype(jnp.float32), bits=stats_bits,
                                     group_size=stats_group_size, symmetric=False,
                                     scale_dtype=scale_dtype)
  n, g = codes.shape
  deq = dequantize(codes.reshape(n // stats_group_size, stats_group_size, g), s2[:, None, :],
                   z2[:, None, :], bits=stats_bits, symmetric=False)
  return deq.reshape(n, g).astype(jnp.float32).T


def _fit_grid(rows, mask, *, bits, symmetric, dtype):
  """Grid ``(scale, zero)`` of one group's rows ``(gs, N)`` in ``dtype``, ignoring ``mask``.

  Ignored entries are replaced by the mean of the group's other entries of the same column (the
  SpQR reference's "fit the quantizer without the outliers") before the RTN grid is fitted.
  ``zero`` is all zeros for the symmetric grid.
  """
  if mask is not None:
    keep = jnp.logical_not(mask).astype(rows.dtype)
    mean = jnp.sum(rows * keep, 0) / jnp.maximum(jnp.sum(keep, 0), 1.0)
    rows = jnp.where(mask, mean[None, :], rows)
  s, z = rtn_params(rows[None], bits=bits, symmetric=symmetric, scale_dtype=dtype)
  return s[0], (jnp.zeros_like(s[0]) if z is None else z[0])


def _loo_outlier_mask(rows, dinv, threshold, *, bits, symmetric):
  """SpQR's leave-one-out test: which weights of a group ``(gs, N)`` are likely outliers.

  For each weight, the grid is refitted without it; its "usefulness" is how much the
  Hessian-weighted error ``sum(((w - q) / d)^2)`` of the rest of its group drops compared with
  quantizing the whole group. Weights whose drop exceeds ``threshold`` are excluded from fitting
  the group's grid.
  """
  gs, N = rows.shape
  idx = jnp.asarray(np.array([[b for b in range(gs) if b != a] for a in range(gs)], np.int32))
  loo = rows[idx]  # (gs, gs - 1, N)
  def err(w, dw):
    s, z = rtn_params(w, bits=bits, symmetric=symmetric, scale_dtype=jnp.float32)
    zb = None if z is None else z[:, None, :]
    q = dequantize(quantize_codes(w, s[:, None, :], zb, bits=bits, symmetric=symmetric),
                   s[:, None, :], zb, bits=bits, symmetric=symmetric)
    return jnp.sum(((q - w) * dw)**2, axis=1)
  base_err = err(rows[None], dinv[None, :, None])  # (1, N)
  loo_err = err(loo, dinv[idx][:, :, None])  # (gs, N)
  return (base_err - loo_err) > threshold


@functools.partial(
    jax.jit,
    static_argnames=("bits", "group_size", "symmetric", "scale_dtype", "blocksize", "percdamp",
                     "act_order", "static_groups", "with_q", "outlier_threshold", "stats_bits",
                     "stats_group_size", "axis_name"))
def _gptq(W, H, keep=None, prune=None, *, bits, group_size, symmetric, scale_dtype, blocksize,
          percdamp, act_order, static_groups, with_q, outlier_threshold=float("inf"),
          stats_bits=0, stats_group_size=16, axis_name=None):
  """Lazy-batch GPTQ on validated arguments (``group_size`` resolved, ``<= K``).

  Extensions shared by SpQR and OWQ (all off by default, giving plain GPTQ):

  * ``outlier_threshold`` (relative, finite = on): SpQR's unstructured outliers. A weight whose
    Hessian-weighted error ``((w - q) / d)^2`` exceeds ``outlier_threshold * mean_k(var_n(W[k]) /
    d_k^2)`` keeps its exact (error-updated) value; when grids are fitted on the fly they first
    leave out likely outliers (leave-one-out test).
  * ``stats_bits`` (> 0 = on): SpQR's bilevel statistics; every scale and zero is passed through
    :func:`stats_roundtrip` before it is used.
  * ``keep`` ``(K,)`` bool (not ``None`` = on): OWQ's weak input rows, processed *last* and kept
    at their error-updated values, so they absorb the error of all quantized rows; they are left
    out of the grids (which must be static: ``static_groups`` or per-channel).
  * ``prune`` ``(K, N)`` bool (not ``None`` = on): a fixed sparsity mask (``True`` = pruned) that
    quantization preserves, as SparseGPT's joint mode: pruned weights are forced to exactly 0 (their
    error is fed back like a quantization error) and left out of the grids.

  Returns ``(codes, scale, zero, Q, resid, info)``; ``Q`` (the weight the algorithm used, original
  row order) is ``None`` unless ``with_q``; ``resid`` (``Q`` minus the decoded codes: non-zero
  only at outliers and kept rows) is ``None`` unless outliers or ``keep`` are on. With
  ``stats_bits``, ``scale``/``zero`` are the float32 first-level statistics *before* the second
  level (what :func:`stats_roundtrip` and the stored format quantize).

  With ``axis_name`` (inside :func:`_gptq_split`'s ``shard_map``), ``W`` is this device's output
  columns: the loss and outlier count are summed over the devices, SpQR's outlier threshold is
  computed from all columns (gathered once), everything else is per column already.
  """
  K, N = W.shape
  gs = group_size
  G = K // gs
  ctype = base.accumulation_dtype(W.dtype, H.dtype)
  W = W.astype(ctype)
  H = H.astype(ctype)
  outliers = outlier_threshold != float("inf")
  track_resid = outliers or keep is not None
  # First-level statistics as stored (float32 when a second level quantizes them) ...
  sdt = jnp.float32 if stats_bits else scale_dtype
  fit_grid = functools.partial(_fit_grid, bits=bits, symmetric=symmetric, dtype=sdt)

  def level2(s, z):
    """... and as used: after SpQR's second quantization level (unchanged without it)."""
    if not stats_bits:
      return s, z
    qq = lambda a: stats_roundtrip(a.reshape(-1, N), stats_bits=stats_bits,
                                   stats_group_size=stats_group_size,
                                   scale_dtype=scale_dtype).reshape(a.shape)
    return qq(s), (z if symmetric else qq(z))

  # 1. Dead inputs.
  W, H, dead = obs_core.drop_dead(W, H)

  # Grids known up front: static groups, or the single per-channel group (whose
  # grid "at its first row" is that of the unmodified W).
  upfront = static_groups or gs == K
  kmask = None if keep is None else jnp.broadcast_to(keep[:, None], (K, N))
  if prune is not None:
    kmask = prune if kmask is None else jnp.logical_or(kmask, prune)
  if upfront:
    # First-level statistics as stored, and as used (after level 2).
    wg = W.reshape(G, gs, N)
    if kmask is None:
      scale_all, zero_all = jax.vmap(lambda r: fit_grid(r, None))(wg)
    else:
      scale_all, zero_all = jax.vmap(fit_grid)(wg, kmask.reshape(G, gs, N))
    use_scale_all, use_zero_all = level2(scale_all, zero_all)

  # Activation order: permute rows of W and rows/cols of H (kept rows go last).
  order = -jnp.diag(H) if act_order else jnp.arange(K, dtype=ctype)
  if keep is not None:
    perm = jnp.lexsort((order, keep.astype(jnp.int32)))
  elif act_order:
    perm = jnp.argsort(order, stable=True)
  else:
    perm = jnp.arange(K)
  permuted = act_order or keep is not None
  if permuted:
    W = W[perm]
    H = H[perm][:, perm]
  pruned = None if prune is None else (prune[perm] if permuted else prune)
  kept_row = (jnp.zeros((K,), bool) if keep is None else keep[perm])

  # 2. Damping and Cholesky of the inverse.
  Hinv, percdamp_used, damp, ok = obs_core.hinv_cholesky(H, percdamp)
  dinv_all = jnp.diag(Hinv)
  if outliers:
    # SpQR: the threshold is relative to the mean Hessian-weighted weight variance.
    Wall = obs_core.gather_columns(W, axis_name)  # the variance runs over all output columns
    tau = outlier_threshold * jnp.mean(jnp.var(Wall, axis=1, ddof=1) / dinv_all**2)
    del Wall
  else:
    tau = jnp.asarray(jnp.inf, ctype)

  # Padding rows (obs_core.sweep pads K to a multiple of the block size): the rule sees them at
  # j >= K; they belong to no group and keep nothing exactly.
  Kp = obs_core.padded_length(K, blocksize)
  if Kp != K:
    perm = jnp.concatenate([perm, jnp.arange(K, Kp)])
    kept_row = jnp.concatenate([kept_row, jnp.zeros((Kp - K,), bool)])
    if pruned is not None:
      pruned = jnp.pad(pruned, ((0, Kp - K), (0, 0)))
  group_of_row = jnp.minimum(perm // gs, G - 1)  # original group of each processed row

  def grid_at(j, rows_fn):
    """Grid of the group starting at row ``j`` from its current (fully updated) rows.

    Returns the statistics to use and the ones to store (equal without level 2).
    """
    rows = rows_fn(j, gs)
    mask = None if pruned is None else jax.lax.dynamic_slice_in_dim(pruned, j, gs, axis=0)
    if outliers:
      dinv = 1.0 / jax.lax.dynamic_slice_in_dim(dinv_all, j, gs)
      loo = _loo_outlier_mask(rows, dinv, tau, bits=bits, symmetric=symmetric)
      mask = loo if mask is None else jnp.logical_or(loo, mask)
    s_raw, z_raw = fit_grid(rows, mask)
    return (*level2(s_raw, z_raw), s_raw, z_raw)

  def rule(st, carry):
    """GPTQ's rounding of one row (``obs_core.sweep`` does the error feedback)."""
    codes, Rbuf, n_out, scale_g, zero_g, scales, zeros = carry
    j = st.j
    if upfront:
      g = group_of_row[j]
      scale_g, zero_g = use_scale_all[g], use_zero_all[g]
    else:
      new_group = jnp.logical_and(j % gs == 0, j < K)
      scale_g, zero_g, s_raw, z_raw = jax.lax.cond(
          new_group, lambda: grid_at(j, st.rows),
          lambda: (scale_g, zero_g, scales[jnp.minimum(j // gs, G - 1)],
                   zeros[jnp.minimum(j // gs, G - 1)]))
      g = jnp.minimum(j // gs, G - 1)
      scales = jax.lax.dynamic_update_index_in_dim(scales, s_raw, g, axis=0)
      zeros = jax.lax.dynamic_update_index_in_dim(zeros, z_raw, g, axis=0)
    zero_arg = None if symmetric else zero_g
    w = st.w[0]
    d = st.U[0, 0]
    q = dequantize(quantize_codes(w, scale_g, zero_arg, bits=bits, symmetric=symmetric),
                   scale_g, zero_arg, bits=bits, symmetric=symmetric).astype(ctype)
    if track_resid:
      # Outliers (SpQR) and kept rows (OWQ) keep w exactly; their code is that of 0.
      exact = jnp.logical_or(((w - q) / d)**2 > tau, kept_row[j])
      code = quantize_codes(jnp.where(exact, jnp.zeros((), ctype), w), scale_g, zero_arg,
                            bits=bits, symmetric=symmetric)
      qb = dequantize(code, scale_g, zero_arg, bits=bits, symmetric=symmetric).astype(ctype)
      q = jnp.where(exact, w, qb)
      Rbuf = jax.lax.dynamic_update_index_in_dim(Rbuf, q - qb, j, axis=0)
      n_out = n_out + jnp.sum(jnp.logical_and(exact, jnp.logical_not(kept_row[j])))
    else:
      code = quantize_codes(w, scale_g, zero_arg, bits=bits, symmetric=symmetric)
    if pruned is not None:
      q = jnp.where(pruned[j], jnp.zeros((), ctype), q)
    codes = jax.lax.dynamic_update_index_in_dim(codes, code, j, axis=0)
    return q[None], (codes, Rbuf, n_out, scale_g, zero_g, scales, zeros)

  codes = jnp.zeros((Kp, N), jnp.uint8)
  Rbuf = jnp.zeros((Kp, N), ctype) if track_resid else jnp.zeros((), ctype)
  scale_g = jnp.zeros((N,), sdt)
  scales = jnp.zeros((G, N), sdt)
  init = (codes, Rbuf, jnp.zeros((), jnp.int32), scale_g, scale_g, scales, scales)
  Qbuf, (codes, Rbuf, n_out, _, _, scales, zeros), loss = obs_core.sweep(
      W, Hinv, rule, init, blocksize=blocksize, keep_values=with_q)

  if upfront:
    scales, zeros = scale_all, zero_all
  zero = None if symmetric else zeros
  codes = codes[:K]
  Q = Qbuf  # None unless with_q
  R = Rbuf[:K] if track_resid else None
  if permuted:
    invperm = jnp.argsort(perm[:K])
    codes = codes[invperm]
    Q = None if Q is None else Q[invperm]
    R = None if R is None else R[invperm]
  info = {
      "loss": obs_core.psum(loss, axis_name),
      "damp": damp,
      "percdamp": percdamp_used,
      "dead": jnp.sum(dead.astype(jnp.int32)),
      "cholesky_ok": ok,
      "outliers": obs_core.psum(n_out, axis_name),
  }
  return codes, scales, zero, Q, R, info


def _gptq_split(W, H, keep=None, prune=None, *, split: obs_core.ColumnSplit | None, **kw):
  """:func:`_gptq` with ``W``'s output columns split over ``split`` (``None``: one device).

  Each device runs the same recursion on its columns with the replicated ``H`` (see
  :mod:`compressjax.quantize.obs_core`); codes, scales, zeros, ``Q`` and residuals come back
  split over the same axes, the info scalars replicated.
  """
  if split is None:
    return _gptq(W, H, keep, prune, **kw)
  obs_core.check_split(W.shape[1], split, "GPTQ",
                       kw.get("stats_group_size", 1) if kw.get("stats_bits") else 1)
  cols, rep = "cols", None
  fn = obs_core.split_columns(
      functools.partial(_gptq, axis_name=split.axis, **kw), split,
      in_specs=(cols, rep, rep, cols), out_specs=(cols, cols, cols, cols, cols, rep))
  col, rep = split.sharding(), split.replicated()
  return jax.jit(fn)(obs_core.place(W, col), obs_core.place(H, rep), obs_core.place(keep, rep),
                     obs_core.place(prune, col))


def gptq_quantize(W: jax.Array, H: jax.Array, *, bits: int, group_size: int | None = None,
                  symmetric: bool = True, scale_dtype: Any = jnp.float16, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, split: obs_core.ColumnSplit | None = None
                  ) -> tuple[QuantizedArray, dict[str, jax.Array]]:
  """GPTQ-quantizes a ``(K, N)`` weight given its input Hessian ``H``.

  Implements Algorithm 1 of Frantar et al. 2022 with lazy batch updates (see
  the module docstring for the row/column transposition, grids and activation
  order). Jittable (all keyword arguments are static): compiles once per shape
  and configuration; the inner recursion runs as ``lax.fori_loop`` over blocks
  and rows.

  Args:
    W: floating weight of shape ``(K, N)`` (``(in, out)``, ``y = x @ W``).
    H: input Hessian proxy ``2 X^T X / n`` of shape ``(K, K)`` (``X`` the
      ``(n, K)`` calibration inputs of this layer), floating (``float32``).
    bits: code width, one of ``(2, 3, 4, 8)``.
    group_size: rows per group along ``K``; ``None`` means per-channel
      (``group_size = K``). Must divide ``K``.
    symmetric: symmetric (GPTQ) or asymmetric min/max (``Q4_1``) grid, as
      :func:`~compressjax.quantize.quantize_rtn`.
    scale_dtype: dtype in which ``scale``/``zero`` are stored and used.
    blocksize: rows per lazy batch update (the paper's ``B``); a performance
      knob only, the result does not depend on it beyond float rounding.
    percdamp: damping ``H += percdamp * mean(diag(H)) * I``; raised tenfold
      (up to :data:`DAMP_RETRIES` attempts) while the Cholesky factorization
      fails.
    act_order: process rows in order of decreasing ``diag(H)`` (reference
      ``actorder``); the output keeps the original row order. With
      ``group_size < K`` this requires ``static_groups=True``.
    static_groups: compute every group's grid up front from the original
      weight instead of from the error-updated rows when the group is reached.
    split: solve with ``W``'s output columns split over mesh axes
      (:class:`~compressjax.quantize.obs_core.ColumnSplit`; e.g.
      ``obs_core.column_split(W)`` of a column-sharded ``W``): each device runs the recursion on
      its ``N / devices`` columns with the replicated ``H``, giving the same codes and scales as
      one device; the result's children are split as
      :func:`compressjax.formats.partition_specs` gives for ``P(None, axis)``. ``None``: one
      device. Not jittable (it places arrays); the one-device path is.

  Returns:
    ``(qw, info)``: the :class:`QuantizedArray` (logical dtype ``W.dtype``)
    whose ``materialize()`` is exactly the ``Q`` GPTQ computed, and ``info``, a
    dict of scalars: ``loss`` (the reference's ``sum(Losses)``, i.e.
    ``sum((w - q)^2 / d^2) / 2``), ``damp`` (the absolute damping added to
    ``diag(H)``), ``percdamp`` (the relative damping that succeeded),
    ``dead`` (number of dead input rows, ``H[i, i] == 0``) and
    ``cholesky_ok`` (``False`` if every damping failed and RTN was used).

  Raises:
    ValueError: if ``bits``, ``group_size`` (names ``K`` and the valid sizes),
      ``blocksize``, ``percdamp`` or the shapes of ``W``/``H`` are invalid, or
      for ``act_order`` with ``group_size < K`` and ``static_groups=False``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> X = jax.random.normal(jax.random.key(0), (256, 64))
    >>> W = jax.random.normal(jax.random.key(1), (64, 8))
    >>> qw, info = gptq_quantize(W, 2 * X.T @ X / 256, bits=4, group_size=32, blocksize=16)
    >>> qw
    QuantizedArray(shape=(64, 8), dtype=float32, bits=4, group_size=32, symmetric=True)
    >>> int(info["dead"]), bool(info["cholesky_ok"]), round(float(info["percdamp"]), 6)
    (0, True, 0.01)
    >>> from compressjax.quantize import quantize_rtn
    >>> out_err = lambda qa: float(jnp.linalg.norm(X @ (W - qa.materialize())))
    >>> out_err(qw) < out_err(quantize_rtn(W, bits=4, group_size=32))
    True

  References:
    Frantar et al., "GPTQ", arXiv:2210.17323, Algorithm 1.
  """
  gs = _check_args(W, H, bits, group_size, blocksize, percdamp, act_order, static_groups)
  codes, scale, zero, _, _, info = _gptq_split(
      W, H, split=split, bits=bits, group_size=gs, symmetric=bool(symmetric),
      scale_dtype=scale_dtype, blocksize=blocksize, percdamp=float(percdamp),
      act_order=bool(act_order), static_groups=bool(static_groups), with_q=False)
  qw = QuantizedArray.from_codes(codes, scale, zero, bits=bits, group_size=gs,
                                 symmetric=bool(symmetric), dtype=W.dtype)
  return obs_core.place_leaf(qw, split), info


def gptq_quantize_fused(Ws, H: jax.Array, *, bits: int, group_size: int | None = None,
                        symmetric: bool = True, scale_dtype: Any = jnp.float16,
                        blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                        static_groups: bool = False
                        ) -> tuple[list[QuantizedArray], dict[str, jax.Array]]:
  """GPTQ of several weights that read the same input (one ``H``), solved as one.

  Linears sharing an input (a block's q/k/v or gate/up projections) have the same Hessian, and
  every step of GPTQ acts on the output columns independently given ``H`` (module docstring;
  the grids are per output column, act-order's permutation depends only on ``H``). So their
  kernels ``(K, N_i)`` are concatenated along the outputs and solved in one recursion: one
  damping and factorisation of ``H``, one column loop over ``K`` rows instead of one per
  weight. The codes and scales equal :func:`gptq_quantize` of each weight alone (tested
  bit-identical on CPU; the float32 arithmetic per column is the same); ``info["loss"]`` is the
  sum of the weights' losses. Arguments as :func:`gptq_quantize` (one device).

  Returns:
    ``(qws, info)``: one :class:`QuantizedArray` per weight, in order, and the info dict.
  """
  Ws = list(Ws)
  if not Ws:
    raise ValueError("gptq_quantize_fused: Ws must hold at least one (K, N) weight")
  k = getattr(Ws[0], "shape", (None,))[0]
  for i, W in enumerate(Ws):
    if getattr(W, "ndim", None) != 2 or W.shape[0] != k or W.dtype != Ws[0].dtype:
      raise ValueError(f"gptq_quantize_fused: Ws[{i}] must be a (K={k}, N) weight of dtype "
                       f"{Ws[0].dtype} like Ws[0], got shape {getattr(W, 'shape', None)} and "
                       f"dtype {getattr(W, 'dtype', None)}")
  W = jnp.concatenate(Ws, axis=1)
  gs = _check_args(W, H, bits, group_size, blocksize, percdamp, act_order, static_groups)
  codes, scale, zero, _, _, info = _gptq(
      W, H, bits=bits, group_size=gs, symmetric=bool(symmetric), scale_dtype=scale_dtype,
      blocksize=blocksize, percdamp=float(percdamp), act_order=bool(act_order),
      static_groups=bool(static_groups), with_q=False)
  out, start = [], 0
  for Wi in Ws:
    cols = slice(start, start + Wi.shape[1])
    start += Wi.shape[1]
    out.append(QuantizedArray.from_codes(codes[:, cols], scale[:, cols],
                                         None if zero is None else zero[:, cols], bits=bits,
                                         group_size=gs, symmetric=bool(symmetric),
                                         dtype=Wi.dtype))
  return out, info


def gptq_masked(W: jax.Array, H: jax.Array, keep: jax.Array, *, bits: int,
                group_size: int | None = None, symmetric: bool = True,
                scale_dtype: Any = jnp.float16, blocksize: int = 128, percdamp: float = 0.01,
                act_order: bool = False, static_groups: bool = False):
  """GPTQ that preserves a sparsity mask (SparseGPT's joint sparsify-and-quantize step).

  Weights where ``keep`` is ``False`` are forced to exactly zero, their error is compensated by
  the OBS update like any quantization error, and they are left out of every group's grid.
  Arguments as :func:`gptq_quantize`.

  Returns:
    ``(codes, scale, zero, info)``: ``uint8`` ``(K, N)`` codes on the dense grouped grid (codes
    of pruned entries are meaningless), ``(G, N)`` scales/zeros and the info dict.
  """
  gs = _check_args(W, H, bits, group_size, blocksize, percdamp, act_order, static_groups)
  keep = jnp.asarray(keep, bool)
  if tuple(keep.shape) != tuple(W.shape):
    raise ValueError(f"keep must have the shape of W {tuple(W.shape)}, got {tuple(keep.shape)}")
  codes, scale, zero, _, _, info = _gptq(
      W, H, None, jnp.logical_not(keep), bits=bits, group_size=gs, symmetric=bool(symmetric),
      scale_dtype=scale_dtype, blocksize=blocksize, percdamp=float(percdamp),
      act_order=bool(act_order), static_groups=bool(static_groups), with_q=False)
  return codes, scale, zero, info


# ----------------------------------------------------------------------------------------
# Slow reference (NumPy, float64, no lazy batching).
# ----------------------------------------------------------------------------------------


def gptq_reference(W, H, *, bits: int, group_size: int | None = None, symmetric: bool = True,
                   scale_dtype: Any = jnp.float16, percdamp: float = 0.01,
                   act_order: bool = False,
                   static_groups: bool = False) -> tuple[QuantizedArray, dict[str, Any]]:
  """Slow, direct GPTQ in NumPy ``float64``, for tests of :func:`gptq_quantize`.

  No lazy batching: after quantizing row ``i`` it applies the OBS update
  ``W[i+1:] -= outer(Hinv[i, i+1:] / Hinv[i, i], w - q)`` to all later rows at
  once (Frantar et al. 2022, eq. 2 with the Cholesky rows of ``H^{-1}``).
  Grids use the same :func:`rtn_core.rtn_params` / :func:`rtn_core.quantize_codes`
  as :func:`gptq_quantize`. Same arguments (minus ``blocksize``) and outputs;
  ``info`` also holds ``"q"``, the ``float64`` ``Q`` (original row order).
  """
  _check_args(W, H, bits, group_size, 1, percdamp, act_order, static_groups)
  W = np.array(W, np.float64)
  H = np.array(H, np.float64)
  K, N = W.shape
  gs = K if group_size is None else group_size
  G = K // gs

  def grid(rows):
    s, z = rtn_params(jnp.asarray(rows)[None], bits=bits, symmetric=symmetric,
                      scale_dtype=scale_dtype)
    return s[0], (None if z is None else z[0])

  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[dead] = 0
  upfront = static_groups or gs == K  # per-channel: one group, its grid is that of W
  grids = [grid(W[g * gs:(g + 1) * gs]) for g in range(G)] if upfront else [None] * G
  perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(K)
  W = W[perm]
  H = H[perm][:, perm]

  mean_diag = np.mean(np.diag(H))
  Hinv = np.eye(K)
  ok = False
  for t in range(DAMP_RETRIES):
    used = obs_core.percdamp_schedule(float(percdamp), t)
    damp = used * mean_diag
    try:
      Hinv = np.linalg.cholesky(np.linalg.inv(H + damp * np.eye(K))).T  # upper
    except np.linalg.LinAlgError:
      continue
    if np.all(np.isfinite(Hinv)):
      ok = True
      break
  if not ok:
    Hinv = np.eye(K)

  codes = np.zeros((K, N), np.uint8)
  Q = np.zeros((K, N))
  loss = 0.0
  for i in range(K):
    if upfront:
      s, z = grids[perm[i] // gs]
    elif i % gs == 0:
      s, z = grids[i // gs] = grid(W[i:i + gs])  # current, error-updated rows of the group
    w = W[i]
    code = quantize_codes(jnp.asarray(w), s, z, bits=bits, symmetric=symmetric)
    q = np.asarray(dequantize(code, s, z, bits=bits, symmetric=symmetric), np.float64)
    d = Hinv[i, i]
    codes[i], Q[i] = np.asarray(code), q
    loss += float(np.sum((w - q)**2) / d**2 / 2)
    W[i + 1:] -= np.outer(Hinv[i, i + 1:] / d, w - q)

  invperm = np.argsort(perm)
  scale = jnp.stack([s for s, _ in grids])
  zero = None if symmetric else jnp.stack([z for _, z in grids])
  qw = QuantizedArray.from_codes(jnp.asarray(codes[invperm]), scale, zero, bits=bits,
                                 group_size=gs, symmetric=symmetric, dtype=jnp.float32)
  info = {"loss": loss, "damp": damp, "percdamp": used, "dead": int(dead.sum()),
          "cholesky_ok": ok, "q": Q[invperm]}
  return qw, info
