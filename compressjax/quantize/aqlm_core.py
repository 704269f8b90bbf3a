"""AQLM: additive multi-codebook quantization fitted to a layer's calibration Hessian. Pure math.

For one linear layer with weight ``W`` ``(K, N)`` (``(in, out)``, ``y = x @ W``) and input
statistics ``XTX`` (any positive multiple of ``X^T X``, e.g. GPTQ's ``H = 2 X^T X / n``), AQLM
represents every vector of ``g`` consecutive inputs of one output, ``W[i*g:(i+1)*g, n]``, as

  ``What[S_i, n] = s[n] * sum_m C[m, b[i, n, m]]``

with ``M`` codebooks ``C`` ``(M, 2**B, g)``, codes ``b`` ``(I, N, M)`` (``I = K / g``) and
per-output scales ``s`` ``(N,)``, minimising the output error

  ``||X W - X What||^2 = sum_n dW[:, n]^T XTX dW[:, n]``,  ``dW = W - What``.

Outputs are independent given ``C`` (the objective is a sum over columns). The steps:

* :func:`init_aq_kmeans`: per-output RMS scales, then residual k-means, one codebook at a time
  on what the previous codebooks left (the reference ``init_aq_kmeans``);
* :func:`beam_search_codes`: for each output column, a beam search over the codes, outer loop
  over input groups, inner over codebooks (the reference ``beam_search_optimal_codes``), each
  step scoring all ``2**B`` replacements of one code from ``R = XTX dW`` in
  ``O(2**B g + g^2)`` per column; the current code stays a candidate at its exact current loss,
  so a step never increases the objective;
* :func:`update_codebooks`: the codebooks are the least-squares solution of a linear problem
  given codes and scales (normal equations ``A^T XTX A c = A^T XTX w``), solved by
  Jacobi-preconditioned conjugate gradients from the current codebooks (each CG iterate
  minimises the quadratic over a growing Krylov space, so it never increases the objective);
  this replaces the reference's Adam on the same objective;
* :func:`update_scales`: closed form per output, ``s = <v, XTX w> / <v, XTX v>`` with ``v``
  the unscaled decoded column.

:func:`aqlm_quantize` alternates beam search, codebook and scale updates for ``iterations``
rounds. Costs per round for one layer: beam search ``~2 M K^2 N beam`` flops, each CG iteration
``~2 K^2 N``; memory of the candidate scores is bounded by processing columns in chunks.

Split over a mesh (``aqlm_quantize(split=...)``, :mod:`compressjax.quantize.obs_core`): the
codebooks are shared by all outputs, the rest is per output column. With ``W``'s columns split
over the devices, each device keeps its columns' codes and scales and runs, on them, the beam
search (per column given ``C``, ``s``), the scale update (closed form per column), the k-means
assignments and the decoding. What is all-reduced (``psum``): the k-means sums and counts per
centroid, the codebook update's normal equations (``A^T XTX A c`` and ``A^T XTX W`` are sums
over the columns, as is the Jacobi diagonal), the k-means initial points (chosen by global
index from the same key: each device contributes the points it holds, the others zeros) and
the reported errors. Every device thus holds the same codebooks; the sums are added in
another order than on one device (float32 rounding), so the codebooks agree within rounding
and the codes agree except at near-ties.

References:
  Egiazarian, Panferov, Kuznedelev, Frantar, Babenko, Alistarh, "Extreme Compression of Large
  Language Models via Additive Quantization" (AQLM), arXiv:2401.06118 (Sec. 3, Alg. 1);
  reference code ``Vahe1994/AQLM`` (``src/aq.py::init_aq_kmeans``,
  ``src/beam_search_xtx.py::beam_search_optimal_codes``, ``aq_engine.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from compressjax.quantize import obs_core

# The papers' variable names (XTX, W, C, ...) are kept on purpose.
# pylint: disable=invalid-name

__all__ = ["aqlm_quantize", "beam_search_codes", "decode", "init_aq_kmeans", "kmeans",
           "objective", "relative_error", "update_codebooks", "update_scales"]

#: Upper bound on the number of float32 elements of one block of candidate scores
#: (``beam * 2**B * columns``) or k-means distances (``points * 2**B``): 16 MiB.
SCORE_BUDGET = 1 << 22


def decode(b: jax.Array, C: jax.Array, s: jax.Array) -> jax.Array:
  """``What`` ``(K, N)`` from codes ``b`` ``(I, N, M)``, codebooks ``C`` ``(M, 2**B, g)``, ``s``."""
  I, N, M = b.shape
  g = C.shape[2]
  vec = jnp.zeros((I, N, g), C.dtype)
  for m in range(M):
    vec = vec + C[m][b[:, :, m]]
  return jnp.swapaxes(vec, 1, 2).reshape(I * g, N) * s[None, :]


def objective(W: jax.Array, What: jax.Array, XTX: jax.Array) -> jax.Array:
  """``tr(dW^T XTX dW)`` with ``dW = W - What`` (``||X W - X What||^2`` for ``XTX = X^T X``)."""
  dW = W - What
  return jnp.sum(dW * (XTX @ dW))


def relative_error(W, What, XTX, axis_name=None) -> jax.Array:
  """``||X (W - What)||^2 / ||X W||^2`` (both summed over the devices of ``axis_name``)."""
  return (obs_core.psum(objective(W, What, XTX), axis_name)
          / jnp.maximum(obs_core.psum(jnp.sum(W * (XTX @ W)), axis_name), 1e-30))


def _chunked_argmin(points: jax.Array, C: jax.Array) -> jax.Array:
  """``argmin_j ||points[p] - C[j]||^2`` for every point, in bounded chunks."""
  P, g = points.shape
  k = C.shape[0]
  chunk = max(1, min(P, SCORE_BUDGET // k))
  pad = (-P) % chunk
  pts = jnp.pad(points, ((0, pad), (0, 0))).reshape(-1, chunk, g)
  cnorm = jnp.sum(C * C, axis=1)

  def one(x):
    return jnp.argmin(cnorm[None, :] - 2.0 * x @ C.T, axis=1).astype(jnp.int32)

  return jax.lax.map(one, pts).reshape(-1)[:P]


def _pick(points: jax.Array, idx: jax.Array, layout, axis_name) -> jax.Array:
  """``points[idx]`` of the global point set ``p = i * N + n`` (group ``i``, output ``n``);
  under ``axis_name`` ``points`` holds this device's outputs ``[start, start + n_local)`` as
  ``i * n_local + (n - start)`` and every device contributes the points it holds."""
  if axis_name is None:
    return points[idx]
  _, N, start, n_local = layout
  i, n = idx // N, idx % N
  own = (n >= start) & (n < start + n_local)
  loc = jnp.where(own, i * n_local + n - start, 0)
  return obs_core.psum(jnp.where(own[:, None], points[loc], 0), axis_name)


def kmeans(points: jax.Array, k: int, iters: int, key: jax.Array, *, axis_name=None,
           layout=None):
  """Lloyd's k-means of ``points`` ``(P, g)`` into ``k`` centroids.

  Centroids start at ``k`` random points (with a little noise when ``P < k``); an empty
  cluster keeps its centroid. Returns ``(centroids (k, g), assignment (P,) int32)``.

  With ``axis_name`` (:func:`aqlm_quantize`'s split) ``points`` are this device's share,
  ``layout = (I, N, start, n_local)`` places them in the global set (:func:`_pick`): the
  initial points are picked by global index, the assignments are local and the sums and
  counts per centroid are summed over the devices.
  """
  P, g = points.shape
  Pg = P if axis_name is None else layout[0] * layout[1]
  kc, kn = jax.random.split(key)
  if Pg >= k:
    C = _pick(points, jax.random.choice(kc, Pg, (k,), replace=False), layout, axis_name)
  else:
    C = _pick(points, jax.random.choice(kc, Pg, (k,), replace=True), layout, axis_name)
    if axis_name is None:
      std = jnp.std(points)
    else:
      mean = obs_core.psum(jnp.sum(points), axis_name) / (Pg * g)
      std = jnp.sqrt(obs_core.psum(jnp.sum((points - mean)**2), axis_name) / (Pg * g))
    C = C + 1e-3 * std * jax.random.normal(kn, C.shape, C.dtype)

  def body(_, C):
    a = _chunked_argmin(points, C)
    sums = obs_core.psum(jax.ops.segment_sum(points, a, num_segments=k), axis_name)
    cnt = obs_core.psum(jax.ops.segment_sum(jnp.ones((P,), points.dtype), a, num_segments=k),
                        axis_name)
    return jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1.0)[:, None], C)

  C = jax.lax.fori_loop(0, iters, body, C)
  return C, _chunked_argmin(points, C)


def init_aq_kmeans(W: jax.Array, *, M: int, B: int, g: int, iters: int, key: jax.Array,
                   axis_name=None, n_dev: int = 1):
  """Residual k-means initialisation (the reference ``init_aq_kmeans``).

  Scales are the per-output RMS of ``W``; the scaled vectors are clustered into codebook 0,
  what it leaves into codebook 1, and so on. With ``axis_name`` ``W`` is this device's share
  of ``n_dev`` equal column blocks (:func:`kmeans`).

  Returns ``(b (I, N, M) int32, C (M, 2**B, g), s (N,))``.
  """
  K, N = W.shape
  I = K // g
  r = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  layout = (I, N * n_dev, r * N, N)
  rms = jnp.sqrt(jnp.mean(W * W, axis=0))
  s = jnp.where(rms > 0, rms, 1.0)
  resid = jnp.swapaxes((W / s[None, :]).reshape(I, g, N), 1, 2).reshape(I * N, g)
  Cs, bs = [], []
  for m, km in enumerate(jax.random.split(key, M)):
    del m
    C, a = kmeans(resid, 2**B, iters, km, axis_name=axis_name, layout=layout)
    resid = resid - C[a]
    Cs.append(C)
    bs.append(a.reshape(I, N))
  return jnp.stack(bs, axis=-1), jnp.stack(Cs), s


def _beam_search_chunk(W, XTX, C, s, b, *, beam_size: int):
  """Beam search of one chunk of columns (see :func:`beam_search_codes`)."""
  K, nc = W.shape
  I, _, M = b.shape
  _, nq, g = C.shape
  dW = W - decode(b, C, s)
  R = XTX @ dW  # (K, nc)
  loss = jnp.sum(dW * R, axis=0)
  bb = jnp.broadcast_to(b[None], (beam_size,) + b.shape)
  Rb = jnp.broadcast_to(R[None], (beam_size, K, nc))
  # Only beam 0 is real at the start; the copies have infinite loss until filled.
  lb = jnp.concatenate([loss[None], jnp.full((beam_size - 1, nc), jnp.inf, loss.dtype)])
  j = jnp.arange(nq)[None, :, None]

  def step(t, carry):
    bb, Rb, lb = carry
    i, m = t // M, t % M
    Cm = C[m]  # (2**B, g)
    Hs = jax.lax.dynamic_slice(XTX, (i * g, i * g), (g, g))
    r = jax.lax.dynamic_slice(Rb, (0, i * g, 0), (beam_size, g, nc))  # (beam, g, nc)
    old = bb[:, i, :, m]  # (beam, nc)
    c_old = Cm[old]  # (beam, nc, g)
    Hc_old = jnp.einsum("gh,bnh->bgn", Hs, c_old)
    # loss(C_j) = loss + 2 s c_old.r + s^2 c_old.Hs c_old - 2 C_j.(s r + s^2 Hs c_old)
    #             + s^2 C_j'Hs C_j
    const = (2 * s * jnp.einsum("bng,bgn->bn", c_old, r)
             + s * s * jnp.einsum("bng,bgn->bn", c_old, Hc_old))
    u = s * r + s * s * Hc_old  # (beam, g, nc)
    chc = jnp.einsum("jg,gh,jh->j", Cm, Hs, Cm)
    cand = ((lb + const)[:, None, :] - 2 * jnp.einsum("jg,bgn->bjn", Cm, u)
            + (s * s)[None, None, :] * chc[None, :, None])  # (beam, 2**B, nc)
    # Keeping the current code is a candidate at exactly the current loss: never worse.
    cand = jnp.where(j == old[:, None, :], lb[:, None, :], cand)
    if beam_size == 1:
      new = jnp.argmin(cand[0], axis=0).astype(jnp.int32)[None]
      new_l = jnp.min(cand[0], axis=0)[None]
      old_p = old
    else:
      neg, idx = jax.lax.top_k(-cand.reshape(beam_size * nq, nc).T, beam_size)  # (nc, beam)
      new_l, idx = -neg.T, idx.T.astype(jnp.int32)
      parent, new = idx // nq, idx % nq
      bb = jnp.take_along_axis(bb, parent[:, None, :, None], axis=0)
      Rb = jnp.take_along_axis(Rb, parent[:, None, :], axis=0)
      old_p = jnp.take_along_axis(old, parent, axis=0)
    delta = s[None, :, None] * (Cm[new] - Cm[old_p])  # (beam, nc, g): What[S_i] += delta
    Hcol = jax.lax.dynamic_slice(XTX, (0, i * g), (K, g))
    Rb = Rb - jnp.einsum("kg,bng->bkn", Hcol, delta)
    bb = bb.at[:, i, :, m].set(new)
    return bb, Rb, new_l

  bb, Rb, lb = jax.lax.fori_loop(0, I * M, step, (bb, Rb, lb))
  best = jnp.argmin(lb, axis=0)
  return jnp.take_along_axis(bb, best[None, None, :, None], axis=0)[0]


def beam_search_codes(W: jax.Array, XTX: jax.Array, C: jax.Array, s: jax.Array, b: jax.Array,
                      *, beam_size: int = 1) -> jax.Array:
  """New codes ``(I, N, M)`` minimising ``sum_n dW[:, n]^T XTX dW[:, n]`` by beam search.

  Outputs are independent, so each column runs its own beam (columns are processed in chunks
  so that the ``(beam, 2**B, columns)`` candidate scores stay under :data:`SCORE_BUDGET`
  elements). Loop: input groups outer, codebooks inner (the reference's order); at each step all
  ``2**B`` codes of one ``(group, codebook)`` of every beam hypothesis are scored exactly from
  ``R = XTX dW`` and the ``beam_size`` best hypotheses kept. The hypothesis "keep the current
  code" keeps its exact current loss, so the best loss never increases; with ``beam_size = 1``
  this is exact coordinate descent. The best hypothesis of each column is returned.
  """
  K, N = W.shape
  nq = C.shape[1]
  nc = max(1, min(N, SCORE_BUDGET // (beam_size * max(nq, K))))
  pad = (-N) % nc
  nchunks = (N + pad) // nc
  Wp = jnp.pad(W, ((0, 0), (0, pad))).reshape(K, nchunks, nc).transpose(1, 0, 2)
  sp = jnp.pad(s, (0, pad), constant_values=1.0).reshape(nchunks, nc)
  bp = jnp.pad(b, ((0, 0), (0, pad), (0, 0))).reshape(b.shape[0], nchunks, nc, -1)
  bp = bp.transpose(1, 0, 2, 3)
  fn = functools.partial(_beam_search_chunk, beam_size=beam_size)
  out = jax.lax.map(lambda a: fn(a[0], XTX, C, a[1], a[2]), (Wp, sp, bp))  # (chunks, I, nc, M)
  return out.transpose(1, 0, 2, 3).reshape(b.shape[0], N + pad, -1)[:, :N]


def update_codebooks(W, XTX, C, s, b, *, iters: int, ridge: float = 1e-4,
                     axis_name=None) -> jax.Array:
  """Least-squares codebooks given codes and scales, by ``iters`` steps of preconditioned CG.

  ``What = A(C)`` is linear in ``C``; the minimiser of ``tr((W - A C)^T XTX (W - A C))``
  solves ``A^T XTX A C = A^T XTX W``. CG starts from the current ``C`` (unused codewords keep
  their value) with the Jacobi preconditioner ``diag(A^T XTX A)``, on the system damped by
  ``ridge`` times the mean of that diagonal (a proximal term around the current ``C``).

  With ``axis_name`` the columns are split over its devices: ``A^T XTX A c``, ``A^T XTX W``
  and the diagonal are sums over columns, summed over the devices (``C`` replicated).
  """
  I, N, M = b.shape
  g = C.shape[2]
  nq = C.shape[1]
  A = lambda c: decode(b, c, s)
  _, AT = jax.vjp(A, C)
  dH = jnp.diag(XTX).reshape(I, g)
  val = (s * s)[None, :, None] * dH[:, None, :]  # (I, N, g)
  d = obs_core.psum(jnp.stack([jax.ops.segment_sum(val.reshape(I * N, g), b[:, :, m].reshape(-1),
                                     num_segments=nq) for m in range(M)]), axis_name)
  # A has a null space for M > 1 (a shift of one codebook undone by another): a ridge
  # lam ||c - C||^2 keeps the system positive definite (CG stays stable in float32) and does
  # not change the guarantee f(new) <= f(new) + lam ||new - C||^2 <= f(C).
  lam = ridge * jnp.sum(d) / jnp.maximum(jnp.sum(d > 0), 1)
  matvec = lambda c: obs_core.psum(AT(XTX @ A(c))[0], axis_name) + lam * c
  rhs = obs_core.psum(AT(XTX @ W)[0], axis_name) + lam * C
  dinv = 1.0 / (d + lam + (lam == 0))
  vdot = lambda x, y: jnp.sum(x * y)

  def body(_, carry):
    x, r, p, rz, rz0 = carry
    Ap = matvec(p)
    pAp = vdot(p, Ap)
    live = (pAp > 0) & (rz > 1e-12 * rz0)  # stop once converged (no division by noise)
    alpha = jnp.where(live, rz / jnp.where(live, pAp, 1.0), 0.0)
    x = x + alpha * p
    r = r - alpha * Ap
    z = dinv * r
    rz_new = vdot(r, z)
    beta = jnp.where(live, rz_new / jnp.where(live, rz, 1.0), 0.0)
    return x, r, z + beta * p, rz_new, rz0

  r0 = rhs - matvec(C)
  z0 = dinv * r0
  rz0 = vdot(r0, z0)
  x, *_ = jax.lax.fori_loop(0, iters, body, (C, r0, z0, rz0, rz0))
  return x


def update_scales(W, XTX, C, s, b) -> jax.Array:
  """Per-output optimal scales ``<v, XTX w> / <v, XTX v>`` (``v`` the unscaled column)."""
  V = decode(b, C, jnp.ones_like(s))
  HV = XTX @ V
  num = jnp.sum(W * HV, axis=0)
  den = jnp.sum(V * HV, axis=0)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), s)


def aqlm_quantize(W: jax.Array, XTX: jax.Array, *, num_codebooks: int = 2, nbits: int = 8,
                  in_group_size: int = 8, beam_size: int = 1, iterations: int = 4,
                  kmeans_iters: int = 10, cg_iters: int = 8, seed: int = 0,
                  codebook_dtype: Any = jnp.float16, scale_dtype: Any = jnp.float16,
                  split: obs_core.ColumnSplit | None = None):
  """AQLM of one layer: residual k-means, then ``iterations`` rounds of beam search, codebook
  (CG) and scale updates.

  Args:
    W: ``(K, N)`` weight; ``in_group_size`` must divide ``K``.
    XTX: ``(K, K)`` positive semi-definite input statistics (any positive multiple of
      ``X^T X``); dead inputs (zero diagonal) are dropped as in GPTQ
      (:func:`compressjax.quantize.obs_core.drop_dead`).
    num_codebooks, nbits, in_group_size: ``M``, ``B``, ``g``.
    beam_size: hypotheses per output column in the beam search (1: coordinate descent).
    iterations: rounds of (beam search, codebooks, scales); 0 is plain residual k-means.
    kmeans_iters: Lloyd iterations per codebook of the initialisation.
    cg_iters: conjugate-gradient iterations of each codebook update (0: codebooks stay the
      k-means ones).
    seed: seed of the k-means initialisation.
    codebook_dtype, scale_dtype: storage dtypes; the returned codebooks and scales are rounded
      to them and the reported errors are those of the rounded values.
    split: solve with ``W``'s output columns split over mesh axes
      (:class:`~compressjax.quantize.obs_core.ColumnSplit`, e.g. ``obs_core.column_split(W)``):
      codes, scales, beam search and scale updates per device, the k-means sums and the
      codebook normal equations summed over the devices (module docstring). ``b`` then comes
      back split ``P(None, axis, None)``, ``s`` ``P(axis)``, ``C`` and ``info`` replicated.
      ``None``: one device (jittable; the split path places arrays and is not).

  Returns:
    ``(b, C, s, info)``: codes ``(I, N, M)`` ``int32``, codebooks ``(M, 2**B, g)``, scales
    ``(N,)``, and ``info = {"rel_err": (iterations + 1,)}``, the relative output error
    ``||X dW||^2 / ||X W||^2`` after the initialisation and after each round (float32 values,
    the last one with the rounded codebooks and scales).
  """
  K, N = W.shape
  g = in_group_size
  if K % g:
    raise ValueError(f"in_group_size={g} must divide the kernel's input width K={K}")
  kw = dict(num_codebooks=num_codebooks, nbits=nbits, in_group_size=in_group_size,
            beam_size=beam_size, iterations=iterations, kmeans_iters=kmeans_iters,
            cg_iters=cg_iters, seed=seed, codebook_dtype=jnp.dtype(codebook_dtype),
            scale_dtype=jnp.dtype(scale_dtype))
  if split is None:
    return _aqlm(W, XTX, **kw)
  obs_core.check_split(N, split, "AQLM")
  fn = _split_solver(split, tuple(sorted(kw.items())))
  return fn(obs_core.place(W, split.sharding()), obs_core.place(XTX, split.replicated()))


@functools.lru_cache(maxsize=64)
def _split_solver(split: obs_core.ColumnSplit, kw: tuple):
  """The jitted ``shard_map`` of :func:`_aqlm` over ``split`` (cached per split and settings)."""
  P = jax.sharding.PartitionSpec
  fn = functools.partial(_aqlm, axis_name=split.axis, n_dev=split.size, **dict(kw))
  return jax.jit(jax.shard_map(fn, mesh=split.mesh, in_specs=(P(None, split.axis), P()),
                               out_specs=(P(None, split.axis, None), P(), P(split.axis), P()),
                               check_vma=False))


def _aqlm(W, XTX, *, num_codebooks, nbits, in_group_size, beam_size, iterations, kmeans_iters,
          cg_iters, seed, codebook_dtype, scale_dtype, axis_name=None, n_dev=1):
  """:func:`aqlm_quantize` of ``W`` (this device's columns under ``axis_name``)."""
  g = in_group_size
  W = W.astype(jnp.float32)
  W, XTX, _ = obs_core.drop_dead(W, XTX.astype(jnp.float32))
  b, C, s = init_aq_kmeans(W, M=num_codebooks, B=nbits, g=g, iters=kmeans_iters,
                           key=jax.random.PRNGKey(seed), axis_name=axis_name, n_dev=n_dev)
  rel = functools.partial(relative_error, axis_name=axis_name)
  errs = [rel(W, decode(b, C, s), XTX)]
  for _ in range(iterations):
    b = beam_search_codes(W, XTX, C, s, b, beam_size=beam_size)
    if cg_iters:
      C = update_codebooks(W, XTX, C, s, b, iters=cg_iters, axis_name=axis_name)
    s = update_scales(W, XTX, C, s, b)
    errs.append(rel(W, decode(b, C, s), XTX))
  C = C.astype(codebook_dtype)
  s = s.astype(scale_dtype)
  errs[-1] = rel(W, decode(b, C.astype(jnp.float32), s.astype(jnp.float32)), XTX)
  return b, C, s, {"rel_err": jnp.stack(errs)}
