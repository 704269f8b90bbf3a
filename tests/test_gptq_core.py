"""Tests for compressjax.quantize.gptq_core (GPTQ, Frantar et al. 2022)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
from compressjax.quantize import gptq_core
from compressjax.quantize import rtn_core


def correlated_inputs(n=512, k=64, seed=0):
  """``X = Z @ A``: inputs with a strong (random) covariance structure."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n, k))
  a = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / 8.0)[:, None]  # decaying spectrum
  return (z @ a).astype(np.float32)


def hessian(x):
  return (2.0 * x.T.astype(np.float64) @ x / x.shape[0]).astype(np.float32)


def weight(k=64, n=16, seed=1):
  return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def run_with_q(w, h, **kw):
  """The jitted algorithm, also returning the ``Q`` it used for the error feedback."""
  kw = dict(dict(group_size=None, symmetric=True, scale_dtype=jnp.float16, blocksize=128,
                 percdamp=0.01, act_order=False, static_groups=False), **kw)
  kw["group_size"] = kw["group_size"] or w.shape[0]
  return gptq_core._gptq(jnp.asarray(w), jnp.asarray(h), with_q=True, **kw)


# (K, N, kwargs), all with blocksize < K: groups spanning blocks (kw1), groups starting inside
# a block (kw0, kw2), K not a multiple of blocksize (padded last block, kw3), act_order with
# static groups (kw4) and per-channel (kw5). Configurations are shared with the other tests
# below, so that the whole file compiles GPTQ only about a dozen times.
B = 16
REFERENCE_CASES = [
    (64, 16, dict(bits=4, group_size=8, blocksize=B)),
    (96, 16, dict(bits=3, group_size=32, blocksize=B)),
    (64, 16, dict(bits=4, group_size=8, symmetric=False, blocksize=B)),
    (80, 16, dict(bits=3, group_size=16, blocksize=32)),
    (64, 16, dict(bits=4, group_size=16, symmetric=False, act_order=True, static_groups=True,
                  blocksize=B)),
    (64, 16, dict(bits=3, act_order=True, blocksize=B)),
]


@pytest.mark.parametrize("k,n,kw", REFERENCE_CASES)
def test_lazy_batch_matches_reference(k, n, kw):
  x = correlated_inputs(n=256, k=k, seed=k + n)
  w, h = weight(k, n, seed=k), hessian(x)
  qw, info = gptq_core.gptq_quantize(jnp.asarray(w), jnp.asarray(h), **kw)
  ref_kw = {key: v for key, v in kw.items() if key != "blocksize"}
  rq, rinfo = gptq_core.gptq_reference(w, h, **ref_kw)

  codes, ref_codes = np.asarray(qw.codes()), np.asarray(rq.codes())
  # float32 vs float64: only a near-tie could round differently.
  assert (codes == ref_codes).mean() >= 0.99
  q, ref_q = np.asarray(qw.materialize(), np.float64), rinfo["q"]
  assert np.linalg.norm(q - ref_q) <= 1e-2 * np.linalg.norm(ref_q)
  np.testing.assert_allclose(q[codes == ref_codes], ref_q[codes == ref_codes], rtol=1e-3,
                             atol=1e-3)
  np.testing.assert_allclose(float(info["loss"]), rinfo["loss"], rtol=1e-3)
  np.testing.assert_allclose(float(info["damp"]), rinfo["damp"], rtol=1e-5)
  assert int(info["dead"]) == 0 and bool(info["cholesky_ok"])


def test_matches_reference_exactly_in_float64():
  with jax.enable_x64(True):
    x = correlated_inputs(n=256, k=64, seed=5)
    w, h = weight(64, 16, seed=5).astype(np.float64), hessian(x).astype(np.float64)
    kw = dict(bits=4, group_size=8, symmetric=False)
    qw, info = gptq_core.gptq_quantize(jnp.asarray(w), jnp.asarray(h), blocksize=B, **kw)
    rq, rinfo = gptq_core.gptq_reference(w, h, **kw)
    np.testing.assert_array_equal(np.asarray(qw.codes()), np.asarray(rq.codes()))
    np.testing.assert_array_equal(np.asarray(qw.scale), np.asarray(rq.scale))
    np.testing.assert_array_equal(np.asarray(qw.materialize()), rinfo["q"])
    np.testing.assert_allclose(float(info["loss"]), rinfo["loss"], rtol=1e-9)


def test_blocksize_does_not_change_the_result():
  x = correlated_inputs(n=256, k=64, seed=3)
  w, h = jnp.asarray(weight(64, 16, seed=3)), jnp.asarray(hessian(x))
  q16, q64 = (gptq_core.gptq_quantize(w, h, bits=4, group_size=8, blocksize=b)[0] for b in (B, 64))
  assert (np.asarray(q16.codes()) == np.asarray(q64.codes())).mean() >= 0.99


@pytest.mark.parametrize("kw", [
    dict(bits=4, group_size=8),
    dict(bits=4),
    dict(bits=3, group_size=16),
    dict(bits=3, act_order=True),
])
def test_beats_rtn_on_output_error_but_not_on_weight_error(kw):
  x = correlated_inputs(n=512, k=64, seed=kw["bits"])
  w, h = weight(64, 16, seed=kw["bits"]), hessian(x)
  qw, _ = gptq_core.gptq_quantize(jnp.asarray(w), jnp.asarray(h), blocksize=B, **kw)
  rw = rtn_core.quantize_rtn(jnp.asarray(w), bits=kw["bits"], group_size=kw.get("group_size"))
  wq, wr = np.asarray(qw.materialize(), np.float64), np.asarray(rw.materialize(), np.float64)
  x64 = x.astype(np.float64)
  out_err_gptq = np.linalg.norm(x64 @ (w - wq))
  out_err_rtn = np.linalg.norm(x64 @ (w - wr))
  assert out_err_gptq < 0.7 * out_err_rtn, (out_err_gptq, out_err_rtn)
  assert np.linalg.norm(w - wr) <= np.linalg.norm(w - wq)


@pytest.mark.parametrize("kw", [
    dict(group_size=8, symmetric=False),
    dict(group_size=16, symmetric=False, act_order=True, static_groups=True),
])
def test_output_is_a_valid_quantized_array(kw):
  x = correlated_inputs(n=256, k=64, seed=7)
  w, h = weight(64, 16, seed=7), hessian(x)
  qw, info = gptq_core.gptq_quantize(jnp.asarray(w), jnp.asarray(h), bits=4, blocksize=B, **kw)
  assert isinstance(qw, formats.QuantizedArray)
  assert (qw.bits, qw.group_size, qw.shape, qw.dtype) == (4, kw["group_size"], (64, 16),
                                                          np.float32)
  assert qw.scale.dtype == jnp.float16 and qw.scale.shape == (64 // kw["group_size"], 16)
  assert (qw.zero is None) == kw.get("symmetric", True)
  assert set(info) >= {"loss", "damp", "percdamp", "dead", "cholesky_ok"}
  assert np.isfinite(np.asarray(qw.materialize())).all()


def test_materialize_equals_the_q_of_the_algorithm():
  x = correlated_inputs(n=256, k=64, seed=7)
  w, h = weight(64, 16, seed=7), hessian(x)
  kw = dict(bits=4, group_size=16, symmetric=False, act_order=True, static_groups=True,
            blocksize=B)
  qw, _ = gptq_core.gptq_quantize(jnp.asarray(w), jnp.asarray(h), **kw)
  codes, _, _, q, _, _ = run_with_q(w, h, **kw)
  np.testing.assert_array_equal(np.asarray(qw.codes()), np.asarray(codes))
  np.testing.assert_array_equal(np.asarray(qw.materialize()), np.asarray(q))


def test_jittable_under_strict_promotion_without_recompilation():
  x = correlated_inputs(n=128, k=64, seed=8)
  w, h = jnp.asarray(weight(64, 16, seed=8)), jnp.asarray(hessian(x))
  f = jax.jit(gptq_core.gptq_quantize, static_argnames=("bits", "group_size", "blocksize"))
  with jax.numpy_dtype_promotion("strict"):
    qw, info = f(w, h, bits=4, group_size=8, blocksize=B)
  eager, _ = gptq_core.gptq_quantize(w, h, bits=4, group_size=8, blocksize=B)
  np.testing.assert_array_equal(np.asarray(qw.packed), np.asarray(eager.packed))
  before = gptq_core._gptq._cache_size()
  gptq_core.gptq_quantize(w + 1, h, bits=4, group_size=8, blocksize=B)
  assert gptq_core._gptq._cache_size() == before


@pytest.mark.parametrize("symmetric", [True, False])
def test_dead_input_channels(symmetric):
  x = correlated_inputs(n=256, k=64, seed=10)
  x[:, [3, 40]] = 0.0
  w, h = weight(64, 16, seed=10), hessian(x)
  qw, info = gptq_core.gptq_quantize(jnp.asarray(w), jnp.asarray(h), bits=4, group_size=8,
                                     symmetric=symmetric, blocksize=B)
  wq = np.asarray(qw.materialize())
  assert int(info["dead"]) == 2 and bool(info["cholesky_ok"])
  assert np.isfinite(wq).all() and np.isfinite(float(info["loss"]))
  if symmetric:  # 0 is on the symmetric grid
    np.testing.assert_array_equal(wq[[3, 40]], 0.0)
  else:  # a float-offset grid may not hold 0 exactly: nearest grid point
    half_step = np.asarray(qw.scale, np.float32)[[3 // 8, 40 // 8]] / 2
    assert np.all(np.abs(wq[[3, 40]]) <= half_step * (1 + 1e-3) + 1e-6)
  rq, _ = gptq_core.gptq_reference(w, h, bits=4, group_size=8, symmetric=symmetric)
  assert (np.asarray(qw.codes()) == np.asarray(rq.codes())).mean() >= 0.99


def test_rank_deficient_hessian_is_finite():
  x = correlated_inputs(n=16, k=64, seed=11)  # n < K: H has rank 16
  w, h = weight(64, 16, seed=11), hessian(x)
  qw, info = gptq_core.gptq_quantize(jnp.asarray(w), jnp.asarray(h), bits=4, group_size=8,
                                     blocksize=B)
  wq = np.asarray(qw.materialize(), np.float64)
  assert np.isfinite(wq).all() and np.isfinite(float(info["loss"]))
  assert bool(info["cholesky_ok"])
  rw = np.asarray(rtn_core.quantize_rtn(jnp.asarray(w), bits=4, group_size=8).materialize())
  assert np.linalg.norm(x @ (w - wq)) < np.linalg.norm(x @ (w - rw))


def test_indefinite_hessian_retries_with_more_damping():
  k = 64
  h = (np.eye(k) + 2.0 * (np.ones((k, k)) - np.eye(k))).astype(np.float32)  # eigenvalue -1
  w = weight(k, 16, seed=12)
  qw, info = gptq_core.gptq_quantize(jnp.asarray(w), jnp.asarray(h), bits=4, group_size=8,
                                     blocksize=B)
  # mean(diag) = 1: damping 0.01, 0.1 and 1 leave an eigenvalue <= 0; 10 works.
  np.testing.assert_allclose(float(info["percdamp"]), 10.0, rtol=1e-6)
  np.testing.assert_allclose(float(info["damp"]), 10.0, rtol=1e-6)
  assert bool(info["cholesky_ok"]) and np.isfinite(np.asarray(qw.materialize())).all()
  _, rinfo = gptq_core.gptq_reference(w, h, bits=4, group_size=8)
  np.testing.assert_allclose(rinfo["percdamp"], 10.0)


def test_zero_hessian_does_not_crash():
  w = weight(64, 16, seed=13)
  qw, info = gptq_core.gptq_quantize(jnp.asarray(w), jnp.zeros((64, 64)), bits=4, group_size=8,
                                     blocksize=B)
  assert int(info["dead"]) == 64 and bool(info["cholesky_ok"])
  np.testing.assert_array_equal(np.asarray(qw.materialize()), 0.0)
  assert float(info["loss"]) == 0.0


def test_nan_hessian_falls_back_to_rtn():
  w = jnp.asarray(weight(64, 16, seed=14))
  qw, info = gptq_core.gptq_quantize(w, jnp.full((64, 64), jnp.nan), bits=4, blocksize=B)
  assert not bool(info["cholesky_ok"])
  rw = rtn_core.quantize_rtn(w, bits=4)
  np.testing.assert_array_equal(np.asarray(qw.packed), np.asarray(rw.packed))


def test_invalid_arguments_raise_naming_the_parameter():
  w, h = jnp.zeros((64, 8)), jnp.eye(64)
  with pytest.raises(ValueError, match=r"group_size.*K=64"):
    gptq_core.gptq_quantize(w, h, bits=4, group_size=10)
  with pytest.raises(ValueError, match="bits"):
    gptq_core.gptq_quantize(w, h, bits=5)
  with pytest.raises(ValueError, match="static_groups"):
    gptq_core.gptq_quantize(w, h, bits=4, group_size=16, act_order=True)
  with pytest.raises(ValueError, match="H must"):
    gptq_core.gptq_quantize(w, jnp.eye(32), bits=4)
  with pytest.raises(ValueError, match="blocksize"):
    gptq_core.gptq_quantize(w, h, bits=4, blocksize=0)
  with pytest.raises(ValueError, match="percdamp"):
    gptq_core.gptq_quantize(w, h, bits=4, percdamp=-0.1)
  with pytest.raises(ValueError, match="group_size"):
    gptq_core.gptq_reference(w, h, bits=4, group_size=10)
