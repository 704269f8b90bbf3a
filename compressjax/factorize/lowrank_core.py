"""Low-rank factorization math: truncated SVD, activation-aware (whitened) SVD, EoRA
compensation, quantized + low-rank (LQ-LoRA) decomposition, rank allocation. Pure arrays.

Kernels are ``(K, N) = (in, out)`` with ``y = x @ W``. For calibration inputs ``X`` with
``H = X^T X = Q diag(lam) Q^T``, the output error of a change ``D`` is

    ||X D||_F^2 = tr(D^T H D) = ||M D||_F^2,   M = diag(sqrt(lam)) Q^T,

so the rank-``r`` ``W'`` minimizing ``||X (W - W')||`` is ``M^{-1} (M W)_r`` with ``(.)_r`` the
truncated SVD (Eckart-Young in the whitened space). Plain SVD is the case ``H = I``.
Directions the inputs never excite (``lam = 0``) are damped to ``percdamp * mean(lam)`` so ``M``
is invertible; they carry no output error either way.

Factors are returned as ``A = M^{-1} U_r sqrt(S_r)`` ``(K, r)`` and ``B = sqrt(S_r) V_r^T``
``(r, N)`` (balanced, so both quantize alike).

References:
  Eckart & Young 1936; Wang et al. 2024, SVD-LLM (arXiv:2403.07378: whitening by the input
  covariance); Yuan et al. 2023, ASVD (arXiv:2312.05821); Liu et al. 2024, EoRA
  (arXiv:2410.21271: the residual's low-rank fit in the eigenspace of the activations);
  Guo et al. 2024, LQ-LoRA (arXiv:2311.12023: alternating quantization and low-rank fitting).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# pylint: disable=invalid-name

__all__ = ["whitening", "factorize", "spectrum", "eora_factors", "lq_decompose",
           "allocate_ranks", "rank_for_fraction"]


def whitening(H: jax.Array | None, k: int, percdamp: float = 1e-4):
  """``(M, M_inv)`` with ``||X D||^2 = ||M D||^2`` (identity when ``H`` is ``None``)."""
  if H is None:
    eye = jnp.eye(k, dtype=jnp.float32)
    return eye, eye
  Hf = jnp.asarray(H, jnp.float32)
  Hf = (Hf + Hf.T) / 2
  lam, Q = jnp.linalg.eigh(Hf)
  lam = jnp.maximum(lam, 0.0)
  lam = lam + percdamp * jnp.mean(lam) + jnp.finfo(jnp.float32).tiny
  s = jnp.sqrt(lam)
  return s[:, None] * Q.T, Q / s[None, :]


def spectrum(W: jax.Array, H: jax.Array | None = None, percdamp: float = 1e-4) -> jax.Array:
  """Singular values of the whitened weight ``M W`` (descending); ``sum(s[r:]**2)`` is the
  output error ``||X (W - W_r)||^2`` of the best rank-``r`` approximation."""
  M, _ = whitening(H, W.shape[0], percdamp)
  return jnp.linalg.svd(M @ W.astype(jnp.float32), compute_uv=False)


def factorize(W: jax.Array, rank: int, H: jax.Array | None = None,
              percdamp: float = 1e-4) -> tuple[jax.Array, jax.Array]:
  """Best rank-``rank`` ``(A, B)`` of ``W`` in output error for inputs with ``X^T X = H``
  (plain truncated SVD when ``H`` is ``None``).

  Examples:
    >>> import jax.numpy as jnp
    >>> W = jnp.arange(12.0).reshape(4, 3)
    >>> A, B = factorize(W, 3)
    >>> bool(jnp.allclose(A @ B, W, atol=1e-4))
    True
  """
  k, n = W.shape
  if not isinstance(rank, int) or not 1 <= rank <= min(k, n):
    raise ValueError(f"rank must be an int in [1, min(K, N) = {min(k, n)}], got rank={rank!r}")
  M, M_inv = whitening(H, k, percdamp)
  U, S, Vt = jnp.linalg.svd(M @ W.astype(jnp.float32), full_matrices=False)
  r = jnp.sqrt(S[:rank])
  return (M_inv @ (U[:, :rank] * r[None, :])), (r[:, None] * Vt[:rank])


def eora_factors(W: jax.Array, W_c: jax.Array, H: jax.Array, rank: int,
                 percdamp: float = 1e-4) -> tuple[jax.Array, jax.Array]:
  """EoRA: the rank-``rank`` correction ``A @ B`` of the compression residual ``W - W_c`` that
  removes the most output error on inputs with ``X^T X = H`` (the residual projected on the
  activations' eigenspace, scaled by the square-rooted eigenvalues, truncated, projected back).

  The compensated error ``||X (W - W_c - A B)||`` is never larger than ``||X (W - W_c)||``.
  """
  return factorize(W.astype(jnp.float32) - W_c.astype(jnp.float32), rank, H, percdamp)


def lq_decompose(W: jax.Array, quantize: Callable[[jax.Array], object], rank: int,
                 H: jax.Array | None = None, iters: int = 5, percdamp: float = 1e-4):
  """LQ-LoRA: ``W ~ Q + A @ B`` by alternating ``Q = quantize(W - A B)`` and
  ``A, B = factorize(W - Q, rank, H)``.

  Args:
    W: ``(K, N)`` weight.
    quantize: maps a dense ``(K, N)`` array to a compressed leaf (``materialize()``-able).
    rank: rank of the low-rank part.
    H: optional ``X^T X`` (output-error weighting of both steps' objective; the quantizer itself
      is whatever ``quantize`` does).
    iters: alternations; the iterate with the smallest (weighted) error is returned.

  Returns:
    ``(q_leaf, A, B, errors)`` with ``errors`` the weighted error of every iterate.
  """
  M, _ = whitening(H, W.shape[0], percdamp)
  Wf = W.astype(jnp.float32)
  A = jnp.zeros((W.shape[0], rank), jnp.float32)
  B = jnp.zeros((rank, W.shape[1]), jnp.float32)
  best, errors = None, []
  for _ in range(iters):
    q = quantize(Wf - A @ B)
    qd = q.materialize().astype(jnp.float32)
    A, B = factorize(Wf - qd, rank, H, percdamp)
    err = float(jnp.sum(jnp.square(M @ (Wf - qd - A @ B))))
    errors.append(err)
    if best is None or err < best[0]:
      best = (err, q, A, B)
  return best[1], best[2], best[3], errors


def rank_for_fraction(k: int, n: int, keep_fraction: float) -> int:
  """Largest rank whose factors hold at most ``keep_fraction`` of the ``K N`` parameters."""
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
  return max(1, min(min(k, n), int(keep_fraction * k * n // (k + n))))


def allocate_ranks(spectra: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]],
                   budget: float) -> dict[str, int]:
  """Ranks per layer under a total parameter budget (``sum r (K + N) <= budget``).

  Greedy on the relative output error removed per parameter: component ``i`` of layer ``l``
  is worth ``s_i^2 / ||M W||^2 / (K + N)``; singular values decrease, so taking components in
  that order is consistent within a layer. Every layer gets rank >= 1.
  """
  items = []
  ranks = {p: 1 for p in spectra}
  used = sum(k + n for k, n in shapes.values())
  for p, s in spectra.items():
    s2 = np.asarray(s, np.float64) ** 2
    k, n = shapes[p]
    total = max(s2.sum(), 1e-30)
    items += [(-(s2[i] / total) / (k + n), p, k + n) for i in range(1, len(s2))]
  items.sort()
  for _, p, cost in items:
    if used + cost > budget:
      continue
    ranks[p] += 1
    used += cost
  return ranks
