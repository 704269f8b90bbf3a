"""Pure math of discrete-code updates: re-encoding weights to a format's codes, and choosing
which codes may change (the V-step's subspace).

Everything takes and returns arrays (no formats, no trees): :mod:`compressjax.finetune.ste`
builds the leaves. Two code families:

* scalar grids (:class:`~compressjax.formats.QuantizedArray`): ``q = round(w / s) + 2**(b-1)``
  (symmetric) or ``q = round((w - z) / s)`` (asymmetric), clipped to ``[0, 2**b)``; one unit
  (a code) per weight;
* vector codebooks (:class:`~compressjax.formats.VQArray`): the nearest codeword of the
  vector's block codebook (squared Euclidean distance); one unit per ``dim``-vector.

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

__all__ = ["scalar_encode", "scalar_in_range", "select_top", "unit_priority", "vq_encode"]


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
  x = w.astype(jnp.float32).reshape(gk, vg, dim, gn, out_block).transpose(0, 3, 1, 4, 2)
  c = centroids.astype(jnp.float32)  # (gk, gn, E, d)
  dist = (jnp.sum(x * x, -1)[..., None] - 2 * jnp.einsum("ghvod,ghed->ghvoe", x, c)
          + jnp.sum(c * c, -1)[:, :, None, None, :])  # (gk, gn, vg, ob, E)
  best = jnp.argmin(dist, axis=-1).astype(jnp.int32)
  p = prev.astype(jnp.int32).reshape(gk, vg, gn, out_block).transpose(0, 2, 1, 3)
  d_prev = jnp.take_along_axis(dist, p[..., None], axis=-1)[..., 0]
  d_best = jnp.min(dist, axis=-1)
  best = jnp.where(d_prev <= d_best, p, best)
  return best.transpose(0, 2, 1, 3).reshape(k // dim, n)


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
