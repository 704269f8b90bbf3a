"""QuIP#'s lattice-codebook formats: E8P (16-bit codes of 8 weights, one scale per layer), the
1-bit E8 codebook E81B (8-bit codes of 8 weights), and their residual sums (3 and 4 bits).

QuIP#'s 3- and 4-bit modes (E8P12RVQ3B, E8P12RVQ4B) store ``W = s (E8P(c1) + R(c2) / rs)``:
:func:`e8p_rvq` builds that as a :class:`~compressjax.formats.SumArray` of an :class:`E8PArray`
(scale ``s``) and a second lattice leaf with scale ``s / rs`` (:class:`E81BArray` for 3 bits,
:class:`E8PArray` for 4), so a product decodes both terms tile by tile through the sum's
tiled path and the dense weight is never built.

References:
  Tseng et al., "QuIP#", ICML 2024, arXiv:2402.04396 (Sec. 4.2, the E8P codebook; Sec. 4.3 and
  App. residual vector quantization for 3 and 4 bits). Cornell-RelaxML/quip-sharp
  ``lib/codebook/latticee8_padded12_rvq3bit.py`` (``get_e81bgrid``),
  ``latticee8_padded12_rvq4bit.py``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats import composite
from compressjax.formats import dispatch
from compressjax.formats import tiled
from compressjax.quantize import e8p_core

__all__ = ["E81BArray", "E8PArray", "e81b_matmul_xla", "e8p_matmul_xla", "e8p_rvq"]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _LatticeCodes(base.CompressedArray):
  """``W = scale * decode(codes)`` for a fixed 8-dimensional lattice codebook (no stored table).

  The shared part of :class:`E8PArray` and :class:`E81BArray`: ``codes`` is ``(K // 8, N)`` of
  the subclass's ``CODE_DTYPE``, ``codes[b, n]`` encoding the 8-vector ``W[8b:8b+8, n]``;
  ``scale`` is a float32 scalar; the subclass's ``DECODE`` maps codes to ``(..., 8)`` vectors.
  """

  codes: jax.Array
  scale: jax.Array
  dtype: object = dataclasses.field(metadata=dict(static=True), kw_only=True)

  #: Continuous children a fine-tune may train (codes are discrete).
  trainable: ClassVar[tuple[str, ...]] = ("scale",)
  CODE_DTYPE: ClassVar[type] = np.uint16
  DECODE: ClassVar = None  # (codes, dtype) -> (..., 8) unscaled vectors

  def __post_init__(self):
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    name, cdt = type(self).__name__, np.dtype(self.CODE_DTYPE)
    cs = getattr(self.codes, "shape", None)
    if isinstance(cs, tuple) and len(cs) != 2:
      raise ValueError(f"{name} codes must be (K // 8, N), got shape {cs}")
    if getattr(self.codes, "dtype", cdt) != cdt:
      raise ValueError(f"{name} codes must be {cdt}, got {self.codes.dtype}")
    if tuple(getattr(self.scale, "shape", ())) != ():
      raise ValueError(f"{name} scale must be a scalar, got shape {self.scale.shape}")

  @property
  def shape(self) -> tuple[int, ...]:
    return (e8p_core.CODESZ * int(self.codes.shape[0]), int(self.codes.shape[1]))

  def __repr__(self):
    return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype.name})"

  def decode_rows(self, codes: jax.Array, dtype) -> jax.Array:
    """``(B, N)`` codes -> the unscaled ``(8 B, N)`` weight rows they encode."""
    b, n = codes.shape
    v = type(self).DECODE(codes, dtype)  # (B, N, 8)
    return jnp.swapaxes(v, 1, 2).reshape(b * e8p_core.CODESZ, n)

  def materialize(self) -> jax.Array:
    acc = base.accumulation_dtype(self.dtype)
    return (self.decode_rows(self.codes, acc) * self.scale.astype(acc)).astype(self.dtype)


def _prepare_lattice_rows(w: _LatticeCodes):
  def decode(start, size, dtype):
    acc = base.accumulation_dtype(dtype)
    codes = jax.lax.dynamic_slice_in_dim(w.codes, start // e8p_core.CODESZ,
                                         size // e8p_core.CODESZ, axis=0)
    return (w.decode_rows(codes, acc) * w.scale.astype(acc)).astype(dtype)
  return decode


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class E8PArray(_LatticeCodes):
  """``W = scale * E8P(codes)``: ``(K, N)`` weight as 16-bit E8P lattice codes.

  Invariants: ``codes`` is ``(K // 8, N)`` ``uint16``; ``codes[b, n]`` encodes the 8-vector
  ``W[8b:8b+8, n]`` (8 consecutive *input* rows of output column ``n``) in the layout of
  :mod:`compressjax.quantize.e8p_core` (8-bit table index, 7 sign bits, 1 shift bit);
  ``scale`` is a float32 scalar ``()``; ``shape = (8 * codes.shape[0], codes.shape[1])``.
  No codebook is stored: the ``256 x 8`` absolute-value table is the module constant
  ``e8p_core.ABS_GRID``. Storage is exactly 2 bits per weight plus 4 bytes.

  Examples:
    >>> import jax.numpy as jnp
    >>> codes = jnp.asarray([[0, 1, 2], [259, 0, 0]], jnp.uint16)
    >>> w = E8PArray(codes, jnp.full((), 2.0, jnp.float32), dtype=jnp.float32)
    >>> w.shape, w.nbytes
    ((16, 3), 16)
    >>> w.materialize()[:, 0].tolist()  # 2 * (S[0] - 1/4), then 2 * ((0.5 x 7, -1.5) + 1/4)
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, -2.5]
  """

  CODE_DTYPE: ClassVar[type] = np.uint16
  DECODE: ClassVar = staticmethod(e8p_core.decode)


def e8p_matmul_xla(x: jax.Array, w: E8PArray) -> jax.Array:
  """``x @ W`` tiled over ``K`` (:func:`compressjax.formats.tiled.tiled_dot`): each tile's codes
  are decoded by the table gather and multiplied; the dense weight is never built."""
  return tiled.tiled_dot(x, w)


tiled.register_rows_decoder(E8PArray, _prepare_lattice_rows, lambda w: e8p_core.CODESZ)
jax.tree_util.register_dataclass(E8PArray, data_fields=["codes", "scale"], meta_fields=["dtype"])
dispatch.register_matmul(E8PArray, "xla", e8p_matmul_xla, priority=dispatch.FALLBACK_PRIORITY)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class E81BArray(_LatticeCodes):
  """``W = scale * E81B(codes)``: ``(K, N)`` weight as 8-bit codes of QuIP#'s 1-bit E8 codebook.

  Invariants: ``codes`` is ``(K // 8, N)`` ``uint8``; ``codes[b, n]`` indexes the 256-point table
  ``e8p_core.E81B_GRID`` (the origin and the 240 roots of ``E8`` plus 15 points ``+-2 e_k``)
  for the 8-vector ``W[8b:8b+8, n]``; ``scale`` is a float32 scalar ``()``;
  ``shape = (8 * codes.shape[0], codes.shape[1])``. No codebook is stored (module constant).
  Storage is exactly 1 bit per weight plus 4 bytes. It is the residual stage of QuIP#'s 3-bit
  mode (:func:`e8p_rvq`).

  Examples:
    >>> import jax.numpy as jnp
    >>> w = E81BArray(jnp.asarray([[56, 255]], jnp.uint8), jnp.full((), 0.5), dtype=jnp.float32)
    >>> w.shape, w.nbytes, w.materialize()[:, 1].tolist()  # the origin, then 0.5 * (-2 e_6)
    ((8, 2), 6, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0])
  """

  CODE_DTYPE: ClassVar[type] = np.uint8
  DECODE: ClassVar = staticmethod(e8p_core.e81b_decode)


def e81b_matmul_xla(x: jax.Array, w: E81BArray) -> jax.Array:
  """``x @ W`` tiled over ``K`` (:func:`compressjax.formats.tiled.tiled_dot`), as E8P's."""
  return tiled.tiled_dot(x, w)


tiled.register_rows_decoder(E81BArray, _prepare_lattice_rows, lambda w: e8p_core.CODESZ)
jax.tree_util.register_dataclass(E81BArray, data_fields=["codes", "scale"], meta_fields=["dtype"])
dispatch.register_matmul(E81BArray, "xla", e81b_matmul_xla, priority=dispatch.FALLBACK_PRIORITY)


def e8p_rvq(codes: jax.Array, resid_codes: jax.Array, scale: jax.Array, resid_scale: float,
            *, dtype) -> composite.SumArray:
  """QuIP#'s 3- or 4-bit RVQ weight ``scale * (E8P(codes) + R(resid_codes) / resid_scale)``.

  A :class:`~compressjax.formats.SumArray` of ``E8PArray(codes, scale)`` and the residual leaf
  with scale ``scale / resid_scale``: :class:`E81BArray` when ``resid_codes`` is ``uint8``
  (E8P12RVQ3B, 3 bits per weight + 8 bytes), :class:`E8PArray` when it is ``uint16``
  (E8P12RVQ4B, 4 bits per weight + 8 bytes). Both scales are stored (and trainable).

  Args:
    codes: ``(K // 8, N)`` ``uint16`` E8P codes (:func:`e8p_core.rvq_quantize`).
    resid_codes: ``(K // 8, N)`` second-stage codes, ``uint8`` (E81B) or ``uint16`` (E8P).
    scale: the float32 layer scale ``()``.
    resid_scale: the residual's magnification (a positive float).
    dtype: the weight's dtype.
  """
  if not resid_scale > 0:
    raise ValueError(f"e8p_rvq: resid_scale must be > 0, got {resid_scale!r}")
  scale = jnp.asarray(scale, jnp.float32)
  s2 = (scale / jnp.float32(resid_scale)).astype(jnp.float32)
  rdt = getattr(resid_codes, "dtype", None)
  if rdt == np.uint8:
    resid = E81BArray(resid_codes, s2, dtype=dtype)
  elif rdt == np.uint16:
    resid = E8PArray(resid_codes, s2, dtype=dtype)
  else:
    raise ValueError(f"e8p_rvq: resid_codes must be uint8 (E81B, 3 bits) or uint16 (E8P, 4 bits), "
                     f"got {rdt}")
  first = E8PArray(codes, scale, dtype=dtype)
  return composite.SumArray((first, resid), shape=first.shape, dtype=first.dtype)
