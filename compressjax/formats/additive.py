"""Additive multi-codebook quantization (AQLM): each weight vector is a sum of codewords.

:class:`AdditiveCodebookArray` cuts a ``(K, N)`` weight into vectors of ``g`` consecutive
*inputs* of one output (``W[i*g:(i+1)*g, n]``) and stores each as the sum of ``M`` codewords,
one from each of ``M`` learned codebooks of ``2**B`` entries, times a per-output scale.
``M * B / g`` code bits per weight (2x8 with ``g = 8``: 2 bits) plus the codebooks and scales.

Two ``"xla"`` matmul paths, chosen per shape by :func:`use_lut` (a rule measured on CPU):

* tiled decode: per ``K``-tile, gather and sum ``M`` codewords per vector and multiply
  (:mod:`compressjax.formats.tiled`); the dense weight is never formed;
* lookup table (few rows): ``lut = x_group @ codebooks^T``, ``(rows, K/g, M, 2**B)``, gathered by
  the codes and summed; the dense weight is never formed.

References:
  Egiazarian, Panferov, Kuznedelev, Frantar, Babenko, Alistarh, "Extreme Compression of Large
  Language Models via Additive Quantization" (AQLM), arXiv:2401.06118; the decode of
  ``Vahe1994/AQLM`` ``src/utils.py::_dequantize_weight`` (an embedding-bag sum times scales).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats import dispatch
from compressjax.formats import packing
from compressjax.formats import tiled

__all__ = ["AdditiveCodebookArray", "code_container", "decode", "use_lut"]


def code_container(nbits: int) -> str:
  """The narrowest container of ``nbits``-bit codes: ``"packed"`` (uint32 bitstream, ``B < 8``),
  ``"uint8"`` (``B == 8``) or ``"uint16"`` (``8 < B <= 16``)."""
  if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) or not 1 <= nbits <= 16:
    raise ValueError(f"nbits must be an int in [1, 16], got {nbits!r}")
  if nbits < 8:
    return "packed"
  return "uint8" if nbits == 8 else "uint16"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class AdditiveCodebookArray(base.CompressedArray):
  """``W[i*g + a, n] = scales[n] * sum_m codebooks[m, codes[i, n, m], a]`` (AQLM).

  Invariants (``K, N = shape``, ``g = in_group_size`` divides ``K``, ``I = K // g``,
  ``M = num_codebooks``, ``B = nbits``):

  * ``codebooks``: floating ``(M, 2**B, g)`` (``float16`` by default); entry ``[m, j]`` is
    codeword ``j`` of codebook ``m``.
  * ``codes``: the ``(I, N, M)`` integer codes ``0 <= c < 2**B`` in the narrowest container:
    ``uint8`` for ``B == 8``, ``uint16`` for ``8 < B <= 16``, and for ``B < 8`` a ``uint32``
    bitstream of ``B``-bit codes packed along axis 0 (:func:`compressjax.formats.pack`:
    ``(packed_length(I, B), N, M)``, padded with zero codes to a multiple of 32 along ``I``).
  * ``scales``: floating ``(N,)`` per-output scales (``float16`` by default).
  * ``dtype`` is what :meth:`materialize` returns. All three children count in :attr:`nbytes`.

  Bits per parameter: ``M * B / g`` for the codes, ``16 * M * 2**B * g / (K N)`` for
  ``float16`` codebooks and ``16 / K`` for the scales.

  Examples:
    >>> import jax.numpy as jnp
    >>> cb = jnp.arange(2 * 4 * 2, dtype=jnp.float16).reshape(2, 4, 2)
    >>> codes = jnp.zeros((3, 5, 2), jnp.int32).at[1, :, 0].set(3)
    >>> w = AdditiveCodebookArray.from_codes(codes, cb, jnp.ones(5, jnp.float16), nbits=2)
    >>> w.shape, w.materialize()[:, 0].tolist()
    ((6, 5), [8.0, 10.0, 14.0, 16.0, 8.0, 10.0])
  """

  codes: jax.Array
  codebooks: jax.Array
  scales: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), kw_only=True)
  dtype: Any = dataclasses.field(metadata=dict(static=True), kw_only=True)
  nbits: int = dataclasses.field(metadata=dict(static=True), kw_only=True)

  #: Continuous children a fine-tune may train (codes are discrete).
  trainable: ClassVar[tuple[str, ...]] = ("codebooks", "scales")

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    container = code_container(self.nbits)
    if len(self.shape) != 2:
      raise ValueError(f"AdditiveCodebookArray shape must be (K, N), got {self.shape}")
    cb = self.codebooks
    if hasattr(cb, "shape"):
      if len(cb.shape) != 3 or cb.shape[1] != 2**self.nbits:
        raise ValueError(f"codebooks must be (M, 2**nbits={2**self.nbits}, g), got {cb.shape}")
      k, n = self.shape
      g, m = cb.shape[2], cb.shape[0]
      if k % g:
        raise ValueError(f"in_group_size g={g} must divide K={k}")
      want = ((k // g, n, m) if container != "packed" else
              (packing.packed_length(k // g, self.nbits), n, m))
      want_dtype = {"packed": np.uint32, "uint8": np.uint8, "uint16": np.uint16}[container]
      if hasattr(self.codes, "shape") and (tuple(self.codes.shape) != want or
                                           np.dtype(self.codes.dtype) != want_dtype):
        raise ValueError(f"codes must be {np.dtype(want_dtype).name} {want} for nbits="
                         f"{self.nbits}, got {self.codes.dtype} {tuple(self.codes.shape)}")
      if hasattr(self.scales, "shape") and tuple(self.scales.shape) != (n,):
        raise ValueError(f"scales must be ({n},), got {tuple(self.scales.shape)}")

  def __repr__(self):
    return (f"AdditiveCodebookArray(shape={self.shape}, dtype={self.dtype.name}, "
            f"{self.num_codebooks}x{self.nbits}, in_group_size={self.in_group_size})")

  @property
  def num_codebooks(self) -> int:
    return int(self.codebooks.shape[0])

  @property
  def in_group_size(self) -> int:
    return int(self.codebooks.shape[2])

  @classmethod
  def from_codes(cls, codes, codebooks, scales, *, nbits: int, dtype: Any = jnp.float32
                 ) -> "AdditiveCodebookArray":
    """Builds the leaf from ``(I, N, M)`` integer ``codes`` (any int dtype), storing them in the
    narrowest container. ``shape`` is ``(I * g, N)``."""
    i, n, _ = codes.shape
    g = codebooks.shape[2]
    container = code_container(nbits)
    if container == "packed":
      stored = packing.pack(codes.astype(jnp.uint8), nbits, axis=0)
    else:
      stored = codes.astype(jnp.uint8 if container == "uint8" else jnp.uint16)
    return cls(stored, codebooks, scales, shape=(i * g, n), dtype=dtype, nbits=nbits)

  def code_values(self) -> jax.Array:
    """The ``(I, N, M)`` codes as ``int32``."""
    i = self.shape[0] // self.in_group_size
    if code_container(self.nbits) == "packed":
      return packing.unpack(self.codes, self.nbits, i, axis=0).astype(jnp.int32)
    return self.codes.astype(jnp.int32)

  def materialize(self) -> jax.Array:
    acc = base.accumulation_dtype(self.dtype)
    return decode(self.code_values(), self.codebooks.astype(acc),
                  self.scales.astype(acc)).astype(self.dtype)


def decode(codes: jax.Array, codebooks: jax.Array, scales: jax.Array) -> jax.Array:
  """Dense ``(K, N)`` weight of ``(I, N, M)`` codes, ``(M, 2**B, g)`` codebooks, ``(N,)`` scales."""
  i, n, m = codes.shape
  g = codebooks.shape[2]
  vec = jnp.zeros((i, n, g), codebooks.dtype)
  for mi in range(m):  # M is small (1-4): one gather per codebook
    vec = vec + codebooks[mi][codes[:, :, mi]]
  return (jnp.swapaxes(vec, 1, 2).reshape(i * g, n) * scales[None, :])


def use_lut(rows: int, w: AdditiveCodebookArray) -> bool:
  """Whether the lookup-table product is used for ``rows`` activation rows: ``2 * rows <= g``.

  The LUT gathers ``rows * (K/g) * N * M`` table entries, decode gathers ``K * N * M`` codeword
  entries and then multiplies, so the LUT wins while ``rows`` is below about ``g``. Measured on
  CPU (2 cores, idle, jitted, 576x1536, 2x8, g = 8), LUT vs decode: 1 row 0.24 vs 0.74 ms,
  2 rows 0.35 vs 0.74, 4 rows 0.56 vs 0.77, 8 rows 1.14 vs 0.81, 32 rows 4.9 vs 1.1 ms: the
  crossover is between 4 and 8 rows (``g / 2`` to ``g``).
  """
  return 2 * rows <= w.in_group_size


def additive_matmul_xla(x: jax.Array, w: AdditiveCodebookArray, *,
                        lut: bool | None = None) -> jax.Array:
  """``x @ W`` for an :class:`AdditiveCodebookArray`: lookup table for few rows, else decode.

  ``lut=None`` chooses by :func:`use_lut`; the result is in ``result_type(x, w.dtype)`` and
  accumulates in ``float32`` (or wider).
  """
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  k, n = w.shape
  batch = x.shape[:-1]
  rows = math.prod(batch)
  if lut is None:
    lut = use_lut(rows, w)
  if not lut:
    return tiled.tiled_dot(x, w)
  codes = w.code_values()
  g = w.in_group_size
  i = k // g
  xg = x.reshape((rows, i, g)).astype(acc)
  table = jnp.einsum("rig,mjg->rimj", xg, w.codebooks.astype(acc))  # (rows, I, M, 2**B)
  y = jnp.zeros((rows, n), acc)
  for mi in range(w.num_codebooks):
    t = table[:, :, mi, :]  # (rows, I, 2**B)
    picked = jnp.take_along_axis(t, jnp.broadcast_to(codes[None, :, :, mi], (rows, i, n)),
                                 axis=2)  # (rows, I, N)
    y = y + jnp.sum(picked, axis=1)
  y = y * w.scales.astype(acc)[None, :]
  return y.reshape(batch + (n,)).astype(out_dtype)


def _prepare_additive_rows(w: AdditiveCodebookArray):
  """Tile decoder: the tile's ``(T / g, N, M)`` codes summed from the codebooks."""
  g = w.in_group_size

  def decode_tile(start, size, dtype):
    acc = base.accumulation_dtype(dtype)
    i0, ni = start // g, size // g
    if code_container(w.nbits) == "packed":
      codes = packing.unpack_rows(w.codes, w.nbits, i0, ni).astype(jnp.int32)
    else:
      codes = jax.lax.dynamic_slice_in_dim(w.codes, i0, ni, axis=0).astype(jnp.int32)
    return decode(codes, w.codebooks.astype(acc), w.scales.astype(acc)).astype(dtype)

  return decode_tile


def _additive_alignment(w: AdditiveCodebookArray) -> int:
  packed = code_container(w.nbits) == "packed"
  return w.in_group_size * (packing.row_alignment(w.nbits) if packed else 1)


tiled.register_rows_decoder(AdditiveCodebookArray, _prepare_additive_rows, _additive_alignment)
jax.tree_util.register_dataclass(AdditiveCodebookArray,
                                 data_fields=["codes", "codebooks", "scales"],
                                 meta_fields=["shape", "dtype", "nbits"])
dispatch.register_matmul(AdditiveCodebookArray, "xla", additive_matmul_xla,
                         priority=dispatch.FALLBACK_PRIORITY)
