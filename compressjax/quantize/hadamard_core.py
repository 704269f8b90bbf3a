"""Hadamard matrices and the fast randomized Hadamard transform of QuIP#'s incoherence processing.

A Hadamard matrix ``H`` of order ``n`` has entries ``+-1`` and ``H H^T = n I``; ``H / sqrt(n)``
is orthogonal. Orders are built from their definitions:

* Sylvester: ``H_1 = [1]``, ``H_{2m} = [[H_m, H_m], [H_m, -H_m]]`` (every power of two);
* Paley construction I: order ``q + 1`` for a prime ``q = 3 (mod 4)`` (4, 8, 12, 20, 24, 32,
  44, 48, 60, 68, 72, 80, 84, 104, 108, 128, 132, 140, ...);
* Paley construction II: order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)`` (12, 28, 36, 60, 76,
  84, 108, 124, ...).

**Supported sizes.** Write ``n = 2^a m`` with ``m`` odd. ``n`` is supported when ``m = 1`` (pure
Sylvester), or when some ``K = 2^b m`` with ``2 <= b <= a`` is a Paley order (I or II over a
prime field); then ``H_n = H_K kron H_{n/K}`` with the smallest such ``K`` (as QuIP#'s
``get_hadK`` picks ``K`` with ``n / K`` a power of two). The reference model's widths: 576 =
36 x 16, 192 = 12 x 16, 1536 = 12 x 128, 64 = 2^6. Unsupported: odd ``n > 1``, ``n = 2 m`` with
``m > 1`` odd, and ``K`` that need a prime-power field or another construction (52, 92, 116,
156, 172, ... : QuIP#'s hard-coded 52/140/156/172 tables are not rebuilt here, except where a
Paley order gives the same ``K``, e.g. 140 = 139 + 1).
:func:`get_hadK` raises ``ValueError`` naming the size otherwise.

The fast transform :func:`matmul_hadU` computes ``x @ hadamard_matrix(n)`` along the last axis
with ``log2(n / K)`` butterfly stages (reshapes and adds, no ``n x n`` matrix) and one small
``K x K`` product: ``O(n (log2(n/K) + K))`` per row instead of ``n^2``.

References:
  Tseng, Chee, Sun, Kuleshov, De Sa 2024, QuIP#: Even Better LLM Quantization with Hadamard
  Incoherence and Lattice Codebooks (arXiv:2402.04396), Sec. 3 (randomized Hadamard
  transform); reference code ``Cornell-RelaxML/quip-sharp`` ``lib/utils/matmul_had.py``.
  Paley 1933, On orthogonal matrices; Sylvester 1867.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "get_hadK",
    "hadamard_matrix",
    "is_supported",
    "matmul_hadU",
    "matmul_hadUt",
    "paley_i",
    "paley_ii",
    "sylvester",
    "fwht",
]


def _is_prime(q: int) -> bool:
  if q < 2:
    return False
  return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
  """``Q[i, j] = chi(j - i)`` with ``chi`` the quadratic character of GF(q), ``q`` prime."""
  squares = np.zeros(q, bool)
  squares[(np.arange(1, q) ** 2) % q] = True
  chi = np.where(squares, 1, -1)
  chi[0] = 0
  idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
  return chi[idx].astype(np.int64)


def sylvester(n: int) -> np.ndarray:
  """Sylvester's Hadamard matrix of order ``n`` (a power of two), ``int64`` +-1 entries."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"sylvester: n must be a power of two, got {n}")
  h = np.ones((1, 1), np.int64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def paley_i(q: int) -> np.ndarray:
  """Paley construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q = 3 (mod 4)``.

  ``H = I + S`` with ``S = [[0, 1^T], [-1, Q]]`` skew-symmetric (``Q`` the Jacobsthal matrix) and
  ``S S^T = q I``, so ``H H^T = I - S^2 = (q + 1) I``.
  """
  if not (_is_prime(q) and q % 4 == 3):
    raise ValueError(f"paley_i: q must be a prime = 3 (mod 4), got {q}")
  s = np.zeros((q + 1, q + 1), np.int64)
  s[0, 1:] = 1
  s[1:, 0] = -1
  s[1:, 1:] = _jacobsthal(q)
  return np.eye(q + 1, dtype=np.int64) + s


def paley_ii(q: int) -> np.ndarray:
  """Paley construction II: a Hadamard matrix of order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)``.

  ``C = [[0, 1^T], [1, Q]]`` is a symmetric conference matrix; each ``0`` of ``C`` becomes
  ``[[1, -1], [-1, -1]]`` and each ``+-1`` becomes ``+-[[1, 1], [1, -1]]``.
  """
  if not (_is_prime(q) and q % 4 == 1):
    raise ValueError(f"paley_ii: q must be a prime = 1 (mod 4), got {q}")
  c = np.zeros((q + 1, q + 1), np.int64)
  c[0, 1:] = 1
  c[1:, 0] = 1
  c[1:, 1:] = _jacobsthal(q)
  zero_blk = np.array([[1, -1], [-1, -1]], np.int64)
  one_blk = np.array([[1, 1], [1, -1]], np.int64)
  return np.kron(np.eye(q + 1, dtype=np.int64), zero_blk) + np.kron(c, one_blk)


def _paley(k: int) -> np.ndarray | None:
  """A Paley Hadamard matrix of order ``k`` (a multiple of 4), or ``None`` if neither applies."""
  if _is_prime(k - 1) and (k - 1) % 4 == 3:
    return paley_i(k - 1)
  if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
    return paley_ii(k // 2 - 1)
  return None


@functools.lru_cache(maxsize=None)
def _had_k(n: int) -> tuple[np.ndarray | None, int]:
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"Hadamard transform: size must be a positive int, got {n!r}")
  n = int(n)
  a = (n & -n).bit_length() - 1  # n = 2^a m, m odd
  m = n >> a
  if m == 1:
    return None, 1
  for b in range(2, a + 1):
    h = _paley(m << b)
    if h is not None:
      h.setflags(write=False)
      return h, m << b
  raise ValueError(
      f"Hadamard transform: size n={n} (= 2^{a} x {m}) is not supported: it needs a Hadamard "
      f"matrix of order 2^b x {m} (2 <= b <= {a}) from Paley's constructions I (q + 1, q prime "
      f"= 3 mod 4) or II (2(q + 1), q prime = 1 mod 4), and none exists for this n. Supported: "
      "powers of two and e.g. 12, 20, 28, 36, 44, 60 times a power of two")


def get_hadK(n: int) -> tuple[np.ndarray | None, int]:  # pylint: disable=invalid-name
  """``(H_K, K)`` with ``n / K`` a power of two (QuIP#'s ``get_hadK``).

  ``H_K`` is the read-only ``int64`` +-1 Hadamard matrix of order ``K`` (unnormalized), or
  ``None`` when ``K = 1`` (``n`` a power of two). ``K = 2^b m`` is the smallest Paley order for
  the odd part ``m`` of ``n``.

  Raises:
    ValueError: ``n`` is not supported (see the module docstring).

  Examples:
    >>> get_hadK(576)[1], get_hadK(1536)[1], get_hadK(192)[1], get_hadK(64)[1]
    (36, 12, 12, 1)
  """
  return _had_k(int(n))


def is_supported(n: int) -> bool:
  """Whether :func:`get_hadK` (and so :func:`matmul_hadU`) supports size ``n``."""
  try:
    get_hadK(n)
    return True
  except ValueError:
    return False


def hadamard_matrix(n: int, dtype=np.float64) -> np.ndarray:
  """The dense orthogonal ``(H_K kron H_{n/K}) / sqrt(n)`` that :func:`matmul_hadU` applies."""
  hk, k = get_hadK(n)
  h = sylvester(n // k)
  if hk is not None:
    h = np.kron(hk, h)
  return (h / np.sqrt(n)).astype(dtype)


def fwht(x: jax.Array) -> jax.Array:
  """Unnormalized fast Walsh-Hadamard transform along the last axis: ``x @ sylvester(n)``.

  ``log2(n)`` butterfly stages, each a reshape to ``(..., n / 2h, 2, h)`` and one add and one
  subtract; ``n`` must be a power of two.
  """
  n = x.shape[-1]
  if n < 1 or n & (n - 1):
    raise ValueError(f"fwht: the last axis must be a power of two, got {n}")
  lead = x.shape[:-1]
  h = 1
  while h < n:
    y = x.reshape(lead + (n // (2 * h), 2, h))
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack((a + b, a - b), axis=-2).reshape(lead + (n,))
    h *= 2
  return x


def _compute_dtype(x) -> np.dtype:
  return np.dtype(np.float64) if np.dtype(x.dtype) == np.float64 else np.dtype(np.float32)


def _had(x: jax.Array, transpose: bool) -> jax.Array:
  n = x.shape[-1]
  hk, k = get_hadK(n)  # raises for unsupported n
  dt = _compute_dtype(x)
  m = n // k
  y = fwht(x.astype(dt).reshape(x.shape[:-1] + (k, m)))  # H_{n/K} on the trailing axis
  if hk is not None:
    hkm = jnp.asarray(hk.T if transpose else hk, dt)
    # x index i = kk * m + j; x @ (H_K kron H_m) contracts kk with H_K's rows.
    y = jnp.einsum("...kj,kl->...lj", y, hkm, precision=jax.lax.Precision.HIGHEST)
  return (y.reshape(x.shape) * (1.0 / math.sqrt(n))).astype(dt)


@jax.jit
def matmul_hadU(x: jax.Array) -> jax.Array:  # pylint: disable=invalid-name
  """``x @ hadamard_matrix(n)`` along the last axis (``n = x.shape[-1]``), in float32/float64.

  The power-of-two factor ``H_{n/K}`` runs as :func:`fwht` on the trailing ``n / K`` axis of
  ``x`` viewed as ``(..., K, n / K)``; ``H_K`` is one ``K x K`` product over the other axis.

  Raises:
    ValueError: unsupported ``n`` (see the module docstring).
  """
  return _had(x, transpose=False)


@jax.jit
def matmul_hadUt(x: jax.Array) -> jax.Array:  # pylint: disable=invalid-name
  """``x @ hadamard_matrix(n).T``: the inverse of :func:`matmul_hadU` (the matrix is orthogonal)."""
  return _had(x, transpose=True)


# ----------------------------------------------------------------------------------------------
# Incoherence processing of a (K, N) = (in, out) kernel, y = x @ W.
#
# Convention: W = diag(su) H_in Wt H_out^T diag(sv), with H_in = hadamard_matrix(K) and
# H_out = hadamard_matrix(N) (orthogonal). So x @ W = ((x * su) @ H_in) @ Wt @ H_out^T * sv, the
# inner weight sees the rotated inputs x' = (x * su) @ H_in, whose second moment is
# H' = H_in^T diag(su) H diag(su) H_in. (QuIP#'s (out, in) W_paper = W^T: its RHT with
# U = H_out diag(sv) on the outputs and V = H_in diag(su) on the inputs, up to transposes of the
# non-symmetric Paley factors.)
# ----------------------------------------------------------------------------------------------


@jax.jit
def incoherent_weight(w: jax.Array, su: jax.Array, sv: jax.Array) -> jax.Array:
  """``Wt = H_in^T diag(su) W diag(sv) H_out`` of a ``(K, N)`` kernel (``su`` ``(K,)``, ``sv``
  ``(N,)`` of +-1); exactly undone by :func:`coherent_weight`.

  References:
    QuIP# (arXiv:2402.04396) Alg. 1, ``incoherence_preprocess``.
  """
  dt = _compute_dtype(w)
  a = w.astype(dt) * su.astype(dt)[:, None] * sv.astype(dt)[None, :]
  b = matmul_hadU(a.T).T  # H_in^T A
  return matmul_hadU(b)  # (H_in^T A) H_out


@jax.jit
def coherent_weight(wt: jax.Array, su: jax.Array, sv: jax.Array) -> jax.Array:
  """``W = diag(su) H_in Wt H_out^T diag(sv)``: the inverse of :func:`incoherent_weight`.

  References:
    QuIP# (arXiv:2402.04396), ``incoherence_process``.
  """
  dt = _compute_dtype(wt)
  b = matmul_hadUt(wt.astype(dt).T).T  # H_in Wt
  c = matmul_hadUt(b)  # (H_in Wt) H_out^T
  return c * su.astype(dt)[:, None] * sv.astype(dt)[None, :]


@jax.jit
def incoherent_hessian(h: jax.Array, su: jax.Array) -> jax.Array:
  """``H' = H_in^T diag(su) H diag(su) H_in``: the ``(K, K)`` second moment of the rotated inputs
  ``x' = (x * su) @ H_in`` given that ``H`` of ``x`` (exact; symmetrized against rounding).

  References:
    QuIP# (arXiv:2402.04396) Sec. 3, ``RHT_H``.
  """
  dt = _compute_dtype(h)
  s = su.astype(dt)
  a = h.astype(dt) * s[:, None] * s[None, :]
  b = matmul_hadU(a)  # A H_in
  c = matmul_hadU(b.T).T  # H_in^T (A H_in)
  return 0.5 * (c + c.T)
