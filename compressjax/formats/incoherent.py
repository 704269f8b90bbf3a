"""Incoherence-processed weights: an inner leaf seen through random signs and Hadamard rotations.

:class:`Incoherent` stores ``W = diag(su) H_in Wt H_out^T diag(sv)`` with ``Wt`` any leaf (dense
or compressed) and ``su``, ``sv`` random signs, one bit each. A product rotates the activations
with the fast Hadamard transform, multiplies by ``Wt`` through :func:`~compressjax.formats.dot`
(so ``Wt``'s own kernels run) and rotates the outputs back; ``W`` is never formed.

References:
  Tseng et al. 2024, QuIP# (arXiv:2402.04396), Sec. 3 (randomized Hadamard transform);
  Chee et al. 2023, QuIP (incoherence processing).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats import dispatch
from compressjax.formats import packing
from compressjax.quantize import hadamard_core

__all__ = ["Incoherent", "pack_signs", "unpack_signs"]


def pack_signs(s: jax.Array) -> jax.Array:
  """Packs a ``(n,)`` vector of +-1 into ``uint32`` words, 1 bit per sign (bit 1 = ``-1``)."""
  return packing.pack((s < 0).astype(jnp.uint8), bits=1, axis=0)


def unpack_signs(packed: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
  """The ``(n,)`` +-1 vector :func:`pack_signs` packed, in ``dtype``."""
  bits = packing.unpack(packed, bits=1, length=n, axis=0)
  return (1 - 2 * bits.astype(jnp.int32)).astype(dtype)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Incoherent(base.CompressedArray):
  """``W = diag(su) H_in Wt H_out^T diag(sv)``: a ``(K, N)`` kernel stored rotated.

  ``H_in = hadamard_matrix(K)``, ``H_out = hadamard_matrix(N)`` are the orthogonal
  ``(H_k kron H_{n/k}) / sqrt(n)`` of :mod:`compressjax.quantize.hadamard_core` (both ``K`` and
  ``N`` must be supported sizes there). ``x @ W = ((x * su) @ H_in) @ Wt @ H_out^T * sv``.

  Invariants: ``inner`` is ``Wt``, a 2-D dense array or compressed leaf of shape ``(K, N)``;
  ``su_bits`` / ``sv_bits`` are ``uint32`` ``(ceil(K/32),)`` / ``(ceil(N/32),)``: the signs of
  ``su`` ``(K,)`` and ``sv`` ``(N,)`` bit-packed LSB first (:func:`pack_signs`, bit 1 = ``-1``,
  padding bits 0). ``shape`` and ``dtype`` are ``inner``'s. ``nbytes`` counts the inner leaf's
  bytes plus ``4 (ceil(K/32) + ceil(N/32))`` for the signs. No continuous child of its own
  (``trainable = ()``): the inner leaf declares its own.

  Examples:
    >>> import jax.numpy as jnp
    >>> w = Incoherent.rotate(jnp.eye(12, 4), jnp.ones(12), jnp.ones(4))
    >>> w.shape, w.nbytes, bool(jnp.allclose(w.materialize(), jnp.eye(12, 4), atol=1e-6))
    ((12, 4), 200, True)
  """

  inner: Any
  su_bits: jax.Array
  sv_bits: jax.Array

  trainable: ClassVar[tuple[str, ...]] = ()

  def __post_init__(self):
    s = getattr(self.inner, "shape", None)
    if isinstance(s, tuple) and len(s) != 2:
      raise ValueError(f"Incoherent: inner must be 2-D (K, N), got shape {s}.")
    if isinstance(s, tuple):
      k, n = (int(d) for d in s)
      for name, bits, d in (("su_bits", self.su_bits, k), ("sv_bits", self.sv_bits, n)):
        bs = getattr(bits, "shape", None)
        if isinstance(bs, tuple) and bs != (packing.packed_length(d, 1),):
          raise ValueError(f"Incoherent: {name} must have shape "
                           f"({packing.packed_length(d, 1)},) for {d} signs, got {bs}.")

  @classmethod
  def rotate(cls, w: jax.Array, su: jax.Array, sv: jax.Array) -> "Incoherent":
    """The incoherent form of a dense ``(K, N)`` kernel ``w`` (``inner`` dense, ``w.dtype``).

    Raises:
      ValueError: ``K`` or ``N`` is not a size the Hadamard transform supports.
    """
    if getattr(w, "ndim", None) != 2:
      raise ValueError(f"Incoherent: expects a 2-D (K, N) kernel, got shape {w.shape}")
    for d in w.shape:
      hadamard_core.get_hadK(d)
    wt = hadamard_core.incoherent_weight(w, su, sv).astype(w.dtype)
    return cls(wt, pack_signs(su), pack_signs(sv))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(int(d) for d in self.inner.shape)

  @property
  def dtype(self):
    return np.dtype(self.inner.dtype)

  def __repr__(self):
    return f"Incoherent(shape={self.shape}, dtype={self.dtype.name}, inner={type(self.inner).__name__})"

  def signs(self, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``(su, sv)`` as +-1 vectors of length ``K`` and ``N``."""
    k, n = self.shape
    return unpack_signs(self.su_bits, k, dtype), unpack_signs(self.sv_bits, n, dtype)

  def materialize(self) -> jax.Array:
    acc = base.accumulation_dtype(self.dtype)
    su, sv = self.signs(acc)
    wt = dispatch.materialize(self.inner).astype(acc)
    return hadamard_core.coherent_weight(wt, su, sv).astype(self.dtype)

  def rotate_inputs(self, x: jax.Array) -> jax.Array:
    """``x' = (x * su) @ H_in``, the inputs ``inner`` sees (float32, or float64 for float64)."""
    acc = base.accumulation_dtype(x.dtype, self.dtype)
    su, _ = self.signs(acc)
    return hadamard_core.matmul_hadU(x.astype(acc) * su)

  def rotate_stats(self, stats):
    """Calibration statistics of the rotated inputs ``x'`` from those of ``x``.

    ``stats`` is a :class:`compressjax.calibration.LayerStats`: ``hessian`` (``sum x x^T``) is
    rotated exactly, ``H' = H_in^T diag(su) H diag(su) H_in``; ``sq_sum`` is ``diag(H')`` (exact);
    ``abs_sum`` (``sum |x'_j|``) cannot be recovered from second moments and is estimated as for
    a Gaussian, ``sqrt(2/pi) sqrt(n sq_sum')``: each ``x'_j`` is a random-sign sum of all ``K``
    inputs, close to normal after the transform (the point of incoherence processing), and the
    estimate never exceeds the Cauchy-Schwarz bound ``sqrt(n sq_sum')``. ``n`` is unchanged.
    """
    acc = jnp.float32
    su, _ = self.signs(acc)
    h = hadamard_core.incoherent_hessian(stats.hessian.astype(acc), su).astype(stats.hessian.dtype)
    sq = jnp.diagonal(h)
    ab = jnp.sqrt(2.0 / np.pi) * jnp.sqrt(jnp.maximum(stats.n, 0.0) * jnp.maximum(sq, 0.0))
    return dataclasses.replace(stats, hessian=h, sq_sum=sq.astype(stats.sq_sum.dtype),
                               abs_sum=ab.astype(stats.abs_sum.dtype))


def incoherent_matmul_xla(x: jax.Array, w: Incoherent) -> jax.Array:
  """``(dot((x * su) @ H_in, Wt) @ H_out^T) * sv`` with fast Hadamard transforms."""
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  _, sv = w.signs(acc)
  xr = w.rotate_inputs(x).astype(out_dtype)
  y = dispatch.dot(xr, w.inner).astype(acc)
  return (hadamard_core.matmul_hadUt(y) * sv).astype(out_dtype)


jax.tree_util.register_dataclass(Incoherent, data_fields=["inner", "su_bits", "sv_bits"],
                                 meta_fields=[])
dispatch.register_matmul(Incoherent, "xla", incoherent_matmul_xla,
                         priority=dispatch.FALLBACK_PRIORITY)
