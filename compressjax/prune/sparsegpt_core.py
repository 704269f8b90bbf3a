"""SparseGPT: OBS mask selection and weight reconstruction for one layer. Pure math on arrays.

The problem (Frantar & Alistarh 2023): for a linear layer with calibration inputs ``X``, find a
mask ``M`` of the target sparsity and weights ``W'`` on it minimizing ``||X W - X (M * W')||^2``.
SparseGPT solves it approximately in one pass over the input features, with the same machinery
as GPTQ (:mod:`compressjax.quantize.gptq_core`): ``H = 2 X^T X / n``, dead inputs, damping,
``Hinv`` the upper Cholesky factor of ``H^{-1}``, lazy batch updates. The paper's columns are
our rows (kernels are ``(K, N) = (in, out)``; see gptq_core's table).

Per block of ``blocksize`` rows ``[i1, i2)`` (Algorithm 1, "adaptive mask selection"):

* unstructured: the mask of the whole block is chosen when the block starts, from the
  *current* (error-updated) weights, pruning the ``sparsity`` fraction with the smallest OBS
  saliency ``w^2 / Hinv[i, i]^2`` across the block's rows and all outputs;
* N:M: at every ``m``-th row, the ``m - n`` entries of smallest saliency among the next ``m``
  rows of each output column are pruned (exactly ``n`` kept per group).

Then row by row, the pruned entries are zeroed, ``err = (w - q) / d`` and the OBS update
``W[i:i2] -= outer(Hinv[i, i:i2], err)`` is applied; after the block,
``W[i2:] -= Hinv[i1:i2, i2:]^T @ Err``. That recursion is the shared OBS solver
(:func:`compressjax.quantize.obs_core.sweep`); this module supplies the mask choice (at block
start, or every ``m`` rows) and the rule "zero the pruned entries".

References:
  Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
  ICML 2023, arXiv:2301.00774 (Algorithm 1); IST-DASLab ``sparsegpt/sparsegpt.py``
  (``fasterprune``: ``blocksize``, ``percdamp``, ``prunen``/``prunem``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.prune import masks
from compressjax.quantize import obs_core

# The paper's variable names (H, Hinv, W, Err1, ...) are kept on purpose.
# pylint: disable=invalid-name

__all__ = ["sparsegpt_prune", "sparsegpt_reference"]


def _check(W, H, blocksize, percdamp, sparsity, nm):
  if getattr(W, "ndim", None) != 2:
    raise ValueError(f"W must be a 2-D (K, N) kernel, got shape {getattr(W, 'shape', None)}")
  k = W.shape[0]
  if getattr(H, "ndim", None) != 2 or tuple(H.shape) != (k, k):
    raise ValueError(f"H must be the (K, K) = ({k}, {k}) input Hessian of W with shape "
                     f"{tuple(W.shape)}, got H.shape={getattr(H, 'shape', None)}")
  if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
    raise ValueError(f"blocksize must be a positive int, got blocksize={blocksize!r}")
  if not (isinstance(percdamp, (int, float)) and percdamp >= 0 and np.isfinite(percdamp)):
    raise ValueError(f"percdamp must be a finite float >= 0, got percdamp={percdamp!r}")
  if nm is None:
    masks.check_sparsity(sparsity)
  else:
    n, m = masks.check_nm(*nm, k)
    if min(blocksize, k) % m:
      raise ValueError(f"blocksize={blocksize} must be a multiple of m={m} for N:M pruning")


@functools.partial(jax.jit, static_argnames=("sparsity", "nm", "blocksize", "percdamp",
                                             "axis_name"))
def _sparsegpt(W, H, *, sparsity, nm, blocksize, percdamp, axis_name=None):
  """SparseGPT on validated arguments; with ``axis_name`` (inside ``shard_map``) ``W`` is this
  device's output columns: the unstructured block mask is chosen from all devices' saliencies
  (gathered, ranked as on one device, this device's columns kept), N:M masks are per column."""
  K, N = W.shape
  ctype = base.accumulation_dtype(W.dtype, H.dtype)
  W, H, dead = obs_core.drop_dead(W.astype(ctype), H.astype(ctype))
  Hinv, percdamp_used, damp, ok = obs_core.hinv_cholesky(H, percdamp)
  B = min(blocksize, K)
  Kp = obs_core.padded_length(K, blocksize)
  real = jnp.arange(Kp) < K  # padding rows (added by obs_core.sweep) are never pruned
  d_all = jnp.pad(jnp.diag(Hinv), (0, Kp - K), constant_values=1)  # as sweep pads Hinv

  def block_start(i1, W1, Hinv11, keep):
    """Unstructured: the whole block's mask, from its current rows' OBS saliency."""
    if nm is not None:
      return keep
    d = jnp.diag(Hinv11)
    real1 = jax.lax.dynamic_slice_in_dim(real, i1, B)
    sal = obs_core.gather_columns(jnp.where(real1[:, None], W1**2 / d[:, None]**2, jnp.inf),
                                  axis_name)  # the whole block, all outputs
    n_prune = jnp.round(sparsity * jnp.sum(real1) * sal.shape[1]).astype(jnp.int32)
    kb = obs_core.local_columns(jnp.logical_not(masks.smallest(sal, n_prune)), N, axis_name)
    return jax.lax.dynamic_update_slice_in_dim(keep, kb, i1, axis=0)

  def rule(st, keep):
    """Zero the pruned entries of one row (N:M: choose the next ``m`` rows' mask first)."""
    if nm is not None:
      n, m = nm

      def choose(keep):
        rows = jax.lax.dynamic_slice_in_dim(st.block, st.i, m, axis=0)
        dd = jax.lax.dynamic_slice_in_dim(d_all, st.j, m)
        kg = masks.ranks(rows**2 / dd[:, None]**2, axis=0) >= m - n
        return jax.lax.dynamic_update_slice_in_dim(keep, kg, st.j, axis=0)

      keep = jax.lax.cond(st.i % m == 0, choose, lambda k: k, keep)
    return jnp.where(keep[st.j], st.w[0], jnp.zeros((), ctype))[None], keep

  W, keep, loss = obs_core.sweep(W, Hinv, rule, jnp.ones((Kp, N), bool), blocksize=blocksize,
                                 block_start=block_start)
  keep = keep[:K]
  info = {"loss": obs_core.psum(loss, axis_name), "damp": damp, "percdamp": percdamp_used,
          "cholesky_ok": ok,
          "dead": jnp.sum(dead.astype(jnp.int32))}
  return W, keep, info


def sparsegpt_prune(W: jax.Array, H: jax.Array, *, sparsity: float = 0.5,
                    pattern: str | None = None, blocksize: int = 128,
                    percdamp: float = 0.01, split: obs_core.ColumnSplit | None = None
                    ) -> tuple[jax.Array, jax.Array, dict]:
  """Prunes a ``(K, N)`` weight with SparseGPT given its input Hessian ``H = 2 X^T X / n``.

  Args:
    W: floating ``(K, N)`` kernel.
    H: ``(K, K)`` input Hessian proxy (as for GPTQ).
    sparsity: fraction pruned (unstructured; ignored with ``pattern``).
    pattern: ``None`` (unstructured) or ``"n:m"`` (n kept of every m input rows, e.g. ``"2:4"``).
    blocksize: rows per adaptive-mask block and lazy batch update (the paper's ``B_s = 128``).
    percdamp: relative damping of ``H`` (raised tenfold while the Cholesky fails, as in GPTQ).
    split: solve with ``W``'s output columns split over mesh axes
      (:class:`~compressjax.quantize.obs_core.ColumnSplit`, e.g. ``obs_core.column_split(W)``):
      each device reconstructs its columns with the replicated ``H``; the unstructured mask of
      each block is chosen from the saliencies of all columns (one all-gather of the block's
      ``(blocksize, N)`` saliencies per block), N:M masks per column, so the result equals one
      device's; ``W_pruned`` and ``keep`` come back split the same way. ``None``: one device.

  Returns:
    ``(W_pruned, keep, info)``: the reconstructed weights (zero where pruned, ``W.dtype``), the
    boolean keep mask and scalars ``loss`` (sum of ``(w - q)^2 / d^2 / 2``), ``damp``,
    ``percdamp``, ``cholesky_ok``, ``dead``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> X = jax.random.normal(jax.random.key(0), (256, 64))
    >>> W = jax.random.normal(jax.random.key(1), (64, 8))
    >>> Wp, keep, info = sparsegpt_prune(W, 2 * X.T @ X / 256, pattern="2:4", blocksize=16)
    >>> bool((keep.reshape(16, 4, 8).sum(1) == 2).all())
    True
  """
  nm = masks.parse_pattern(pattern)
  _check(W, H, blocksize, percdamp, sparsity, nm)
  kw = dict(sparsity=float(sparsity), nm=nm, blocksize=int(blocksize), percdamp=float(percdamp))
  if split is None:
    Wp, keep, info = _sparsegpt(W, H, **kw)
  else:
    obs_core.check_split(W.shape[1], split, "SparseGPT")
    fn = obs_core.split_columns(functools.partial(_sparsegpt, axis_name=split.axis, **kw), split,
                                in_specs=("cols", None), out_specs=("cols", "cols", None))
    Wp, keep, info = jax.jit(fn)(obs_core.place(W, split.sharding()),
                                 obs_core.place(H, split.replicated()))
  return Wp.astype(W.dtype), keep, info


def sparsegpt_reference(W, H, *, sparsity: float = 0.5, pattern: str | None = None,
                        blocksize: int = 128, percdamp: float = 0.01):
  """Slow NumPy ``float64`` SparseGPT (no lazy batching: every OBS update applied to all later
  rows at once), for tests of :func:`sparsegpt_prune`. Same arguments and outputs."""
  nm = masks.parse_pattern(pattern)
  _check(W, H, blocksize, percdamp, sparsity, nm)
  W = np.array(W, np.float64)
  H = np.array(H, np.float64)
  K, N = W.shape
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[dead] = 0
  Hinv, _, _, _ = obs_core.hinv_cholesky(jnp.asarray(H, jnp.float32), float(percdamp))
  Hinv = np.array(Hinv, np.float64)
  keep = np.ones((K, N), bool)
  B = min(blocksize, K)
  for i1 in range(0, K, B):
    i2 = min(i1 + B, K)
    d = np.diag(Hinv)[i1:i2]
    if nm is None:
      sal = W[i1:i2] ** 2 / d[:, None] ** 2
      n_prune = int(np.round(sparsity * (i2 - i1) * N))
      order = np.argsort(sal.reshape(-1), kind="stable")
      blk = np.ones(sal.size, bool)
      blk[order[:n_prune]] = False
      keep[i1:i2] = blk.reshape(sal.shape)
    for i in range(i1, i2):
      if nm is not None and (i - i1) % nm[1] == 0:
        n, m = nm
        sal = W[i:i + m] ** 2 / np.diag(Hinv)[i:i + m, None] ** 2
        r = np.argsort(np.argsort(sal, axis=0, kind="stable"), axis=0, kind="stable")
        keep[i:i + m] = r >= m - n
      w = W[i].copy()
      q = np.where(keep[i], w, 0.0)
      err = (w - q) / Hinv[i, i]
      W[i:] -= np.outer(Hinv[i, i:], err)
      W[i] = q
  return np.where(keep, W, 0.0), keep
