"""SumArray, SparseOutliers, KeptRows, Transposed: materialize, multiply, count bytes, checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import checkpoint, formats
from compressjax.quantize import quantize_rtn


def _sparse_dense(k=64, n=16, density=0.05, seed=0):
  rng = np.random.default_rng(seed)
  d = np.where(rng.random((k, n)) < density, rng.standard_normal((k, n)), 0.0)
  return d.astype(np.float16).astype(np.float32)


def test_sparse_outliers_round_trip_and_matmul():
  d = _sparse_dense()
  s = formats.SparseOutliers.from_dense(d)
  nnz = int(np.count_nonzero(d))
  assert s.nnz == nnz
  np.testing.assert_array_equal(np.asarray(s.materialize()), d)
  assert s.nbytes == 4 * (16 + 1) + nnz * (2 + 2)  # int32 pointers, uint16 rows, fp16 values
  for shape in ((3, 5, 64), (4, 8, 64)):  # gather path (few rows) and dense path (many rows)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(formats.dot(jnp.asarray(x), s)), x @ d, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(formats.dot)(jnp.asarray(x), s)), x @ d,
                               rtol=1e-5, atol=1e-5)


def test_empty_sparse_and_bad_shapes():
  s = formats.SparseOutliers.from_dense(np.zeros((32, 4), np.float32))
  assert s.nnz == 0 and float(jnp.abs(s.materialize()).sum()) == 0.0
  assert formats.dot(jnp.ones((2, 32)), s).shape == (2, 4)
  with pytest.raises(ValueError, match="indptr"):
    formats.SparseOutliers(jnp.zeros((3,), jnp.int32), jnp.zeros((0,), jnp.uint16),
                           jnp.zeros((0,), jnp.float16), shape=(32, 4), dtype=jnp.float32)
  with pytest.raises(ValueError, match="terms\\[1\\] has shape"):
    formats.SumArray((jnp.zeros((4, 2)), jnp.zeros((2, 4))), shape=(4, 2), dtype=jnp.float32)


def test_sum_of_quantized_and_sparse_multiplies_like_its_materialization():
  rng = np.random.default_rng(2)
  w = rng.standard_normal((64, 16)).astype(np.float32)
  q = quantize_rtn(jnp.asarray(w), bits=3, group_size=16)
  sp = formats.SparseOutliers.from_dense(_sparse_dense(seed=3))
  rows = formats.KeptRows(jnp.array([5, 9], jnp.int32), jnp.ones((2, 16), jnp.float16),
                          shape=(64, 16), dtype=jnp.float32)
  s = formats.SumArray((q, sp, rows), shape=(64, 16), dtype=jnp.float32)
  dense = np.asarray(s.materialize())
  np.testing.assert_allclose(dense, np.asarray(q.materialize()) + np.asarray(sp.materialize())
                             + np.asarray(rows.materialize()), rtol=1e-6)
  for m in (1, 40):  # small batches take the partial-product path of QuantizedArray
    x = rng.standard_normal((m, 64)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(formats.dot(jnp.asarray(x), s)), x @ dense, rtol=1e-4,
                               atol=1e-4)
  assert s.nbytes == q.nbytes + sp.nbytes + rows.nbytes


def _bilevel(seed):
  """3-bit codes whose group scales and zeros are 3-bit codes again (grouped along N)."""
  w = np.random.default_rng(seed).standard_normal((64, 32)).astype(np.float32)
  plain = quantize_rtn(jnp.asarray(w), bits=3, group_size=16, symmetric=False,
                       scale_dtype=jnp.float32)
  stat = lambda a: formats.Transposed(quantize_rtn(a.T, bits=3, group_size=16, symmetric=False))
  return formats.QuantizedArray(plain.packed, stat(plain.scale), stat(plain.zero), bits=3,
                                group_size=16, shape=(64, 32), symmetric=False, dtype=jnp.float32)


def test_bilevel_statistics_format():
  rng = np.random.default_rng(4)
  bilevel = _bilevel(4)
  assert bilevel.scale.shape == (4, 32)
  # 3-bit codes (10 per uint32: 7 words per column of 64) + 2 statistics, each 3-bit codes of
  # a (32, 4) leaf (4 words per column of 32) + fp16 second-level scale and zero (2 x 4 each).
  assert bilevel.bits_per_param == pytest.approx(
      (32 * 7 * 4 + 2 * (4 * 4 * 4 + 2 * 2 * 4 * 2)) * 8 / (64 * 32))
  x = rng.standard_normal((2, 64)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(formats.dot(jnp.asarray(x), bilevel)),
                             x @ np.asarray(bilevel.materialize()), rtol=1e-4, atol=1e-4)


def test_nested_formats_checkpoint_round_trip(tmp_path):
  base = _bilevel(5)
  leaf = formats.SumArray((base, formats.SparseOutliers.from_dense(_sparse_dense(64, 32))),
                          shape=(64, 32), dtype=jnp.float32)
  params = {"layers": {0: {"mlp": {"up_proj": {"kernel": leaf}}}}, "norm": jnp.ones(3)}
  path = checkpoint.save(str(tmp_path / "ck"), params)
  back, _ = checkpoint.restore(path)
  got = back["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert type(got) is formats.SumArray and type(got.terms[0].scale) is formats.Transposed
  np.testing.assert_array_equal(np.asarray(got.materialize()), np.asarray(leaf.materialize()))
  assert got.nbytes == leaf.nbytes
