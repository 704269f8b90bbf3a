"""Tests for compressjax.quantize.rtn_core (round-to-nearest quantization)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
from compressjax.quantize import rtn_core

BITS = (2, 3, 4, 8)
F16_U = 2.0**-11  # unit roundoff of float16 (where scale/zero are stored)


def weight(k=128, n=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((k, n), np.float32))


def per_element(x, group_size):
  return np.repeat(np.asarray(x, np.float64), group_size, axis=0)


def assert_within_bound(w, qw):
  """|w - w'| <= scale / 2 plus the float16 slack documented in rtn_core."""
  gs = qw.group_size
  w64 = np.asarray(w, np.float64)
  err = np.abs(w64 - np.asarray(qw.materialize(), np.float64))
  scale = per_element(qw.scale, gs)
  absmax = per_element(np.abs(w64).reshape(-1, gs, w64.shape[1]).max(axis=1), gs)
  bound = scale / 2 + 2 * F16_U * absmax + 1e-6 * absmax
  assert np.all(err <= bound), float(np.max(err - bound))
  # The slack only matters at a group's extremes: almost all elements meet scale / 2.
  inside = err <= scale / 2 * (1 + 1e-5) + 1e-7
  assert inside.mean() > 0.95


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_bound(bits, symmetric):
  w = weight(128, 16, seed=bits)
  for group_size in (32, None):
    qw = rtn_core.quantize_rtn(w, bits=bits, group_size=group_size, symmetric=symmetric)
    assert isinstance(qw, formats.QuantizedArray)
    assert qw.group_size == (128 if group_size is None else group_size)
    assert qw.scale.dtype == jnp.float16 and qw.dtype == jnp.float32
    assert (qw.zero is None) == symmetric
    assert_within_bound(w, qw)


def test_codes_are_nearest_on_the_stored_grid():
  w = weight(128, 16, seed=3)
  for symmetric in (True, False):
    qw = rtn_core.quantize_rtn(w, bits=3, group_size=32, symmetric=symmetric)
    scale = per_element(qw.scale, 32)
    levels = np.arange(8, dtype=np.float64)
    if symmetric:
      grid = scale[..., None] * (levels - 4)
    else:
      grid = scale[..., None] * levels + per_element(qw.zero, 32)[..., None]
    dist = np.abs(np.asarray(w, np.float64)[..., None] - grid)
    chosen = np.take_along_axis(dist, np.asarray(qw.codes(), np.int64)[..., None], -1)[..., 0]
    assert np.all(chosen <= dist.min(-1) + 1e-6)


def test_more_bits_lower_error():
  w = weight(128, 16, seed=7)
  for symmetric in (True, False):
    for group_size in (32, None):
      errors = [
          float(jnp.mean((w - rtn_core.quantize_rtn(
              w, bits=b, group_size=group_size, symmetric=symmetric).materialize())**2))
          for b in BITS
      ]
      assert all(a > b for a, b in zip(errors, errors[1:])), errors
  # Smaller groups also help.
  e32 = jnp.mean((w - rtn_core.quantize_rtn(w, bits=4, group_size=32).materialize())**2)
  e128 = jnp.mean((w - rtn_core.quantize_rtn(w, bits=4, group_size=None).materialize())**2)
  assert e32 < e128


def test_reproduces_q4_1_grid_exactly():
  k, n, gs = 128, 16, 32
  rng = np.random.default_rng(0)
  g = k // gs
  d = rng.uniform(0.01, 0.1, (g, n)).astype(np.float16)
  m = rng.uniform(-1.0, 0.0, (g, n)).astype(np.float16)
  q = rng.integers(0, 16, (g, gs, n))
  q[:, 0, :] = 0  # every group holds both ends of the grid,
  q[:, 1, :] = 15  # so min = m and max = 15 d + m.
  q = np.stack([rng.permuted(q[i], axis=0) for i in range(g)])
  w = (d.astype(np.float32)[:, None, :] * q.astype(np.float32)
       + m.astype(np.float32)[:, None, :]).reshape(k, n)
  qw = rtn_core.quantize_rtn(jnp.asarray(w), bits=4, group_size=gs, symmetric=False)
  np.testing.assert_array_equal(np.asarray(qw.scale), d)
  np.testing.assert_array_equal(np.asarray(qw.zero), m)
  np.testing.assert_array_equal(np.asarray(qw.codes()), q.reshape(k, n))
  out = np.asarray(qw.materialize())
  assert np.max(np.abs(out - w)) <= 1e-6 * np.max(np.abs(w))


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group_is_exact_and_finite(symmetric):
  w = np.asarray(weight(seed=1)).copy()
  w[:32, 1] = 0.0  # one all-zero group
  qw = rtn_core.quantize_rtn(jnp.asarray(w), bits=4, group_size=32, symmetric=symmetric)
  out = np.asarray(qw.materialize())
  assert np.all(np.isfinite(out))
  assert np.all(out[:32, 1] == 0.0)
  assert float(qw.scale[0, 1]) == 0.0
  zeros = rtn_core.quantize_rtn(jnp.zeros((128, 16)), bits=4, symmetric=symmetric)
  assert np.all(np.asarray(zeros.materialize()) == 0.0)


def test_scale_dtype_and_logical_dtype():
  w = weight().astype(jnp.bfloat16)
  qw = rtn_core.quantize_rtn(w, bits=8, group_size=32, symmetric=False, scale_dtype=jnp.float32)
  assert qw.scale.dtype == jnp.float32 and qw.zero.dtype == jnp.float32
  assert qw.dtype == jnp.bfloat16 and qw.materialize().dtype == jnp.bfloat16


def test_jit_and_eval_shape():
  w = weight()
  f = jax.jit(lambda w: rtn_core.quantize_rtn(w, bits=3, group_size=32))
  np.testing.assert_array_equal(f(w).materialize(),
                                rtn_core.quantize_rtn(w, bits=3, group_size=32).materialize())
  abstract = jax.eval_shape(lambda w: rtn_core.quantize_rtn(w, bits=4, group_size=64,
                                                            symmetric=False),
                            jax.ShapeDtypeStruct((576, 64), jnp.float32))
  assert abstract.packed.shape == (72, 64) and abstract.scale.shape == (9, 64)
  assert abstract.nbytes == 576 * 64 // 2 + 2 * 9 * 64 * 2


@pytest.mark.parametrize("bits", [1, 5, 16, 4.0, None])
def test_bad_bits(bits):
  with pytest.raises(ValueError, match="bits") as err:
    rtn_core.quantize_rtn(weight(), bits=bits)
  assert "(2, 3, 4, 8)" in str(err.value)


@pytest.mark.parametrize("group_size", [20, 0, -32, 128, 32.0])
def test_bad_group_size(group_size):
  with pytest.raises(ValueError, match="group_size") as err:
    rtn_core.quantize_rtn(weight(96, 4), bits=4, group_size=group_size)
  msg = str(err.value)
  assert "K=96" in msg and "[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96]" in msg


@pytest.mark.parametrize("shape", [(64,), (2, 64, 4)])
def test_bad_shape(shape):
  with pytest.raises(ValueError, match="2-D") as err:
    rtn_core.quantize_rtn(jnp.zeros(shape), bits=4)
  assert str(shape) in str(err.value)


def test_helpers_compose():
  w = weight()
  codes, scale, zero = rtn_core.rtn_codes(w, bits=4, group_size=32, symmetric=False)
  assert codes.shape == (128, 16) and codes.dtype == jnp.uint8
  assert scale.shape == zero.shape == (4, 16)
  qw = rtn_core.quantize_rtn(w, bits=4, group_size=32, symmetric=False)
  np.testing.assert_array_equal(np.asarray(qw.codes()), np.asarray(codes))
