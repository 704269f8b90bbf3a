"""Tests for compressjax.formats.packing (uint32 bitstream packing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressjax.formats import packing

ALL_BITS = packing.SUPPORTED_BITS
REQUIRED_BITS = (2, 3, 4, 8)


def reference_stream_1d(codes, bits):
  """Bit-by-bit reference: one Python integer as the LSB-first bitstream."""
  n_words = -(-len(codes) // 32) * bits
  stream = 0
  for i, c in enumerate(codes):
    stream |= int(c) << (i * bits)
  return [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(n_words)]


def reference_words_1d(codes, bits):
  """Per-word reference: ``32 // bits`` codes per word, LSB first, spare high bits zero."""
  cpw = 32 // bits
  words = [0] * -(-len(codes) // cpw)
  for i, c in enumerate(codes):
    words[i // cpw] |= int(c) << ((i % cpw) * bits)
  return words


def reference_pack_1d(codes, bits):
  if bits in packing.PER_WORD_BITS:
    return reference_words_1d(codes, bits)
  return reference_stream_1d(codes, bits)


@st.composite
def codes_and_axis(draw):
  bits = draw(st.sampled_from(ALL_BITS))
  length = draw(st.integers(1, 80))
  n = draw(st.integers(1, 4))
  axis = draw(st.sampled_from([0, 1, -1]))
  seed = draw(st.integers(0, 2**31 - 1))
  codes = np.random.default_rng(seed).integers(0, 2**bits, (length, n), dtype=np.uint8)
  if axis != 0:
    codes = codes.T
  return bits, codes, axis


@settings(max_examples=20, deadline=None)
@given(codes_and_axis())
def test_round_trip_and_layout(args):
  bits, codes, axis = args
  length = codes.shape[axis]

  @jax.jit  # one compilation per example instead of one per op
  def round_trip(c):
    p = packing.pack(c, bits, axis=axis)
    return p, packing.unpack(p, bits, length, axis=axis)

  packed, out = round_trip(jnp.asarray(codes))
  assert packed.dtype == jnp.uint32
  expected_shape = list(codes.shape)
  expected_shape[axis] = (-(-length // 10) if bits == 3 else -(-length // 32) * bits)
  assert packed.shape == tuple(expected_shape)
  assert packed.shape[axis] == packing.packed_length(length, bits)
  assert out.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(out), codes)
  # The words are exactly the LSB-first bitstream of each column.
  cols = codes if axis == 0 else codes.T
  pcols = np.asarray(packed) if axis == 0 else np.asarray(packed).T
  for j in range(cols.shape[1]):
    assert pcols[:, j].tolist() == reference_pack_1d(cols[:, j], bits)


@pytest.mark.parametrize("bits", REQUIRED_BITS)
def test_round_trip_required_bits(bits):
  rng = np.random.default_rng(bits)
  for length in (77,):  # a non-multiple of 32 spanning three blocks
    codes = rng.integers(0, 2**bits, (length, 3), dtype=np.uint8)
    packed = packing.pack(codes, bits)
    assert packed.shape == ((-(-length // 10) if bits == 3 else -(-length // 32) * bits), 3)
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, length)), codes)
    packed1 = packing.pack(codes.T, bits, axis=1)
    np.testing.assert_array_equal(
        np.asarray(packing.unpack(packed1, bits, length, axis=1)), codes.T)


def test_three_bit_layout_by_hand():
  # Layout 2: ten 3-bit codes per word at bits 3*i .. 3*i+2, bits 30..31 unused.
  codes = np.zeros(32, np.uint8)
  codes[0] = 0b110   # word 0 bits 1, 2
  codes[9] = 0b101   # word 0 bits 27, 29
  codes[10] = 0b111  # word 1 bits 0..2
  codes[31] = 0b100  # word 3, slot 1: bit 5
  packed = packing.pack(jnp.asarray(codes), 3)
  assert [hex(int(v)) for v in packed] == ["0x28000006", "0x7", "0x0", "0x20"]
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, 3, 32)), codes)


def test_three_bit_stream_layout_by_hand():
  # Layout 1 (old checkpoints): 3-bit codes straddle words: code 10 covers stream bits 30..32
  # and code 21 covers bits 63..65. Word j holds stream bits 32*j .. 32*j+31, LSB first.
  codes = np.zeros(32, np.uint8)
  codes[0] = 0b110   # stream bits 0..2            -> word 0 bits 1, 2
  codes[10] = 0b101  # bit 30 = 1, bit 31 = 0, 32 = 1 -> word 0 bit 30, word 1 bit 0
  codes[21] = 0b011  # bit 63 = 1, bit 64 = 1, 65 = 0 -> word 1 bit 31, word 2 bit 0
  codes[31] = 0b100  # stream bits 93..95 = 0, 0, 1  -> word 2 bit 31
  packed = packing.pack_stream(jnp.asarray(codes), 3)
  assert [hex(int(v)) for v in packed] == ["0x40000006", "0x80000001", "0x80000001"]
  np.testing.assert_array_equal(np.asarray(packing.unpack_stream(packed, 3, 32)), codes)
  assert packed.tolist() == reference_stream_1d(codes, 3)
  new = packing.restream(packed, 3, 32)
  assert new.tolist() == packing.pack(jnp.asarray(codes), 3).tolist()
  with pytest.raises(ValueError, match="bitstream"):
    packing.unpack_stream(new, 3, 32)
  # Widths whose layout did not change are returned as they are.
  p4 = packing.pack(jnp.asarray(codes % 16), 4)
  assert packing.restream(p4, 4, 32) is p4
  assert packing.pack_stream(jnp.asarray(codes % 16), 4).tolist() == p4.tolist()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unpack_rows_and_gather(bits):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2**bits, (500, 3), dtype=np.uint8)
  packed = packing.pack(jnp.asarray(codes), bits)
  align = packing.row_alignment(bits)
  for start, size in ((0, align), (align, 2 * align), (320, 500 - 320)):
    got = jax.jit(lambda p, s: packing.unpack_rows(p, bits, s, size))(packed, start)
    np.testing.assert_array_equal(np.asarray(got), codes[start:start + size])
  flat = codes[:, 0]
  idx = rng.integers(0, 500, 64)
  p1 = packing.pack(jnp.asarray(flat), bits)
  np.testing.assert_array_equal(np.asarray(packing.gather(p1, bits, jnp.asarray(idx))), flat[idx])


def test_known_four_bit_pattern():
  packed = packing.pack(jnp.array([1, 2, 3, 4, 5, 6, 7, 8, 15], jnp.uint8), 4)
  assert [int(v) for v in packed] == [0x87654321, 0xF, 0, 0]


def test_padding_codes_are_zero():
  packed = packing.pack(jnp.full((33,), 7, jnp.uint8), 3)
  # Last word: only codes 30..32 (bits 0..8 of word 3) are set, bits 30..31 of all are zero.
  assert [int(v) for v in packed] == [0x3FFFFFFF] * 3 + [0x1FF]
  packed = packing.pack(jnp.full((33,), 3, jnp.uint8), 2)
  assert [int(v) for v in packed[2:]] == [3, 0]


def test_out_of_range_codes_keep_low_bits():
  packed = packing.pack(jnp.array([17, 0], jnp.int32), 4)
  assert packing.unpack(packed, 4, 2).tolist() == [1, 0]


def test_jit_and_eval_shape():
  codes = jnp.asarray(np.random.default_rng(0).integers(0, 8, (70, 5), dtype=np.uint8))

  @jax.jit
  def round_trip(c):
    return packing.unpack(packing.pack(c, 3), 3, 70)

  np.testing.assert_array_equal(round_trip(codes), codes)
  spec = jax.ShapeDtypeStruct((70, 5), jnp.uint8)
  packed = jax.eval_shape(lambda c: packing.pack(c, 3, axis=0), spec)
  assert packed.shape == (7, 5) and packed.dtype == jnp.uint32
  unpacked = jax.eval_shape(lambda p: packing.unpack(p, 3, 70), packed)
  assert unpacked.shape == (70, 5) and unpacked.dtype == jnp.uint8
  packed1 = jax.eval_shape(lambda c: packing.pack(c, 2, axis=1), jax.ShapeDtypeStruct((4, 65), jnp.uint8))
  assert packed1.shape == (4, 6)


def test_packed_length():
  assert packing.packed_length(0, 4) == 0
  assert packing.packed_length(1, 3) == 1
  assert packing.packed_length(576, 3) == 58 and packing.stream_length(576, 3) == 54
  assert packing.packed_nbytes((1530, 10), 3) == 1530 * 10 * 32 // 80  # 3.2 bits per code
  assert packing.packed_length(64, 8) == 16
  assert packing.packed_length(65, 2) == 6
  assert packing.packed_nbytes((576, 64), 4) == 576 * 64 // 2


@pytest.mark.parametrize("bits", [0, 9, 16, 2.0, True])
def test_bad_bits(bits):
  with pytest.raises(ValueError, match="bits") as err:
    packing.pack(jnp.zeros((32,), jnp.uint8), bits)
  assert str(packing.SUPPORTED_BITS) in str(err.value)
  with pytest.raises(ValueError, match="bits"):
    packing.unpack(jnp.zeros((4,), jnp.uint32), bits, 32)
  with pytest.raises(ValueError, match="bits"):
    packing.packed_length(32, bits)


def test_unpack_validates_length_and_dtype():
  packed = packing.pack(jnp.zeros((40,), jnp.uint8), 4)
  with pytest.raises(ValueError, match="packed_length"):
    packing.unpack(packed, 4, 70)
  with pytest.raises(ValueError, match="uint32"):
    packing.unpack(packed.astype(jnp.int32), 4, 40)
  with pytest.raises(ValueError, match="axis"):
    packing.pack(jnp.zeros((32,), jnp.uint8), 4, axis=1)
  with pytest.raises(ValueError, match="integer"):
    packing.pack(jnp.zeros((32,), jnp.float32), 4)
