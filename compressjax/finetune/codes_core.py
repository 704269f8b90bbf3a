"""Pure math of discrete-code updates: re-encoding weights to a format's codes, and choosing
which codes may change (the V-step's subspace).

Everything takes and returns arrays (no formats, no trees): :mod:`compressjax.finetune.ste`
builds the leaves. Two code families:

* scalar grids (:class:`~compressjax.formats.QuantizedArray`): ``q = round(w / s) + 2**(b-1)``
  (symmetric) or ``q = round((w - z) / s)`` (asymmetric), clipped to ``[0, 2**b)``; one unit
  (a code) per weight;
* vector codebooks (:class:`~compressjax.formats.VQArray`): the nearest codeword of the
  vector's block codebook (squared Euclidean distance); one unit per ``dim``-vector;
* additive codebooks (:class:`~compressjax.formats.AdditiveCodebookArray`, AQLM): the codes
  ``b`` of ``M`` codebooks minimising ``||t - sum_m C[m, b_m]||^2`` for each unscaled group
  vector ``t = W[i*g:(i+1)*g, n] / s[n]``, by a beam search over the codebooks warm-started
  from the previous codes (:func:`additive_encode`; the reference's L2 beam search); one unit
  (``M`` codes) per ``g``-vector;
* the E8P lattice (:class:`~compressjax.formats.E8PArray`): the exact nearest codeword of
  ``W[8b:8b+8, n] / scale`` (:func:`e8p_encode`, :func:`compressjax.quantize.e8p_core.nearest`);
  one unit per 8-vector.

Ties and degenerate grids fall back to the previous codes ``prev`` (a zero scale; a codeword
duplicated in the codebook), so re-encoding the decoded weight of codes ``c`` gives back ``c``.

References:
  Bengio, Léonard, Courville, "Estimating or Propagating Gradients Through Stochastic Neurons",
  arXiv:1308.3432 (straight-through estimator).
  Malinovskii et al., "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM
  Compression", arXiv:2405.14852 (Sec. 3.2-3.3: linearized V-step restricted to a subspace).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from compressjax.quantize import aqlm_core
from compressjax.quantize import e8p_core

# Paper variable names (C, M, B, g) kept on purpose.
# pylint: disable=invalid-name

__all__ = ["additive_encode", "e8p_encode", "scalar_encode", "scalar_in_range", "select_top",
           "unit_priority", "vq_encode"]


def _grid_ratio(w, scale, zero, *, bits: int, group_size: int, symmetric: bool):
  """``(r, s)``: the unrounded code ``r`` of each weight (grouped ``(G, gs, N)``) and the
  broadcast scale."""
  k, n = w.shape
  g = k // group_size
  wg = w.astype(jnp.float32).reshape(g, group_size, n)
  s = scale.astype(jnp.float32)[:, None, :]
  safe = jnp.where(s == 0, 1.0, s)
  if symmetric:
    r = wg / safe + 2.0**(bits - 1)
  else:
    r = (wg - zero.astype(jnp.float32)[:, None, :]) / safe
  return r, s


def scalar_encode(w: jax.Array, scale: jax.Array, zero: jax.Array | None, prev: jax.Array, *,
                  bits: int, group_size: int, symmetric: bool) -> jax.Array:
  """Codes of ``w`` on the grid of ``scale``/``zero`` (round to nearest, clipped).

  Args:
    w: ``(K, N)`` weights. scale, zero: ``(K // group_size, N)`` (``zero`` ``None`` when
      symmetric). prev: ``(K, N)`` integer codes kept where a group's scale is 0.

  Returns:
    ``(K, N)`` ``int32`` codes in ``[0, 2**bits)``.
  """
  r, s = _grid_ratio(w, scale, zero, bits=bits, group_size=group_size, symmetric=symmetric)
  q = jnp.clip(jnp.round(r), 0, 2**bits - 1).astype(jnp.int32)
  q = jnp.where(s == 0, prev.astype(jnp.int32).reshape(q.shape), q)
  return q.reshape(w.shape)


def scalar_in_range(w, scale, zero, *, bits: int, group_size: int, symmetric: bool):
  """``(K, N)`` bool: where rounding is not clipped (the straight-through estimator passes
  gradients there and blocks them outside, as in LSQ/QAT practice)."""
  r, _ = _grid_ratio(w, scale, zero, bits=bits, group_size=group_size, symmetric=symmetric)
  return ((r >= -0.5) & (r <= 2**bits - 0.5)).reshape(w.shape)


def vq_encode(w: jax.Array, centroids: jax.Array, prev: jax.Array, *, dim: int,
              group_size: int, out_block: int) -> jax.Array:
  """Nearest-codeword codes of ``w`` (the VQArray layout).

  Args:
    w: ``(K, N)`` weights; vector ``v`` of column ``n`` is ``w[v*dim:(v+1)*dim, n]``.
    centroids: ``(Gk, Gn, E, dim)`` decoded codebooks (block ``(g, h)`` covers input rows
      ``g*group_size...`` and outputs ``h*out_block...``).
    prev: ``(K / dim, N)`` previous codes, kept when they are as near as the nearest.

  Returns:
    ``(K / dim, N)`` ``int32`` codes.
  """
  gk, gn, e, d = centroids.shape
  k, n = w.shape
  vg = group_size // dim
  # One row of vectors (all N outputs) at a time: the distances are (N, E) per row instead of
  # (K / dim, N, E) per weight (a whole-model V-step otherwise holds gigabytes of them).
  x = w.astype(jnp.float32).reshape(gk * vg, dim, gn, out_block).transpose(0, 2, 3, 1)
  p = prev.astype(jnp.int32).reshape(gk * vg, gn, out_block)
  c = centroids.astype(jnp.float32)  # (gk, gn, E, d)
  c2 = jnp.sum(c * c, -1)  # (gk, gn, E)

  def row(args):
    xr, pr, r = args  # (gn, ob, d), (gn, ob), row index
    cg, c2g = c[r // vg], c2[r // vg]
    dist = (jnp.sum(xr * xr, -1)[..., None] - 2 * jnp.einsum("hod,hed->hoe", xr, cg)
            + c2g[:, None, :])  # (gn, ob, E)
    best = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    d_prev = jnp.take_along_axis(dist, pr[..., None], axis=-1)[..., 0]
    return jnp.where(d_prev <= jnp.min(dist, axis=-1), pr, best)

  best = jax.lax.map(row, (x, p, jnp.arange(gk * vg)), batch_size=min(16, gk * vg))
  return best.reshape(k // dim, n)


def unit_priority(target: jax.Array, old: jax.Array, new: jax.Array, unit_rows: int) -> jax.Array:
  """Decrease of the V-step's objective ``||target - W||^2`` when a unit switches from its
  ``old`` to its ``new`` decoded values: ``||t - old||^2 - ||t - new||^2`` summed over the
  ``unit_rows`` consecutive input rows of one code. Returns ``(K / unit_rows, N)``.

  With ``target = W - eta * P^-1 grad`` (the preconditioned step of the linearized
  objective), ``||target - W'||^2 / (2 eta)`` is, up to a constant, the linearized loss
  ``<grad, W' - W>`` plus the proximal term ``||W' - W||^2_P / (2 eta)``: a positive priority
  means changing this code lowers the linearized objective.
  """
  k, n = target.shape
  t = target.astype(jnp.float32)
  a = jnp.square(t - old.astype(jnp.float32)) - jnp.square(t - new.astype(jnp.float32))
  return a.reshape(k // unit_rows, unit_rows, n).sum(1)


def select_top(priority: jax.Array, budget: int) -> jax.Array:
  """Bool mask (shape of ``priority``) of at most ``budget`` units: the largest priorities,
  and only those that are positive (a change that does not lower the objective is not made).
  ``budget`` is static."""
  flat = priority.reshape(-1)
  if budget <= 0:
    return jnp.zeros(priority.shape, bool)
  budget = min(int(budget), flat.shape[0])
  vals, idx = jax.lax.top_k(flat, budget)
  return jnp.zeros(flat.shape, bool).at[idx].set(vals > 0).reshape(priority.shape)


def _additive_search(t, C, prev, beam_size: int, sweeps: int):
  """Beam search of one chunk: ``t`` ``(P, g)``, ``C`` ``(M, Q, g)``, ``prev`` ``(P, M)``.

  Returns the best hypothesis' codes ``(P, M)``."""
  M, Q, _ = C.shape
  P = t.shape[0]
  cn = jnp.sum(C * C, axis=-1)  # (M, Q)
  codes = prev[:, None, :]  # (P, beam, M); one hypothesis (the warm start) at first
  for _ in range(sweeps):
    for m in range(M):
      nb = codes.shape[1]
      rest = sum((C[mm][codes[..., mm]] for mm in range(M) if mm != m),
                 jnp.zeros(codes.shape[:2] + (t.shape[1],), t.dtype))
      r = t[:, None, :] - rest  # (P, nb, g): what codebook m should approximate
      score = (jnp.sum(r * r, -1)[..., None] - 2 * jnp.einsum("pbg,qg->pbq", r, C[m])
               + cn[m][None, None, :])  # (P, nb, Q): ||r - C[m, q]||^2 of each hypothesis
      cur = codes[..., m]
      if beam_size == 1:
        best = jnp.argmin(score[:, 0], axis=-1).astype(jnp.int32)
        # Keep the current code when it is as good (ties, duplicated codewords).
        keep = (jnp.take_along_axis(score[:, 0], cur[:, :1], -1)[:, 0]
                <= jnp.min(score[:, 0], -1))
        codes = codes.at[:, 0, m].set(jnp.where(keep, cur[:, 0], best))
      else:
        k = min(beam_size, nb * Q)
        _, idx = jax.lax.top_k(-score.reshape(P, nb * Q), k)
        parent, new = idx // Q, (idx % Q).astype(jnp.int32)
        codes = jnp.take_along_axis(codes, parent[..., None], axis=1).at[..., m].set(new)
  # Best hypothesis by the exact (direct) squared distance.
  dec = sum((C[mm][codes[..., mm]] for mm in range(M)), jnp.zeros(codes.shape[:2] + (t.shape[1],),
                                                                   t.dtype))
  d = jnp.sum(jnp.square(t[:, None, :] - dec), -1)  # (P, nb)
  return jnp.take_along_axis(codes, jnp.argmin(d, -1)[:, None, None], axis=1)[:, 0]


def additive_encode(t: jax.Array, C: jax.Array, prev: jax.Array, *, beam_size: int = 1,
                    sweeps: int = 1) -> jax.Array:
  """AQLM codes of unscaled group vectors by an L2 beam search over the codebooks.

  For each row ``t[p]`` minimises ``||t[p] - sum_m C[m, b_m]||^2`` (the V-step's / STE's plain
  L2 projection, not the Hessian-weighted one of
  :func:`compressjax.quantize.aqlm_core.beam_search_codes`). The search starts from ``prev``
  and visits the codebooks in order ``sweeps`` times; at each visit every hypothesis scores all
  ``2**B`` codewords of that codebook (``O(beam 2**B g)`` per vector) and the ``beam_size``
  best ``(hypothesis, codeword)`` pairs survive. ``beam_size = 1`` is exact coordinate descent
  (the current code is kept on ties, so the distance never increases). Finally the result is
  compared with ``prev`` by the direct distance and ``prev`` is kept unless strictly worse, so
  re-encoding the decoded vector of ``prev`` gives back ``prev`` (duplicate codewords
  included). Rows are processed in chunks of at most
  :data:`compressjax.quantize.aqlm_core.SCORE_BUDGET` candidate scores.

  Args:
    t: ``(P, g)`` target vectors (already divided by their output's scale).
    C: ``(M, 2**B, g)`` codebooks (any float dtype; computed in ``float32``).
    prev: ``(P, M)`` integer previous codes.
    beam_size: hypotheses kept per vector (static).
    sweeps: passes over the ``M`` codebooks (static).

  Returns:
    ``(P, M)`` ``int32`` codes in ``[0, 2**B)``.
  """
  if beam_size < 1 or sweeps < 1:
    raise ValueError(f"additive_encode: beam_size and sweeps must be >= 1, got {beam_size}, "
                     f"{sweeps}")
  t = t.astype(jnp.float32)
  C = C.astype(jnp.float32)
  prev = prev.astype(jnp.int32)
  P, g = t.shape
  M, Q, _ = C.shape
  chunk = max(1, min(P, aqlm_core.SCORE_BUDGET // (beam_size * Q)))
  pad = (-P) % chunk
  tp = jnp.pad(t, ((0, pad), (0, 0))).reshape(-1, chunk, g)
  pp = jnp.pad(prev, ((0, pad), (0, 0))).reshape(-1, chunk, M)
  found = jax.lax.map(lambda a: _additive_search(a[0], C, a[1], beam_size, sweeps),
                      (tp, pp)).reshape(-1, M)[:P]
  dec = lambda b: sum((C[m][b[:, m]] for m in range(M)), jnp.zeros((P, g), jnp.float32))
  d_new = jnp.sum(jnp.square(t - dec(found)), -1)
  d_prev = jnp.sum(jnp.square(t - dec(prev)), -1)
  return jnp.where((d_prev <= d_new)[:, None], prev, found)


def e8p_encode(x: jax.Array, prev: jax.Array) -> jax.Array:
  """Exact nearest E8P codes of 8-vectors ``x`` ``(..., 8)`` (already divided by the scale),
  keeping ``prev`` (same leading shape) where its codeword is as near (the table's duplicated
  entry). Returns ``int32`` codes in ``[0, 2**16)``."""
  new, _ = e8p_core.nearest(x)
  new = new.astype(jnp.int32)
  prev = prev.astype(jnp.int32)
  xf = x.astype(jnp.float32)
  d_new = jnp.sum(jnp.square(xf - e8p_core.decode(new)), -1)
  d_prev = jnp.sum(jnp.square(xf - e8p_core.decode(prev)), -1)
  return jnp.where(d_prev <= d_new, prev, new)
