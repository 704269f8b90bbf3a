"""GPTVQ: vector quantization with GPTQ-style error feedback. Pure math on arrays.

No trees, configs or calibration here; only functions of one ``(K, N)`` weight (``(in, out)``,
``y = x @ W``) and its ``(K, K)`` input Hessian proxy ``H = 2 X^T X / n``.

Vectors. A vector is ``d`` consecutive *input* rows of one output column, ``W[i:i + d, n]``
(the reference's ``vq_dim`` consecutive columns of one row of its ``(out, in)`` weight), with
``d`` in ``{1, 2, 4, 8}``. Codebooks have ``E = 2**(d * bits)`` entries (``bits`` = the paper's
bits per dimension; ``d * bits`` must be an integer ``<= 16``).

Codebook blocks (the reference's 2-D groups). One codebook serves a block of
``group_size`` input rows (the reference's ``columns_per_group``) by ``out_block`` outputs
(its ``rows_per_group``); ``out_block = N`` is one codebook per input group for all outputs.
A ``(K, N)`` weight has ``Gk x Gn = (K / group_size) x (N / out_block)`` codebooks.

Algorithm (van Baalen et al. 2024, Algorithm 1; reference ``gptq.py::GPTQ.fasterquant
(use_vq=True)``), on the shared OBS solver :mod:`compressjax.quantize.obs_core`:

1. Dead inputs and damping as GPTQ (``obs_core.drop_dead``, ``obs_core.hinv_cholesky``).
2. ``obs_core.sweep(..., step=d)``: ``d`` rows are rounded jointly and the block OBS update feeds
   their error into the remaining rows.
3. At the first step of each input group the group's codebooks are fitted on its *current*,
   error-updated rows (``Step.rows``): Mahalanobis initialisation (``mahalanobis_init``), then
   ``kmeans_iters`` Hessian-weighted k-means (EM) iterations, each vector coordinate ``k``
   weighted by ``1 / Hinv[k, k]**2`` (the OBS loss of rounding it alone; the reference passes
   ``diag(Hinv)`` to the fit and ``1 / diag(Hinv)`` to the assignments). Centroids are then
   rounded to ``codebook_bits``-bit integers with one symmetric scale per codebook
   (``quantize_centroids``), stored as ``float16``; codes and the error feedback use exactly
   the decoded centroids.
4. Each step assigns every vector ``w`` (``d`` rows of one output) the codeword ``c``
   minimising the step's exact OBS loss ``||U^{-T} (w - c)||^2``, ``U`` the step's ``d x d``
   block of ``Hinv`` (for ``d = 1`` this is ``(w - c)^2 / Hinv[k, k]^2``).
5. Optional codebook M-step (the reference's ``lut_m_step``): with the assignments fixed, Adam
   on the float centroids against ``tr((W - Q)^T H (W - Q))`` (``H`` undamped), kept only if it
   lowers that loss, then the centroids are rounded to integers again.

Split over a mesh (``gptvq_quantize(split=...)``, :mod:`compressjax.quantize.obs_core`): a
codebook is shared by the ``out_block`` outputs (and ``group_size`` rows) of its block, so it is
the *output* axis the codebooks are shared over; with ``W``'s output columns split over the
devices each device sees, per input group, the vectors of its own columns. What is local:
the OBS recursion and its error feedback (per output column, ``Hinv`` replicated), every
assignment (E-step, and the exact-loss assignment of each step), the decoding. What is
all-reduced (``psum``): the k-means M-step's weighted sums and weights per centroid (each
device scatters its partial sums into the ``(Gn, E, d)`` codebooks and the sums are added over
the devices, so every device holds the same centroids), the M-step's (``lut_m_step``) gradient
and losses, and the reported losses. What is computed on gathered data: the Mahalanobis
initialisation (it picks the points at evenly spaced ranks of a sort over all the vectors of a
codebook), so each group's rows ``(group_size, N)`` are all-gathered once and every device runs
the one-device initialisation on them (bit-for-bit the same centroids). A device's columns may
straddle codebooks (``N / devices`` not a multiple of ``out_block``): it works on "slots", the
codebooks its columns touch, with the foreign columns of a slot weighted 0. When every
device's columns hold whole codebooks the sums come from one device only and the split equals
one device's bit for bit; otherwise the sums are added in another order (float32 rounding; the
codes then agree except at exact ties).

References:
  van Baalen, Kuzmin, Nagel, Couperus, Bastoul, Mahurin, Blankevoort, Whatmough, "GPTVQ: The
  Blessing of Dimensionality for LLM Quantization", arXiv:2402.15319 (Algorithm 1, eq. 4-6).
  Frantar et al., "GPTQ", arXiv:2210.17323 (the OBS recursion and lazy batches).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.quantize import obs_core

# The papers' variable names (H, Hinv, W, C, ...) are kept on purpose.
# pylint: disable=invalid-name

__all__ = ["VQ_DIMS", "assign", "check_vq_args", "codebook_entries", "decode", "gptvq_quantize",
           "kmeans", "lut_m_step", "mahalanobis_init", "output_loss", "quantize_centroids",
           "vq_kmeans_quantize"]

#: Vector dimensions GPTVQ supports.
VQ_DIMS = (1, 2, 4, 8)


def codebook_entries(dim: int, bits: float) -> int:
  """``2**(dim * bits)``, the number of codewords (``dim * bits`` must be an integer)."""
  return 2**int(round(dim * bits))


def check_vq_args(K: int, N: int, *, dim: int, bits: float, group_size: int | None,
                  out_block: int | None, codebook_bits: int = 8, kmeans_iters: int = 10,
                  blocksize: int = 128, name: str = "gptvq") -> tuple[int, int]:
  """Validates GPTVQ's static arguments for a ``(K, N)`` weight; returns ``(gs, ob)``."""
  if dim not in VQ_DIMS:
    raise ValueError(f"{name}: dim must be one of {VQ_DIMS}, got {dim!r}")
  cb = dim * bits
  if not isinstance(bits, (int, float)) or isinstance(bits, bool) or bits <= 0 or (
      abs(cb - round(cb)) > 1e-9) or not 1 <= round(cb) <= 16:
    raise ValueError(f"{name}: bits (per dimension) must make dim * bits an integer in 1..16 "
                     f"(dim={dim}), got bits={bits!r}")
  if not isinstance(codebook_bits, int) or not 2 <= codebook_bits <= 8:
    raise ValueError(f"{name}: codebook_bits must be an int in 2..8, got {codebook_bits!r}")
  if not isinstance(kmeans_iters, int) or kmeans_iters < 0:
    raise ValueError(f"{name}: kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
  gs = K if group_size is None else group_size
  ob = N if out_block is None else out_block
  if gs <= 0 or K % gs or gs % dim:
    raise ValueError(f"{name}: group_size={group_size} must divide K={K} and be a multiple of "
                     f"dim={dim}")
  if ob <= 0 or N % ob:
    raise ValueError(f"{name}: out_block={out_block} must divide N={N}")
  if min(blocksize, K) % dim:
    raise ValueError(f"{name}: blocksize={blocksize} must be a multiple of dim={dim}")
  return gs, ob


# ----------------------------------------------------------------------------------------
# Layout helpers: a group of rows <-> per-codebook vector sets.
# ----------------------------------------------------------------------------------------


def _to_vectors(rows: jax.Array, d: int, ob: int) -> jax.Array:
  """``(gs, N)`` rows -> ``(Gn, gs / d * ob, d)`` vectors, grouped by codebook."""
  gs, N = rows.shape
  x = rows.reshape(gs // d, d, N // ob, ob)
  return x.transpose(2, 0, 3, 1).reshape(N // ob, (gs // d) * ob, d)


def _num_slots(n_local: int, ob: int, n_dev: int) -> int:
  """How many codebooks (of ``ob`` outputs) the ``n_local`` columns of one device touch, at most
  over the ``n_dev`` devices (static)."""
  return max((r * n_local + n_local - 1) // ob - (r * n_local) // ob + 1 for r in range(n_dev))


class _Slots(NamedTuple):
  """This device's columns laid out by codebook (traced; see the module docstring).

  ``cb`` ``(S,)``: the global codebook index of each slot (clipped to ``Gn - 1``); ``idx``
  ``(S, ob)``: the local column at each position of a slot (clipped); ``valid`` ``(S, ob)``:
  whether that column is this device's; ``pos`` ``(n_local,)``: each local column's flat
  position ``slot * ob + offset``; ``start``: this device's first global column.
  """

  cb: jax.Array
  idx: jax.Array
  valid: jax.Array
  pos: jax.Array
  start: jax.Array


def _slots(n_local: int, ob: int, Gn: int, n_dev: int, axis_name) -> _Slots:
  S = Gn if axis_name is None else _num_slots(n_local, ob, n_dev)
  r = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  start = jnp.asarray(r * n_local, jnp.int32)
  cb0 = start // ob
  cb = cb0 + jnp.arange(S)
  lc = cb[:, None] * ob + jnp.arange(ob)[None, :] - start
  n = start + jnp.arange(n_local)
  return _Slots(jnp.minimum(cb, Gn - 1), jnp.clip(lc, 0, n_local - 1),
                (lc >= 0) & (lc < n_local) & (cb[:, None] < Gn), (n // ob - cb0) * ob + n % ob,
                start)


def _slot_vectors(x: jax.Array, d: int) -> jax.Array:
  """``(gs, S, ob)`` rows by slot -> ``(S, gs / d * ob, d)`` vectors (as :func:`_to_vectors`)."""
  gs, S, ob = x.shape
  return x.reshape(gs // d, d, S, ob).transpose(2, 0, 3, 1).reshape(S, (gs // d) * ob, d)


def decode(codes: jax.Array, C: jax.Array, *, group_size: int, out_block: int) -> jax.Array:
  """Dense ``(K, N)`` weight from ``(K / d, N)`` integer codes and ``(Gk, Gn, E, d)`` centroids.

  ``W[v*d + t, n] = C[(v*d) // group_size, n // out_block, codes[v, n], t]``.
  """
  V, N = codes.shape
  Gk, Gn, E, d = C.shape
  vpg = V // Gk
  c = codes.astype(jnp.int32).reshape(Gk, vpg, Gn, out_block)
  base_idx = (jnp.arange(Gk)[:, None, None, None] * Gn
              + jnp.arange(Gn)[None, None, :, None]) * E
  vals = jnp.take(C.reshape(Gk * Gn * E, d), base_idx + c, axis=0)  # (Gk, vpg, Gn, ob, d)
  return vals.transpose(0, 1, 4, 2, 3).reshape(V * d, N)


def _decode_columns(codes: jax.Array, C: jax.Array, start, *, group_size: int,
                    out_block: int) -> jax.Array:
  """:func:`decode` of the columns ``[start, start + n)`` of a wider weight (codes ``(V, n)``,
  all the codebooks ``C``): column ``c`` uses codebook ``(start + c) // out_block``."""
  V, n = codes.shape
  Gk, Gn, E, d = C.shape
  g = (jnp.arange(V) * d) // group_size
  h = (start + jnp.arange(n)) // out_block
  flat = (g[:, None] * Gn + h[None, :]) * E + codes.astype(jnp.int32)
  vals = jnp.take(C.reshape(Gk * Gn * E, d), flat, axis=0)  # (V, n, d)
  return vals.transpose(0, 2, 1).reshape(V * d, n)


# ----------------------------------------------------------------------------------------
# k-means pieces (per codebook; vectors X (n, d), coordinate weights Wt (n, d)).
# ----------------------------------------------------------------------------------------


def mahalanobis_init(X: jax.Array, E: int) -> jax.Array:
  """``E`` initial centroids: the points at evenly spaced ranks of Mahalanobis distance.

  ``X`` is ``(n, d)``; the distance of a point is ``(x - mu)^T Sigma^{-1} (x - mu)``
  (reference ``vq_quant.py::mahalanobis_init``; a tiny ridge keeps ``Sigma`` invertible).
  """
  n, d = X.shape
  mu = jnp.mean(X, axis=0)
  Xc = X - mu
  Sigma = Xc.T @ Xc
  ridge = 1e-6 * (jnp.trace(Sigma) / d) + 1e-30
  Lam = jnp.linalg.inv(Sigma + ridge * jnp.eye(d, dtype=X.dtype))
  dists = jnp.sum((Xc @ Lam) * Xc, axis=-1)
  order = jnp.argsort(dists)
  idx = np.round(np.linspace(0, n - 1, E)).astype(np.int32)
  return X[order[idx]]


def assign(X: jax.Array, Wt: jax.Array, C: jax.Array) -> jax.Array:
  """E-step: ``argmin_e sum_t Wt[p, t] (X[p, t] - C[e, t])^2`` for every point ``p``."""
  cross = (X * Wt) @ C.T  # (n, E)
  cc = Wt @ (C * C).T  # (n, E)
  return jnp.argmin(cc - 2 * cross, axis=-1).astype(jnp.int32)


def kmeans(X: jax.Array, Wt: jax.Array, E: int, iters: int) -> jax.Array:
  """Weighted k-means (EM) on ``(n, d)`` points with per-coordinate weights ``Wt`` (n, d).

  The M-step is the weighted mean per coordinate, ``C[e, t] = sum_p Wt X / sum_p Wt`` over the
  points of cluster ``e`` (reference ``kmeans_m_step_3``); empty clusters keep their centroid.
  """
  C = mahalanobis_init(X, E)

  def body(_, C):
    a = assign(X, Wt, C)
    num = jax.ops.segment_sum(Wt * X, a, num_segments=E)
    den = jax.ops.segment_sum(Wt, a, num_segments=E)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), C)

  return jax.lax.fori_loop(0, iters, body, C)


def quantize_centroids(C: jax.Array, codebook_bits: int = 8, scale_dtype: Any = jnp.float16):
  """Symmetric integer rounding of centroids, one scale per codebook.

  ``C`` is ``(..., E, d)``; returns ``(q, scale)`` with ``q`` int8 ``(..., E, d)`` in
  ``[-2**(b-1), 2**(b-1) - 1]`` and ``scale`` ``(...)`` in ``scale_dtype`` =
  ``max|C| / (2**(b-1) - 1)`` (reference ``vq_quant.py::quantize_centroids``, per codebook).
  The decoded centroids are ``q * scale`` with the *stored* scale.
  """
  imax = 2**(codebook_bits - 1) - 1
  amax = jnp.max(jnp.abs(C), axis=(-2, -1))
  scale = jnp.where(amax > 0, amax / imax, 1.0).astype(scale_dtype)
  s = scale.astype(C.dtype)[..., None, None]
  q = jnp.clip(jnp.round(C / s), -imax - 1, imax).astype(jnp.int8)
  return q, scale


def _fit_codebooks(rows, dinv, *, d, ob, E, iters, codebook_bits, scale_dtype):
  """Codebooks ``(Gn, E, d)`` (int8 + scales + decoded float) for one input group's rows."""
  X = _to_vectors(rows, d, ob)  # (Gn, n, d)
  wt = jnp.broadcast_to(dinv[:, None], rows.shape)  # (gs, N) per-coordinate weights
  Wt = _to_vectors(wt, d, ob)
  C = jax.lax.map(lambda a: kmeans(a[0], a[1], E, iters), (X, Wt))
  q, scale = quantize_centroids(C, codebook_bits, scale_dtype)
  return q, scale, q.astype(rows.dtype) * scale.astype(rows.dtype)[:, None, None]


def vq_kmeans_quantize(W: jax.Array, H: jax.Array, *, dim: int, bits: float,
                       group_size: int | None = None, out_block: int | None = None,
                       kmeans_iters: int = 10, codebook_bits: int = 8,
                       scale_dtype: Any = jnp.float16):
  """Hessian-weighted k-means VQ *without* error feedback (the baseline GPTVQ improves on).

  Each group's codebooks are fitted on the original rows with coordinate weights ``diag(H)``,
  and vectors are assigned under the same weights. Returns ``(codes, codebook, scale)`` as
  :func:`gptvq_quantize`.
  """
  K, N = W.shape
  gs, ob = check_vq_args(K, N, dim=dim, bits=bits, group_size=group_size, out_block=out_block,
                         codebook_bits=codebook_bits, kmeans_iters=kmeans_iters)
  E = codebook_entries(dim, bits)
  W = W.astype(jnp.float32)
  h = jnp.maximum(jnp.diag(H).astype(jnp.float32), 0) + 1e-12
  Gk, Gn = K // gs, N // ob

  def group(args):
    rows, hg = args
    q, scale, C = _fit_codebooks(rows, hg, d=dim, ob=ob, E=E, iters=kmeans_iters,
                                 codebook_bits=codebook_bits, scale_dtype=scale_dtype)
    X = _to_vectors(rows, dim, ob)
    Wt = _to_vectors(jnp.broadcast_to(hg[:, None], rows.shape), dim, ob)
    a = jax.vmap(assign)(X, Wt, C)  # (Gn, vpg * ob)
    codes = a.reshape(Gn, gs // dim, ob).transpose(1, 0, 2).reshape(gs // dim, N)
    return codes, q, scale

  codes, q, scale = jax.lax.map(group, (W.reshape(Gk, gs, N), h.reshape(Gk, gs)))
  return codes.reshape(K // dim, N), q, scale


# ----------------------------------------------------------------------------------------
# GPTVQ.
# ----------------------------------------------------------------------------------------


def output_loss(W: jax.Array, Q: jax.Array, H: jax.Array) -> jax.Array:
  """``tr((W - Q)^T H (W - Q))``: with ``H = 2 X^T X / n``, ``2/n ||X W - X Q||_F^2``."""
  dW = (W - Q).astype(jnp.float32)
  return jnp.sum(dW * (H.astype(jnp.float32) @ dW))


def _fit_slots(rows, dg, sl: _Slots, *, d, ob, E, iters, codebook_bits, scale_dtype,
               axis_name):
  """Codebooks ``(Gn, E, d)`` (int8 + scales + decoded float) for one input group.

  ``rows`` ``(gs, n_local)`` are this device's columns (all of them on one device); the
  initialisation runs on the gathered rows, the EM iterations on the device's slots with the
  M-step's sums all-reduced (module docstring).
  """
  full = obs_core.gather_columns(rows, axis_name)  # (gs, N)
  C = jax.lax.map(lambda X: mahalanobis_init(X, E), _to_vectors(full, d, ob))  # (Gn, E, d)
  X = _slot_vectors(rows[:, sl.idx], d)  # (S, n, d)
  Wt = _slot_vectors(jnp.where(sl.valid[None], dg[:, None, None], 0).astype(rows.dtype), d)

  def sums(a):
    Xs, Ws, Cs = a
    k = assign(Xs, Ws, Cs)
    return (jax.ops.segment_sum(Ws * Xs, k, num_segments=E),
            jax.ops.segment_sum(Ws, k, num_segments=E))

  def body(_, C):
    num, den = jax.lax.map(sums, (X, Wt, C[sl.cb]))
    if axis_name is not None:  # this device's partial sums into all codebooks, summed
      num = obs_core.psum(jnp.zeros_like(C).at[sl.cb].add(num), axis_name)
      den = obs_core.psum(jnp.zeros_like(C).at[sl.cb].add(den), axis_name)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), C)

  C = jax.lax.fori_loop(0, iters, body, C)
  q, scale = quantize_centroids(C, codebook_bits, scale_dtype)
  return q, scale, q.astype(rows.dtype) * scale.astype(rows.dtype)[:, None, None]


def _gptvq(W, H, *, d, gs, ob, E, kmeans_iters, codebook_bits, blocksize, percdamp,
           m_step_iters, m_step_lr, scale_dtype, axis_name=None, n_dev=1):
  """GPTVQ of ``W`` (this device's columns under ``axis_name``; see :func:`gptvq_quantize`)."""
  K, N = W.shape  # N: this device's columns
  Gk = K // gs
  Gn = N * n_dev // ob
  ctype = jnp.float32
  W0 = W.astype(ctype)
  H0 = H.astype(ctype)
  Wd, Hd, dead = obs_core.drop_dead(W0, H0)
  Hinv, _, damp, ok = obs_core.hinv_cholesky(Hd, percdamp)
  dinv = 1.0 / jnp.diag(Hinv)**2  # OBS weight of each coordinate
  Kp = obs_core.padded_length(K, blocksize)
  dinv_p = jnp.pad(dinv, (0, Kp - K), constant_values=1.0)
  sl = _slots(N, ob, Gn, n_dev, axis_name)
  S = sl.cb.shape[0]

  def rule(st, carry):
    codes, q_all, s_all, C = carry
    j = st.j
    g = jnp.minimum(j // gs, Gk - 1)

    def fit():
      rows = st.rows(j, gs)
      dg = jax.lax.dynamic_slice_in_dim(dinv_p, j, gs)
      q, s, Cf = _fit_slots(rows, dg, sl, d=d, ob=ob, E=E, iters=kmeans_iters,
                            codebook_bits=codebook_bits, scale_dtype=scale_dtype,
                            axis_name=axis_name)
      return (jax.lax.dynamic_update_index_in_dim(q_all, q, g, 0),
              jax.lax.dynamic_update_index_in_dim(s_all, s, g, 0), Cf)

    new_group = jnp.logical_and(j % gs == 0, j < K)
    q_all, s_all, C = jax.lax.cond(new_group, fit, lambda: (q_all, s_all, C))
    # Exact step loss ||U^{-T}(w - c)||^2: transform the vectors and the codewords.
    Ut = st.U.T
    Cs = C[sl.cb]  # (S, E, d): the codebooks of this device's slots
    z = jax.scipy.linalg.solve_triangular(Ut, st.w, lower=True)  # (d, N)
    zc = jax.scipy.linalg.solve_triangular(
        Ut, Cs.reshape(S * E, d).T, lower=True).T.reshape(S, E, d)
    zv = z.T[sl.idx]  # (S, ob, d)
    dist = (jnp.sum(zc * zc, -1)[:, None, :]
            - 2 * jnp.einsum("god,ged->goe", zv, zc))  # (S, ob, E)
    a = jnp.argmin(dist, axis=-1).astype(jnp.int32)  # (S, ob)
    qv = jnp.take_along_axis(Cs, a[..., None], axis=1)  # (S, ob, d)
    q = qv.reshape(S * ob, d)[sl.pos].T
    codes = jax.lax.dynamic_update_index_in_dim(codes, a.reshape(S * ob)[sl.pos], j // d, 0)
    return q, (codes, q_all, s_all, C)

  init = (jnp.zeros((Kp // d, N), jnp.int32), jnp.zeros((Gk, Gn, E, d), jnp.int8),
          jnp.ones((Gk, Gn), scale_dtype), jnp.zeros((Gn, E, d), ctype))
  _, (codes, cq, cs, _), loss = obs_core.sweep(Wd, Hinv, rule, init, blocksize=blocksize,
                                               step=d, keep_values=False)
  codes = codes[:K // d]
  Cf = cq.astype(ctype) * cs.astype(ctype)[..., None, None]
  if axis_name is None:
    Q = decode(codes, Cf, group_size=gs, out_block=ob)
  else:
    Q = _decode_columns(codes, Cf, sl.start, group_size=gs, out_block=ob)
  before = obs_core.psum(output_loss(W0, Q, H0), axis_name)
  after = before
  if m_step_iters:
    cq, cs, after = lut_m_step(W0, H0, codes, Cf, group_size=gs, out_block=ob,
                               iters=m_step_iters, lr=m_step_lr, codebook_bits=codebook_bits,
                               scale_dtype=scale_dtype, baseline=before, axis_name=axis_name,
                               col_start=sl.start)
  info = {"loss": obs_core.psum(loss, axis_name), "output_loss": after,
          "output_loss_before_m_step": before, "damp": damp,
          "dead": jnp.sum(dead.astype(jnp.int32)), "cholesky_ok": ok}
  return codes, cq, cs, info


@functools.lru_cache(maxsize=64)
def _split_solver(split: obs_core.ColumnSplit, kw: tuple):
  """The jitted ``shard_map`` of :func:`_gptvq` over ``split`` (cached per split and settings)."""
  fn = functools.partial(_gptvq, axis_name=split.axis, n_dev=split.size, **dict(kw))
  return jax.jit(obs_core.split_columns(fn, split, in_specs=("cols", None),
                                        out_specs=("cols", None, None, None)))


def gptvq_quantize(W: jax.Array, H: jax.Array, *, dim: int = 2, bits: float = 2,
                   group_size: int | None = None, out_block: int | None = None,
                   kmeans_iters: int = 10, codebook_bits: int = 8, blocksize: int = 128,
                   percdamp: float = 0.01, m_step_iters: int = 0, m_step_lr: float = 1e-3,
                   scale_dtype: Any = jnp.float16,
                   split: obs_core.ColumnSplit | None = None):
  """GPTVQ-quantizes a ``(K, N)`` weight given its input Hessian (module docstring).

  Jittable with every keyword argument static (without ``split``).

  Args:
    W: ``(K, N)`` floating weight.
    H: ``(K, K)`` Hessian proxy ``2 X^T X / n``.
    dim: vector dimension ``d`` (1, 2, 4, 8): rows quantized jointly.
    bits: bits per dimension (the paper's knob); ``E = 2**(dim * bits)`` codewords.
    group_size: input rows per codebook (``None``: all ``K``); a multiple of ``dim``.
    out_block: outputs per codebook (``None``: all ``N``).
    kmeans_iters: Hessian-weighted EM iterations after the Mahalanobis initialisation.
    codebook_bits: integer width of the stored centroids (8: int8).
    blocksize: rows per lazy batch update (a multiple of ``dim``).
    percdamp: relative damping of ``H``.
    m_step_iters: Adam steps of the codebook M-step (0: none).
    m_step_lr: its learning rate (relative to each codebook's scale).
    scale_dtype: dtype of the stored codebook scales.
    split: solve with ``W``'s output columns split over mesh axes
      (:class:`~compressjax.quantize.obs_core.ColumnSplit`, e.g. ``obs_core.column_split(W)``):
      each device runs the recursion, the assignments and its share of the k-means sums on its
      ``N / devices`` columns; the k-means and M-step sums are all-reduced and the
      initialisation runs on the gathered group rows (module docstring), so every device
      holds the same codebooks. ``codes`` come back split ``P(None, axis)``, the codebooks,
      scales and ``info`` replicated. ``None``: one device. Not jittable (it places arrays).

  Returns:
    ``(codes, codebook, scale, info)``: ``int32`` codes ``(K / dim, N)``, ``int8`` centroids
    ``(Gk, Gn, E, dim)``, their scales ``(Gk, Gn)`` in ``scale_dtype``, and ``info`` (``loss``:
    the solver's ``sum ||Err||^2 / 2``; ``output_loss``: ``tr(dW^T H dW)`` of the result;
    ``output_loss_before_m_step``; ``damp``; ``dead``; ``cholesky_ok``). Decoding with
    :func:`decode` gives exactly the ``Q`` whose error was fed back (before the M-step).

  Raises:
    ValueError: invalid arguments (:func:`check_vq_args`), or with ``split`` output columns
      that do not split evenly over its devices.

  References:
    van Baalen et al. 2024, GPTVQ, arXiv:2402.15319, Algorithm 1.
  """
  K, N = W.shape
  gs, ob = check_vq_args(K, N, dim=dim, bits=bits, group_size=group_size, out_block=out_block,
                         codebook_bits=codebook_bits, kmeans_iters=kmeans_iters,
                         blocksize=blocksize)
  kw = dict(d=dim, gs=gs, ob=ob, E=codebook_entries(dim, bits), kmeans_iters=kmeans_iters,
            codebook_bits=codebook_bits, blocksize=blocksize, percdamp=percdamp,
            m_step_iters=m_step_iters, m_step_lr=m_step_lr, scale_dtype=jnp.dtype(scale_dtype))
  if split is None:
    return _gptvq(W, H, **kw)
  obs_core.check_split(N, split, "GPTVQ")
  fn = _split_solver(split, tuple(sorted(kw.items())))
  return fn(obs_core.place(W, split.sharding()), obs_core.place(H, split.replicated()))


def lut_m_step(W, H, codes, C, *, group_size: int, out_block: int, iters: int = 25,
               lr: float = 1e-3, codebook_bits: int = 8, scale_dtype: Any = jnp.float16,
               baseline=None, axis_name=None, col_start=0):
  """Codebook M-step: Adam on the centroids against ``tr((W - Q)^T H (W - Q))``, codes fixed.

  Reference ``gptq.py::GPTQ.lut_m_step`` (25 Adam steps, lr ``1e-3``). The step size is relative
  to each codebook's scale (centroids are optimised as ``C / scale``). The result is rounded
  to ``codebook_bits`` integers again and kept only if its loss is below ``baseline`` (the loss
  of ``C``), else ``C`` is returned re-encoded unchanged.

  With ``axis_name`` (inside :func:`gptvq_quantize`'s split) ``W`` and ``codes`` are the
  columns ``[col_start, col_start + n)`` of the layer and ``C`` all its codebooks: the
  gradient and the losses are summed over the devices, so every device takes the same steps.

  Returns:
    ``(q, scale, loss)``: int8 centroids, scales and the loss of the decoded result.
  """
  s0 = jnp.max(jnp.abs(C), axis=(-2, -1), keepdims=True)
  s0 = jnp.where(s0 > 0, s0, 1.0)
  if axis_name is None:
    dec_fn = functools.partial(decode, group_size=group_size, out_block=out_block)
  else:
    dec_fn = functools.partial(_decode_columns, start=col_start, group_size=group_size,
                               out_block=out_block)
  total = lambda W, Z: obs_core.psum(output_loss(W, dec_fn(codes, Z), H), axis_name)

  def loss_fn(Z):
    return output_loss(W, dec_fn(codes, Z * s0), H)

  b1, b2, eps = 0.9, 0.999, 1e-8

  def body(t, carry):
    Z, m, v = carry
    g = obs_core.psum(jax.grad(loss_fn)(Z), axis_name)
    g = g / (jnp.sqrt(jnp.mean(g * g)) + 1e-30)  # scale-free objective
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    tt = (t + 1).astype(jnp.float32)
    Z = Z - lr * (m / (1 - b1**tt)) / (jnp.sqrt(v / (1 - b2**tt)) + eps)
    return Z, m, v

  Z0 = C / s0
  Z, _, _ = jax.lax.fori_loop(0, iters, body, (Z0, jnp.zeros_like(Z0), jnp.zeros_like(Z0)))
  q_new, s_new = quantize_centroids(Z * s0, codebook_bits, scale_dtype)
  q_old, s_old = quantize_centroids(C, codebook_bits, scale_dtype)
  dec = lambda q, s: q.astype(C.dtype) * s.astype(C.dtype)[..., None, None]
  l_new = total(W, dec(q_new, s_new))
  l_old = total(W, dec(q_old, s_old)) if baseline is None else baseline
  better = l_new < l_old
  return (jnp.where(better, q_new, q_old), jnp.where(better, s_new, s_old),
          jnp.where(better, l_new, l_old))


def bits_per_param(K: int, N: int, *, dim: int, bits: float, group_size: int | None,
                   out_block: int | None, codebook_bits: int = 8, scale_bytes: int = 2) -> float:
  """Stored bits per parameter of the :class:`~compressjax.formats.VQArray` GPTVQ produces."""
  from compressjax.formats.vq import code_storage_bits  # pylint: disable=g-import-not-at-top
  gs = K if group_size is None else group_size
  ob = N if out_block is None else out_block
  E = codebook_entries(dim, bits)
  n_cb = (K // gs) * (N // ob)
  code_bits = code_storage_bits(K // dim, N, int(round(dim * bits)))
  cb_bits = n_cb * (E * dim * 8 + 8 * scale_bytes)  # int8 container even for codebook_bits < 8
  del codebook_bits
  return (code_bits + cb_bits) / (K * N)


__all__ += ["bits_per_param"]
