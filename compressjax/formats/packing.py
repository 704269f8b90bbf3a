"""Bit-packing of low-bit integer codes into ``uint32`` words.

Two layouts, both LSB first along one axis:

* **Per word** (3-bit codes): ``10`` codes per ``uint32``, code ``i`` in bits
  ``[3 * (i % 10), 3 * (i % 10) + 3)`` of word ``i // 10``; bits 30 and 31 are unused
  (3.2 bits per code). A kernel unpacks a word with one shift and one mask per code, and
  a tile of ``10 * t`` consecutive codes is exactly ``t`` words. The packed axis is padded
  with zero codes to a multiple of 10.
* **Bitstream** (every other width): code ``i`` of a block of 32 codes occupies bits
  ``[i * bits, (i + 1) * bits)`` of the block's ``32 * bits``-bit stream, and bit ``j`` of the
  stream is bit ``j % 32`` of word ``j // 32``; every 32 consecutive codes occupy exactly
  ``bits`` words. For 1, 2, 4 and 8 bits this is also "per word" (``32 / bits`` codes per word,
  none straddling). The packed axis is padded with zero codes to a multiple of 32.

Layout of 20 codes for ``bits=3`` (``c<i>`` is code ``i``)::

  word 0: c0 (bits 0..2), c1 (bits 3..5), ..., c9 (bits 27..29), bits 30..31 zero
  word 1: c10 ... c19

:data:`LAYOUT_VERSION` 1 stored 3-bit codes as a straddling bitstream (code 10 split over
words 0 and 1); :func:`pack_stream` / :func:`unpack_stream` still read and write it, and
:func:`restream` converts it (old checkpoints are converted on restore). Per-word packing
unpacks about 4.5x faster than the straddling stream on CPU
(``experiments/bench_layout3.py``) for 6.7% more bytes.

Everything here is pure ``jax.numpy`` on static shapes: it traces under
:func:`jax.jit` and :func:`jax.eval_shape`, and the only Python loops run over
the ``bits`` words of a block, never over array elements. The public functions
validate their static arguments and call a jitted body, so eager calls compile
once per shape.

References:
  Frantar et al., "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on Large
  Language Models", arXiv:2408.11743 (codes laid out so a register unpacks with shifts and
  masks); llama.cpp ``ggml-quants.c`` ``block_q3_K`` (3-bit codes kept off word boundaries).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BLOCK",
    "LAYOUT_VERSION",
    "PER_WORD_BITS",
    "SUPPORTED_BITS",
    "codes_per_word",
    "gather",
    "pack",
    "pack_stream",
    "packed_nbytes",
    "packed_length",
    "restream",
    "row_alignment",
    "stream_length",
    "unpack",
    "unpack_rows",
    "unpack_stream",
]

#: Number of codes in one packed block; a block occupies ``bits`` words.
BLOCK = 32

#: Code widths that :func:`pack` and :func:`unpack` accept.
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)

#: Widths packed per word (``32 // bits`` codes per ``uint32``, spare high bits zero) instead of
#: as a straddling bitstream.
PER_WORD_BITS = (3,)

#: 1: every width a bitstream (3-bit codes straddle words); 2: 3-bit codes 10 per word.
LAYOUT_VERSION = 2


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
    ``ceil(length / 10)`` for 3-bit codes (per word), else ``ceil(length / 32) * bits``.

  Raises:
    ValueError: if ``bits`` is unsupported or ``length`` is negative.

  Examples:
    >>> packed_length(64, 4)
    8
    >>> packed_length(33, 3)
    4
  """
  _check_bits(bits)
  if length < 0:
    raise ValueError(f"length must be >= 0, got length={length}.")
  if int(bits) in PER_WORD_BITS:
    return -(-int(length) // codes_per_word(bits))
  return stream_length(length, bits)


def stream_length(length: int, bits: int) -> int:
  """Words of the bitstream layout (:func:`pack_stream`): ``ceil(length / 32) * bits``.

  Examples:
    >>> stream_length(33, 3)
    6
  """
  _check_bits(bits)
  if length < 0:
    raise ValueError(f"length must be >= 0, got length={length}.")
  return -(-int(length) // BLOCK) * int(bits)


def codes_per_word(bits: int) -> int:
  """Codes in one ``uint32`` of the per-word layout: ``32 // bits``.

  Examples:
    >>> codes_per_word(3), codes_per_word(4)
    (10, 8)
  """
  _check_bits(bits)
  return BLOCK // int(bits)


def row_alignment(bits: int) -> int:
  """The multiple that :func:`unpack_rows` ``start`` must be: 32, and 160 for 3-bit codes
  (a multiple of both the 10 codes of a word and the 32-row blocks other formats tile by).

  Examples:
    >>> row_alignment(4), row_alignment(3)
    (32, 160)
  """
  _check_bits(bits)
  if int(bits) in PER_WORD_BITS:
    return math.lcm(BLOCK, codes_per_word(bits))
  return BLOCK


def _lane_shape(ndim: int) -> tuple[int, ...]:
  """Shape that broadcasts a length-32 vector against ``(blocks, 32, ...)``."""
  return (1, BLOCK) + (1,) * (ndim - 1)


def pack(codes: jax.Array, bits: int, axis: int = 0) -> jax.Array:
  """Packs unsigned ``bits``-bit codes into ``uint32`` words along ``axis`` (module docstring).

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
  if bits in PER_WORD_BITS:
    return _pack_words(codes, bits, axis)
  return _pack_stream(codes, bits, axis)


def _pack_words(codes: jax.Array, bits: int, axis: int) -> jax.Array:
  cpw = codes_per_word(bits)
  length = codes.shape[axis]
  x = jnp.moveaxis(codes, axis, 0)
  rest = x.shape[1:]
  n_words = -(-length // cpw)
  x = x.astype(jnp.uint32) & np.uint32((1 << bits) - 1)
  if n_words * cpw - length:
    x = jnp.pad(x, [(0, n_words * cpw - length)] + [(0, 0)] * len(rest))
  x = x.reshape((n_words, cpw) + rest)
  shift = (np.arange(cpw, dtype=np.uint32) * bits).reshape((1, cpw) + (1,) * len(rest))
  # Disjoint bits: the sum is the bitwise OR.
  packed = jnp.sum(jnp.left_shift(x, shift), axis=1, dtype=jnp.uint32)
  return jnp.moveaxis(packed, 0, axis)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack_stream(codes: jax.Array, bits: int, axis: int) -> jax.Array:
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
  """Unpacks ``uint32`` words written by :func:`pack` into ``uint8`` codes.

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
    (1, 2)
    >>> bool((unpack(packed, bits=3, length=3, axis=0) == codes).all())
    True
  """
  _check_bits(bits)
  bits = int(bits)
  axis = _check_packed(packed, axis, packed_length(length, bits),
                       f"length={length} codes of bits={bits} need packed_length(length, bits)=")
  return _unpack(packed, bits, int(length), axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack(packed: jax.Array, bits: int, length: int, axis: int) -> jax.Array:
  if bits in PER_WORD_BITS:
    return _unpack_words(packed, bits, length, axis)
  return _unpack_stream(packed, bits, length, axis)


def _unpack_words(packed: jax.Array, bits: int, length: int, axis: int) -> jax.Array:
  cpw = codes_per_word(bits)
  x = jnp.moveaxis(packed, axis, 0)
  rest = x.shape[1:]
  shift = (np.arange(cpw, dtype=np.uint32) * bits).reshape((1, cpw) + (1,) * len(rest))
  codes = jnp.right_shift(x[:, None], shift) & np.uint32((1 << bits) - 1)
  codes = codes.astype(jnp.uint8).reshape((x.shape[0] * cpw,) + rest)[:length]
  return jnp.moveaxis(codes, 0, axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack_stream(packed: jax.Array, bits: int, length: int, axis: int) -> jax.Array:
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
    start: first code (may be traced): a multiple of 10 for 3-bit codes, of 32 otherwise
      (:func:`row_alignment` is a multiple of both).
    size: number of codes (static); ``start + size <= L`` (the words past ``L`` are padding).

  Returns:
    ``uint8`` ``(size, ...)`` codes.

  Examples:
    >>> import jax.numpy as jnp
    >>> p = pack(jnp.arange(96, dtype=jnp.uint8) % 8, bits=3)
    >>> unpack_rows(p, 3, 40, 4).tolist()
    [0, 1, 2, 3]
  """
  _check_bits(bits)
  bits = int(bits)
  words = packed_length(size, bits)
  if bits in PER_WORD_BITS:
    first = start // codes_per_word(bits)
  else:
    first = (start // BLOCK) * bits
  w = jax.lax.dynamic_slice_in_dim(packed, first, words, axis=0)
  return _unpack(w, bits, int(size), 0)


def gather(packed: jax.Array, bits: int, index: jax.Array) -> jax.Array:
  """Codes at positions ``index`` (any shape, ``int32``) of a 1-D :func:`pack` ``ed`` stream.

  Each code is read from the one (per word) or two (straddling stream) words holding its bits
  (no unpacking of the stream), so the cost is that of the ``index`` array.

  Examples:
    >>> import jax.numpy as jnp
    >>> p = pack(jnp.arange(40, dtype=jnp.uint8) % 8, bits=3)
    >>> gather(p, 3, jnp.array([0, 10, 21, 39])).tolist()
    [0, 2, 5, 7]
  """
  _check_bits(bits)
  bits = int(bits)
  if packed.ndim != 1:
    raise ValueError(f"packed must be 1-D, got shape {packed.shape}.")
  idx = index.astype(jnp.int32)
  mask = np.uint32((1 << bits) - 1)
  if bits in PER_WORD_BITS:
    cpw = codes_per_word(bits)
    word = jnp.take(packed, idx // cpw, mode="clip")
    return (jnp.right_shift(word, ((idx % cpw) * bits).astype(jnp.uint32)) & mask).astype(
        jnp.uint8)
  blk, lane = idx // BLOCK, idx % BLOCK
  bitpos = lane * bits  # within the block's ``bits`` words
  first = blk * bits + bitpos // BLOCK
  off = (bitpos % BLOCK).astype(jnp.uint32)
  lo = jnp.right_shift(jnp.take(packed, first, mode="clip"), off)
  if BLOCK % bits:  # widths that straddle words
    nxt = jnp.take(packed, jnp.minimum(first + 1, packed.shape[0] - 1), mode="clip")
    hi = jnp.left_shift(nxt, jnp.clip(np.uint32(BLOCK) - off, 0, BLOCK - 1).astype(jnp.uint32))
    lo = lo | jnp.where(off + np.uint32(bits) > BLOCK, hi, np.uint32(0))
  return (lo & mask).astype(jnp.uint8)


def pack_stream(codes: jax.Array, bits: int, axis: int = 0) -> jax.Array:
  """Packs codes as the straddling bitstream of :data:`LAYOUT_VERSION` 1 (any width).

  For widths other than 3 this is :func:`pack`; for 3-bit codes it writes the old layout
  (kept to read and to test old checkpoints).

  Examples:
    >>> import jax.numpy as jnp
    >>> pack_stream(jnp.arange(33, dtype=jnp.uint8) % 8, 3).shape
    (6,)
  """
  _check_bits(bits)
  codes = jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise ValueError(f"codes must have an integer dtype, got {codes.dtype}.")
  axis = _normalize_axis(axis, codes.ndim, "codes")
  return _pack_stream(codes, int(bits), axis)


def unpack_stream(packed: jax.Array, bits: int, length: int, axis: int = 0) -> jax.Array:
  """Unpacks the bitstream layout (:func:`pack_stream`) into ``uint8`` codes."""
  _check_bits(bits)
  axis = _check_packed(packed, axis, stream_length(length, bits),
                       f"the bitstream of length={length} codes of bits={bits} has ")
  return _unpack_stream(packed, int(bits), int(length), axis)


def _check_packed(packed: jax.Array, axis: int, expected: int, what: str) -> int:
  """Checks ``packed`` is ``uint32`` with ``expected`` words along ``axis``; returns the axis."""
  if packed.dtype != jnp.uint32:
    raise ValueError(f"packed must have dtype uint32, got {packed.dtype}.")
  axis = _normalize_axis(axis, packed.ndim, "packed")
  if packed.shape[axis] != expected:
    raise ValueError(f"packed has {packed.shape[axis]} words along axis {axis}, but {what}"
                     f"{expected}.")
  return axis


def restream(packed: jax.Array, bits: int, length: int, axis: int = 0) -> jax.Array:
  """Converts codes packed in :data:`LAYOUT_VERSION` 1 (bitstream) to the current layout.

  The identity (same array) for widths whose layout did not change.

  Examples:
    >>> import jax.numpy as jnp
    >>> codes = jnp.arange(40, dtype=jnp.uint8) % 8
    >>> bool((restream(pack_stream(codes, 3), 3, 40) == pack(codes, 3)).all())
    True
  """
  _check_bits(bits)
  if int(bits) not in PER_WORD_BITS:
    return packed
  return pack(unpack_stream(packed, bits, length, axis), bits, axis)
