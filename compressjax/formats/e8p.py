"""QuIP#'s E8P lattice-codebook format: 16-bit codes of 8 weights, one scale per layer.

References:
  Tseng et al., "QuIP#", ICML 2024, arXiv:2402.04396 (Sec. 4.2, the E8P codebook).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats import dispatch
from compressjax.formats import tiled
from compressjax.quantize import e8p_core

__all__ = ["E8PArray", "e8p_matmul_xla"]

@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class E8PArray(base.CompressedArray):
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

  codes: jax.Array
  scale: jax.Array
  dtype: object = dataclasses.field(metadata=dict(static=True), kw_only=True)

  #: Continuous children a fine-tune may train (codes are discrete).
  trainable: ClassVar[tuple[str, ...]] = ("scale",)

  def __post_init__(self):
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    cs = getattr(self.codes, "shape", None)
    if isinstance(cs, tuple) and len(cs) != 2:
      raise ValueError(f"E8PArray codes must be (K // 8, N), got shape {cs}")
    if getattr(self.codes, "dtype", np.uint16) != np.uint16:
      raise ValueError(f"E8PArray codes must be uint16, got {self.codes.dtype}")
    if tuple(getattr(self.scale, "shape", ())) != ():
      raise ValueError(f"E8PArray scale must be a scalar, got shape {self.scale.shape}")

  @property
  def shape(self) -> tuple[int, ...]:
    return (e8p_core.CODESZ * int(self.codes.shape[0]), int(self.codes.shape[1]))

  def __repr__(self):
    return f"E8PArray(shape={self.shape}, dtype={self.dtype.name})"

  def materialize(self) -> jax.Array:
    acc = base.accumulation_dtype(self.dtype)
    return (_decode_rows(self.codes, acc) * self.scale.astype(acc)).astype(self.dtype)


def _decode_rows(codes: jax.Array, dtype) -> jax.Array:
  """``(B, N)`` codes -> the unscaled ``(8 B, N)`` weight rows they encode."""
  b, n = codes.shape
  v = e8p_core.decode(codes, dtype)  # (B, N, 8)
  return jnp.swapaxes(v, 1, 2).reshape(b * e8p_core.CODESZ, n)


def _prepare_e8p_rows(w: E8PArray):
  def decode(start, size, dtype):
    acc = base.accumulation_dtype(dtype)
    codes = jax.lax.dynamic_slice_in_dim(w.codes, start // e8p_core.CODESZ,
                                         size // e8p_core.CODESZ, axis=0)
    return (_decode_rows(codes, acc) * w.scale.astype(acc)).astype(dtype)
  return decode


def e8p_matmul_xla(x: jax.Array, w: E8PArray) -> jax.Array:
  """``x @ W`` tiled over ``K`` (:func:`compressjax.formats.tiled.tiled_dot`): each tile's codes
  are decoded by the table gather and multiplied; the dense weight is never built."""
  return tiled.tiled_dot(x, w)


tiled.register_rows_decoder(E8PArray, _prepare_e8p_rows, lambda w: e8p_core.CODESZ)
jax.tree_util.register_dataclass(E8PArray, data_fields=["codes", "scale"], meta_fields=["dtype"])
dispatch.register_matmul(E8PArray, "xla", e8p_matmul_xla, priority=dispatch.FALLBACK_PRIORITY)
