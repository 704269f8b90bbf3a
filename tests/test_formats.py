"""Tests for compressjax.formats: CompressedArray, QuantizedArray and dot dispatch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
from compressjax.formats import dispatch
from compressjax.formats import packing

BITS = (2, 3, 4, 8)


def make_quantized(k=64, n=8, *, bits=4, group_size=32, symmetric=True, seed=0,
                   dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2**bits, (k, n), dtype=np.uint8)
  scale = rng.uniform(0.01, 0.1, (k // group_size, n)).astype(np.float16)
  zero = None if symmetric else rng.uniform(-1, 1, (k // group_size, n)).astype(np.float16)
  qa = formats.QuantizedArray.from_codes(
      jnp.asarray(codes), jnp.asarray(scale), None if zero is None else jnp.asarray(zero),
      bits=bits, group_size=group_size, symmetric=symmetric, dtype=dtype)
  return qa, codes, scale, zero


def reference_dense(codes, scale, zero, bits, group_size):
  s = np.repeat(scale.astype(np.float64), group_size, axis=0)
  if zero is None:
    return s * (codes.astype(np.float64) - 2**(bits - 1))
  return s * codes + np.repeat(zero.astype(np.float64), group_size, axis=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_invariants_and_materialize(bits, symmetric):
  k, n, gs = 96, 5, 32
  qa, codes, scale, zero = make_quantized(k, n, bits=bits, group_size=gs, symmetric=symmetric)
  assert isinstance(qa, formats.CompressedArray) and formats.is_compressed(qa)
  assert qa.shape == (k, n) and qa.dtype == np.float32 and qa.ndim == 2
  assert qa.packed.dtype == jnp.uint32
  # 3-bit: 10 codes per word (layout 2); other widths: 32 codes in ``bits`` words.
  words = 10 if bits == 3 else 32 * bits * 3 // 32
  assert qa.packed.shape == (packing.packed_length(k, bits), n) == (words, n)
  assert qa.scale.shape == (k // gs, n) and qa.scale.dtype == jnp.float16
  assert (qa.zero is None) == symmetric
  if not symmetric:
    assert qa.zero.shape == (k // gs, n)
  np.testing.assert_array_equal(np.asarray(qa.codes()), codes)
  assert qa.codes().dtype == jnp.uint8
  dense = qa.materialize()
  assert dense.shape == (k, n) and dense.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dense), reference_dense(codes, scale, zero, bits, gs),
                             rtol=1e-6, atol=1e-6)
  assert formats.materialize(qa).shape == (k, n)


def test_padding_k_not_multiple_of_32():
  qa, codes, scale, _ = make_quantized(48, 3, bits=3, group_size=16)
  assert qa.packed.shape == (5, 3)  # 48 codes, 10 per word -> 5 words (bits 30..31 unused)
  np.testing.assert_array_equal(np.asarray(qa.codes()), codes)


def test_nbytes_is_honest():
  k, n, gs = 576, 64, 64
  qa, *_ = make_quantized(k, n, bits=4, group_size=gs, symmetric=False)
  assert qa.nbytes == k * n // 2 + 2 * (k // gs) * n * 2
  assert qa.num_params == k * n
  assert qa.bits_per_param == pytest.approx(8 * qa.nbytes / (k * n))
  assert qa.bits_per_param == pytest.approx(4 + 2 * 16 / gs)
  sym, *_ = make_quantized(k, n, bits=4, group_size=gs, symmetric=True)
  assert sym.nbytes == k * n // 2 + (k // gs) * n * 2
  # 3 bits (10 codes per word) with K not a multiple of 10 counts the padding word too.
  odd, *_ = make_quantized(48, 2, bits=3, group_size=48)
  assert odd.nbytes == 5 * 2 * 4 + 1 * 2 * 2


def test_pytree_round_trip_and_static_metadata():
  qa, *_ = make_quantized(64, 8, bits=3, group_size=32, symmetric=False)
  leaves, treedef = jax.tree_util.tree_flatten(qa)
  assert len(leaves) == 3  # packed, scale, zero
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert isinstance(rebuilt, formats.QuantizedArray)
  assert (rebuilt.bits, rebuilt.group_size, rebuilt.shape, rebuilt.symmetric, rebuilt.dtype) == (
      3, 32, (64, 8), False, np.float32)
  np.testing.assert_array_equal(rebuilt.materialize(), qa.materialize())
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(qa)[0]]
  assert paths == [".packed", ".scale", ".zero"]
  sym, *_ = make_quantized(64, 8, bits=3, group_size=32, symmetric=True)
  assert len(jax.tree_util.tree_leaves(sym)) == 2  # zero is None: no leaf
  # Different static metadata gives a different treedef.
  assert jax.tree_util.tree_structure(sym) != treedef


def test_unflatten_with_placeholders_and_stacking():
  qa, *_ = make_quantized(64, 8, bits=4, group_size=32, symmetric=False)
  _, treedef = jax.tree_util.tree_flatten(qa)
  for placeholder in (None, object()):
    jax.tree_util.tree_unflatten(treedef, [placeholder] * 3)
  shapes = jax.tree.map(lambda x: x.shape, qa)
  assert shapes.packed == (8, 8)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), qa, qa)  # e.g. scanned layers
  assert stacked.packed.shape == (2, 8, 8)
  per_layer = jax.vmap(lambda w: w.materialize())(stacked)
  np.testing.assert_array_equal(per_layer[1], qa.materialize())


def test_jit_over_quantized_array():
  qa, *_ = make_quantized(64, 8, bits=4, group_size=32)
  traces = []

  @jax.jit
  def f(w, x):
    traces.append(1)
    return formats.dot(x, w), w.materialize().sum()

  x = jnp.ones((3, 64))
  y1, _ = f(qa, x)
  qa2, *_ = make_quantized(64, 8, bits=4, group_size=32, seed=1)
  y2, _ = f(qa2, x)
  assert len(traces) == 1  # same metadata: no recompilation
  np.testing.assert_allclose(y1, x @ qa.materialize(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y2, x @ qa2.materialize(), rtol=1e-5, atol=1e-5)


def test_eval_shape_on_shape_dtype_structs():
  k, n, bits, gs = 96, 16, 3, 32
  abstract = formats.QuantizedArray(
      jax.ShapeDtypeStruct((packing.packed_length(k, bits), n), jnp.uint32),
      jax.ShapeDtypeStruct((k // gs, n), jnp.float16),
      jax.ShapeDtypeStruct((k // gs, n), jnp.float16),
      bits=bits, group_size=gs, shape=(k, n), symmetric=False, dtype=jnp.bfloat16)
  assert abstract.nbytes == 10 * 16 * 4 + 2 * 3 * 16 * 2  # 96 3-bit codes in 10 words
  out = jax.eval_shape(lambda w: w.materialize(), abstract)
  assert out.shape == (k, n) and out.dtype == jnp.bfloat16
  y = jax.eval_shape(lambda x, w: formats.dot(x, w),
                     jax.ShapeDtypeStruct((2, 7, k), jnp.bfloat16), abstract)
  assert y.shape == (2, 7, n) and y.dtype == jnp.bfloat16
  codes = jax.eval_shape(lambda w: w.codes(), abstract)
  assert codes.shape == (k, n) and codes.dtype == jnp.uint8
  built = jax.eval_shape(
      lambda c, s: formats.QuantizedArray.from_codes(c, s, None, bits=4, group_size=32,
                                                     symmetric=True),
      jax.ShapeDtypeStruct((k, n), jnp.uint8), jax.ShapeDtypeStruct((3, n), jnp.float32))
  assert built.packed.shape == (12, n) and built.nbytes == 12 * n * 4 + 3 * n * 4


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_dot_matches_materialize(bits, symmetric):
  k, n, gs = 96, 5, 32
  qa, *_ = make_quantized(k, n, bits=bits, group_size=gs, symmetric=symmetric, seed=bits)
  dense = qa.materialize()
  rng = np.random.default_rng(bits)
  # M = 1, M = 6 <= group_size (grouped path) and M = 40 > group_size (decode-first path).
  for batch in [(k,), (2, 3, k), (40, k)]:
    x = jnp.asarray(rng.standard_normal(batch, np.float32))
    y = formats.dot(x, qa)
    assert y.shape == batch[:-1] + (n,) and y.dtype == jnp.float32
    assert_close_to_matmul(y, x, dense)


def assert_close_to_matmul(y, x, dense, rel=2e-6):
  """|y - x @ W| within ``rel * (|x| @ |W|)``: float32 rounding of the sums."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(dense, np.float64)
  ref = x64 @ w64
  tol = rel * (np.abs(x64) @ np.abs(w64)) + 1e-7
  for got in (np.asarray(y, np.float64), np.asarray(x @ dense, np.float64)):
    assert np.all(np.abs(got - ref) <= tol), np.max(np.abs(got - ref) / tol)


def test_dot_per_channel_and_bfloat16():
  qa, *_ = make_quantized(64, 8, bits=4, group_size=64, symmetric=True, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64)), jnp.bfloat16)
  y = formats.dot(x, qa)
  assert y.dtype == jnp.bfloat16
  ref = x.astype(jnp.float32) @ qa.materialize().astype(jnp.float32)
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)


def test_dot_dense_passthrough():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((16, 4), np.float32))
  x = jnp.asarray(rng.standard_normal((3, 2, 16), np.float32))
  np.testing.assert_array_equal(formats.dot(x, w), x @ w)
  np.testing.assert_array_equal(formats.dot(x, w, implementation="xla"), x @ w)
  assert formats.materialize(w) is w
  with pytest.raises(ValueError, match="w.shape"):
    formats.dot(x, w.T)


def test_dot_shape_mismatch():
  qa, *_ = make_quantized(64, 8)
  with pytest.raises(ValueError, match="does not match"):
    formats.dot(jnp.ones((2, 32)), qa)


def test_unknown_implementation_lists_known():
  qa, *_ = make_quantized(64, 8)
  with pytest.raises(ValueError, match="unknown implementation") as err:
    formats.dot(jnp.ones((1, 64)), qa, implementation="nope")
  assert "'xla'" in str(err.value)


@dataclasses.dataclass(frozen=True)
class _ToyFormat(formats.QuantizedArray):
  """A QuantizedArray subclass so that test registrations stay isolated."""


jax.tree_util.register_dataclass(
    _ToyFormat, data_fields=["packed", "scale", "zero"],
    meta_fields=["bits", "group_size", "shape", "symmetric", "dtype"])


def _toy(qa):
  return _ToyFormat(qa.packed, qa.scale, qa.zero, bits=qa.bits, group_size=qa.group_size,
                    shape=qa.shape, symmetric=qa.symmetric, dtype=qa.dtype)


def test_registry_priority_fallback_and_forcing():
  qa, *_ = make_quantized(64, 8)
  w = _toy(qa)
  x = jnp.ones((2, 64))
  # Unregistered subclass inherits QuantizedArray's implementations.
  assert [i.name for i in formats.implementations(_ToyFormat)] == [
      "pallas", "cpu", "xla", "pallas_interpret", "pallas_mgpu"]
  calls = []

  def fast(x, w):
    calls.append("fast")
    raise NotImplementedError("tile shape unsupported")

  def never(x, w):
    calls.append("never")
    return jnp.zeros(x.shape[:-1] + (w.shape[1],))

  def marked(x, w):
    calls.append("marked")
    return dispatch.quantized_matmul_xla(x, w) + 1.0

  formats.register_matmul(_ToyFormat, "xla", dispatch.quantized_matmul_xla,
                          priority=formats.FALLBACK_PRIORITY)
  formats.register_matmul(_ToyFormat, "never", never, can_use=lambda x, w: False, priority=5)
  formats.register_matmul(_ToyFormat, "fast", fast, priority=10)
  formats.register_matmul(_ToyFormat, "marked", marked)
  assert [i.name for i in formats.implementations(_ToyFormat)] == [
      "fast", "never", "marked", "xla"]
  ref = x @ qa.materialize()
  # "fast" raises NotImplementedError, "never" is skipped by can_use, "marked" runs.
  np.testing.assert_allclose(formats.dot(x, w), ref + 1.0, rtol=1e-5)
  assert calls == ["fast", "marked"]
  calls.clear()
  np.testing.assert_allclose(formats.dot(x, w, implementation="xla"), ref, rtol=1e-5)
  assert calls == []
  with pytest.raises(NotImplementedError, match="tile shape"):
    formats.dot(x, w, implementation="fast")
  with pytest.raises(NotImplementedError, match="cannot be used"):
    formats.dot(x, w, implementation="never")
  # Names known elsewhere but not registered for this format.
  with pytest.raises(ValueError, match="not registered"):
    formats.dot(x, qa, implementation="marked")
  # The base class registration is untouched (pallas_kernels registers its two kernels, the
  # C++ CPU kernel "cpu").
  assert [i.name for i in formats.implementations(formats.QuantizedArray)] == [
      "pallas", "cpu", "xla", "pallas_interpret", "pallas_mgpu"]


def test_no_implementation_applies():
  @dataclasses.dataclass(frozen=True)
  class Lonely(formats.QuantizedArray):
    pass

  jax.tree_util.register_dataclass(
      Lonely, data_fields=["packed", "scale", "zero"],
      meta_fields=["bits", "group_size", "shape", "symmetric", "dtype"])

  def refuse(x, w):
    raise NotImplementedError("nope")

  formats.register_matmul(Lonely, "refuse", refuse)
  qa, *_ = make_quantized(64, 8)
  w = Lonely(qa.packed, qa.scale, None, bits=4, group_size=32, shape=(64, 8), symmetric=True,
             dtype=jnp.float32)
  with pytest.raises(NotImplementedError, match="refuse: nope"):
    formats.dot(jnp.ones((1, 64)), w)
  with pytest.raises(TypeError, match="CompressedArray"):
    formats.register_matmul(int, "x", refuse)


def test_from_codes_validation():
  codes = jnp.zeros((64, 4), jnp.uint8)
  scale = jnp.ones((2, 4), jnp.float16)
  kw = dict(bits=4, group_size=32, symmetric=True)
  with pytest.raises(ValueError, match="bits"):
    formats.QuantizedArray.from_codes(codes, scale, None, **{**kw, "bits": 5})
  with pytest.raises(ValueError, match="group_size") as err:
    formats.QuantizedArray.from_codes(codes, scale, None, **{**kw, "group_size": 24})
  assert "K=64" in str(err.value) and "[1, 2, 4, 8, 16, 32, 64]" in str(err.value)
  with pytest.raises(ValueError, match=r"scale must have shape .*\(2, 4\)"):
    formats.QuantizedArray.from_codes(codes, jnp.ones((4, 4), jnp.float16), None, **kw)
  with pytest.raises(ValueError, match="scale must have a floating dtype"):
    formats.QuantizedArray.from_codes(codes, jnp.ones((2, 4), jnp.int32), None, **kw)
  with pytest.raises(ValueError, match="zero must be None"):
    formats.QuantizedArray.from_codes(codes, scale, scale, **kw)
  with pytest.raises(ValueError, match="zero is required"):
    formats.QuantizedArray.from_codes(codes, scale, None, **{**kw, "symmetric": False})
  with pytest.raises(ValueError, match="zero must have shape"):
    formats.QuantizedArray.from_codes(codes, scale, jnp.ones((2, 3)), **{**kw, "symmetric": False})
  with pytest.raises(ValueError, match="codes must be a 2-D"):
    formats.QuantizedArray.from_codes(jnp.zeros((2, 64, 4), jnp.uint8), scale, None, **kw)
  with pytest.raises(ValueError, match="codes must have an integer dtype"):
    formats.QuantizedArray.from_codes(codes.astype(jnp.float32), scale, None, **kw)
  with pytest.raises(ValueError, match="dtype must be a floating"):
    formats.QuantizedArray.from_codes(codes, scale, None, **kw, dtype=jnp.int8)


def test_constructor_validation():
  qa, *_ = make_quantized(64, 8)
  fields = dict(bits=4, group_size=32, shape=(64, 8), symmetric=True, dtype=jnp.float32)
  with pytest.raises(ValueError, match="packed must have shape"):
    formats.QuantizedArray(qa.packed[:4], qa.scale, None, **fields)
  with pytest.raises(ValueError, match="shape must be 2-D"):
    formats.QuantizedArray(qa.packed, qa.scale, None, **{**fields, "shape": (64, 8, 1)})
  with pytest.raises(ValueError, match="bits"):
    formats.QuantizedArray(qa.packed, qa.scale, None, **{**fields, "bits": 1})


def test_nbytes_helpers():
  assert formats.array_nbytes(jax.ShapeDtypeStruct((9, 64), jnp.float16)) == 9 * 64 * 2
  assert formats.array_nbytes(np.zeros((3, 3), np.int8)) == 9
  qa, *_ = make_quantized(64, 8)
  assert formats.tree_nbytes({"w": qa, "b": jnp.zeros(4)}) == qa.nbytes + 16
  assert qa.nbytes == 8 * 8 * 4 + 2 * 8 * 2
