"""Bit-packing of low-bit integer codes into ``uint32`` words.

The layout is a plain little-endian bitstream along one axis: code ``i`` of a
block of 32 codes occupies bits ``[i * bits, (i + 1) * bits)`` of the block's
``32 * bits``-bit stream, and bit ``j`` of the stream is bit ``j % 32`` of word
``j // 32``. Every 32 consecutive codes therefore occupy exactly ``bits``
``uint32`` words, with no wasted bits, also for widths that do not divide 32
(3-bit codes straddle word boundaries). The packed axis is padded with zero
codes to a multiple of 32.

Layout of one block for ``bits=3`` (``c<i>`` is code ``i``, LSB first)::

  word 0: c0 c1 ... c9 (bits 0..29), c10 bits 0..1 (bits 30..31)
  word 1: c10 bit 2 (bit 0), c11 ... c20 (bits 1..30), c21 bit 0 (bit 31)
  word 2: c21 bits 1..2 (bits 0..1), c22 ... c31 (bits 2..31)

Everything here is pure ``jax.numpy`` on static shapes: it traces under
:func:`jax.jit` and :func:`jax.eval_shape`, and the only Python loops run over
the ``bits`` words of a block, never over array elements. The public functions
validate their static arguments and call a jitted body, so eager calls compile
once per shape.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BLOCK",
    "SUPPORTED_BITS",
    "gather",
    "pack",
    "packed_nbytes",
    "packed_length",
    "unpack",
    "unpack_rows",
]

#: Number of codes in one packed block; a block occupies ``bits`` words.
BLOCK = 32

#: Code widths that :func:`pack` and :func:`unpack` accept.
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: int) -> None:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or (
      int(bits) not in SUPPORTED_BITS):
    raise ValueError(
        f"bits must be one of {SUPPORTED_BITS}, got bits={bits!r}.")


def _normalize_axis(axis: int, ndim: int, name: str) -> int:
  if ndim == 0:
    raise ValueError(f"{name} must have at least one dimension, got a scalar.")
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"axis={axis} is out of bounds for {name} with {ndim} dimensions.")
  return axis % ndim


def packed_length(length: int, bits: int) -> int:
  """Returns the number of ``uint32`` words that ``length`` codes occupy.

  Args:
    length: number of codes along the packed axis (``>= 0``).
    bits: code width, one of :data:`SUPPORTED_BITS`.

  Returns:
    ``ceil(length / 32) * bits``.

  Raises:
    ValueError: if ``bits`` is unsupported or ``length`` is negative.

  Examples:
    >>> packed_length(64, 4)
    8
    >>> packed_length(33, 3)
    6
  """
  _check_bits(bits)
  if length < 0:
    raise ValueError(f"length must be >= 0, got length={length}.")
  return -(-int(length) // BLOCK) * int(bits)


def _lane_shape(ndim: int) -> tuple[int, ...]:
  """Shape that broadcasts a length-32 vector against ``(blocks, 32, ...)``."""
  return (1, BLOCK) + (1,) * (ndim - 1)


def pack(codes: jax.Array, bits: int, axis: int = 0) -> jax.Array:
  """Packs unsigned ``bits``-bit codes into a ``uint32`` bitstream along ``axis``.

  Args:
    codes: integer array of codes in ``[0, 2**bits)``. Range is *not* checked
      (that would need a device round trip): only the low ``bits`` bits of each
      code are stored, so out-of-range codes silently wrap modulo ``2**bits``.
    bits: code width, one of :data:`SUPPORTED_BITS`.
    axis: axis along which consecutive codes are packed.

  Returns:
    ``uint32`` array with the same shape as ``codes`` except along ``axis``,
    whose size becomes ``packed_length(codes.shape[axis], bits)``.

  Raises:
    ValueError: if ``bits`` is unsupported, ``codes`` is a scalar or not
      integer, or ``axis`` is out of bounds.

  Examples:
    >>> import jax.numpy as jnp
    >>> packed = pack(jnp.arange(8, dtype=jnp.uint8), bits=4)
    >>> packed.shape, packed.dtype
    ((4,), dtype('uint32'))
    >>> hex(int(packed[0]))
    '0x76543210'
    >>> unpack(packed, bits=4, length=8).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
  """
  _check_bits(bits)
  codes = jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise ValueError(f"codes must have an integer dtype, got {codes.dtype}.")
  axis = _normalize_axis(axis, codes.ndim, "codes")
  return _pack(codes, int(bits), axis)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack(codes: jax.Array, bits: int, axis: int) -> jax.Array:
  length = codes.shape[axis]
  x = jnp.moveaxis(codes, axis, 0)
  rest = x.shape[1:]
  n_blocks = -(-length // BLOCK)
  pad = n_blocks * BLOCK - length
  mask = np.uint32((1 << bits) - 1)
  x = x.astype(jnp.uint32) & mask
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * len(rest))
  x = x.reshape((n_blocks, BLOCK) + rest)

  lane = _lane_shape(x.ndim - 1)
  start = np.arange(BLOCK, dtype=np.int64) * bits  # stream offset of each code
  words = []
  for w in range(bits):
    # Offset of each code's bit 0 relative to bit 0 of word ``w``: codes with
    # ``shift >= 0`` enter shifted left (and are truncated at bit 31), codes
    # that started in the previous word contribute their high bits.
    shift = start - BLOCK * w
    overlaps = (shift > -bits) & (shift < BLOCK)
    left = np.clip(shift, 0, BLOCK - 1).astype(np.uint32).reshape(lane)
    right = np.clip(-shift, 0, BLOCK - 1).astype(np.uint32).reshape(lane)
    part = jnp.right_shift(jnp.left_shift(x, left), right)
    part = jnp.where(overlaps.reshape(lane), part, np.uint32(0))
    # The parts occupy disjoint bits, so their sum is their bitwise OR.
    words.append(jnp.sum(part, axis=1, dtype=jnp.uint32))
  packed = jnp.stack(words, axis=1).reshape((n_blocks * bits,) + rest)
  return jnp.moveaxis(packed, 0, axis)


def unpack(packed: jax.Array, bits: int, length: int,
           axis: int = 0) -> jax.Array:
  """Unpacks a ``uint32`` bitstream written by :func:`pack` into ``uint8`` codes.

  Args:
    packed: ``uint32`` array as returned by :func:`pack`.
    bits: code width used when packing, one of :data:`SUPPORTED_BITS`.
    length: true (unpadded) number of codes along ``axis``; padding is
      stripped.
    axis: the packed axis.

  Returns:
    ``uint8`` codes with ``packed``'s shape except ``length`` along ``axis``.

  Raises:
    ValueError: if ``bits`` is unsupported, ``packed`` is not ``uint32`` or its
      size along ``axis`` is not ``packed_length(length, bits)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> codes = jnp.array([[1, 7], [5, 0], [3, 2]], dtype=jnp.uint8)
    >>> packed = pack(codes, bits=3, axis=0)
    >>> packed.shape
    (3, 2)
    >>> bool((unpack(packed, bits=3, length=3, axis=0) == codes).all())
    True
  """
  _check_bits(bits)
  bits = int(bits)
  if packed.dtype != jnp.uint32:
    raise ValueError(f"packed must have dtype uint32, got {packed.dtype}.")
  axis = _normalize_axis(axis, packed.ndim, "packed")
  expected = packed_length(length, bits)
  if packed.shape[axis] != expected:
    raise ValueError(
        f"packed has {packed.shape[axis]} words along axis {axis}, but "
        f"length={length} codes of bits={bits} need "
        f"packed_length(length, bits)={expected}.")
  return _unpack(packed, bits, int(length), axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack(packed: jax.Array, bits: int, length: int, axis: int) -> jax.Array:
  x = jnp.moveaxis(packed, axis, 0)
  rest = x.shape[1:]
  n_blocks = x.shape[0] // bits
  x = x.reshape((n_blocks, bits) + rest)

  start = np.arange(BLOCK, dtype=np.int64) * bits
  first = start // BLOCK  # word holding each code's bit 0
  offset = start % BLOCK
  straddles = offset + bits > BLOCK
  second = np.minimum(first + 1, bits - 1)
  lane = _lane_shape(x.ndim - 1)
  lo = jnp.right_shift(
      jnp.take(x, first, axis=1),
      offset.astype(np.uint32).reshape(lane))
  hi = jnp.left_shift(
      jnp.take(x, second, axis=1),
      np.clip(BLOCK - offset, 0, BLOCK - 1).astype(np.uint32).reshape(lane))
  hi = jnp.where(straddles.reshape(lane), hi, np.uint32(0))
  codes = (lo | hi) & np.uint32((1 << bits) - 1)
  codes = codes.astype(jnp.uint8).reshape((n_blocks * BLOCK,) + rest)
  codes = codes[:length]
  return jnp.moveaxis(codes, 0, axis)


def packed_nbytes(shape: tuple[int, ...], bits: int, axis: int = 0) -> int:
  """Returns the bytes that :func:`pack` output for codes of ``shape`` uses.

  Examples:
    >>> packed_nbytes((576, 64), bits=4)
    18432
  """
  shape = tuple(shape)
  axis = _normalize_axis(axis, len(shape), "shape")
  n = packed_length(shape[axis], bits)
  return 4 * n * math.prod(shape[:axis] + shape[axis + 1:])


def unpack_rows(packed: jax.Array, bits: int, start, size: int) -> jax.Array:
  """Codes ``start .. start + size`` along axis 0 of a :func:`pack` ``ed`` (axis 0) array.

  Reads only the words that hold those codes: the block unpacker for tiled products.

  Args:
    packed: ``uint32`` ``(packed_length(L, bits), ...)`` as written by ``pack(codes, bits, 0)``.
    bits: code width.
    start: first code, a multiple of :data:`BLOCK` (may be traced).
    size: number of codes (static); ``start + size <= L`` (the words past ``L`` are padding).

  Returns:
    ``uint8`` ``(size, ...)`` codes.

  Examples:
    >>> import jax.numpy as jnp
    >>> p = pack(jnp.arange(96, dtype=jnp.uint8) % 8, bits=3)
    >>> unpack_rows(p, 3, 32, 4).tolist()
    [0, 1, 2, 3]
  """
  _check_bits(bits)
  words = packed_length(size, bits)
  w = jax.lax.dynamic_slice_in_dim(packed, (start // BLOCK) * bits, words, axis=0)
  return _unpack(w, int(bits), int(size), 0)


def gather(packed: jax.Array, bits: int, index: jax.Array) -> jax.Array:
  """Codes at positions ``index`` (any shape, ``int32``) of a 1-D :func:`pack` ``ed`` stream.

  Each code is read from the one or two words holding its bits (no unpacking of the stream),
  so the cost is that of the ``index`` array.

  Examples:
    >>> import jax.numpy as jnp
    >>> p = pack(jnp.arange(40, dtype=jnp.uint8) % 8, bits=3)
    >>> gather(p, 3, jnp.array([0, 10, 21, 39])).tolist()
    [0, 2, 5, 7]
  """
  _check_bits(bits)
  if packed.ndim != 1:
    raise ValueError(f"packed must be 1-D, got shape {packed.shape}.")
  idx = index.astype(jnp.int32)
  blk, lane = idx // BLOCK, idx % BLOCK
  bitpos = lane * bits  # within the block's ``bits`` words
  first = blk * bits + bitpos // BLOCK
  off = (bitpos % BLOCK).astype(jnp.uint32)
  lo = jnp.right_shift(jnp.take(packed, first, mode="clip"), off)
  if BLOCK % bits:  # widths that straddle words
    nxt = jnp.take(packed, jnp.minimum(first + 1, packed.shape[0] - 1), mode="clip")
    hi = jnp.left_shift(nxt, jnp.clip(np.uint32(BLOCK) - off, 0, BLOCK - 1).astype(jnp.uint32))
    lo = lo | jnp.where(off + np.uint32(bits) > BLOCK, hi, np.uint32(0))
  return (lo & np.uint32((1 << bits) - 1)).astype(jnp.uint8)
