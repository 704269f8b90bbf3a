"""bfloat16 matmuls with float32 accumulation (``LlamaConfig.matmul_dtype``, the engine's
``matmul_dtype``): what is rounded, what stays float32, and that GPTQ keeps its quality."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import other_family
import tiny
from compressjax import calibration, formats, transforms as T
from compressjax.blocks import LlamaBlocks
from compressjax.io import build_model, model_params
from compressjax.model import LlamaConfig, matmul
from compressjax.quantize.rtn_core import quantize_rtn


def _bf16(a):
  return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


def _windows(n, t, seed):
  return np.random.default_rng(seed).integers(0, 300, (n, t)).astype(np.int32)


def test_matmul_rounds_the_operands_and_accumulates_in_float32():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 96)).astype(np.float32)
  w = rng.standard_normal((96, 7)).astype(np.float32)
  y = matmul(jnp.asarray(x), jnp.asarray(w), "bfloat16")
  assert y.dtype == jnp.float32
  exact = _bf16(x) @ _bf16(w)  # products of bfloat16 values are exact in float32
  np.testing.assert_allclose(np.asarray(y), exact, rtol=1e-6, atol=1e-5)
  # ... which is not the float32 product (the operands were rounded)
  assert np.abs(np.asarray(y) - x.astype(np.float64) @ w).max() > 1e-3
  np.testing.assert_array_equal(matmul(jnp.asarray(x), jnp.asarray(w)), jnp.asarray(x) @ w)


def test_config_refuses_other_dtypes_and_leaves_it_out_of_to_dict():
  with pytest.raises(ValueError, match="matmul_dtype"):
    tiny.tiny_config(matmul_dtype="float16")
  cfg = tiny.tiny_config(matmul_dtype="bfloat16")
  assert "matmul_dtype" not in cfg.to_dict()
  assert LlamaConfig(**cfg.to_dict()).matmul_dtype is None


def test_model_forward_with_bfloat16_matmuls_is_close_and_compressed_kernels_unchanged():
  model = tiny.tiny_model(seed=3)
  toks = jnp.asarray(_windows(2, 16, 0))
  ref = model(toks)
  params = model_params(model)
  fast = build_model(dataclasses.replace(model.cfg, matmul_dtype="bfloat16"), params)(toks)
  rel = float(jnp.max(jnp.abs(fast - ref)) / jnp.max(jnp.abs(ref)))
  assert 1e-5 < rel < 3e-2, rel  # rounded (not identical), but close
  # a model whose linears are all compressed takes formats.dot: matmul_dtype changes only the
  # attention products, far less than above
  q, _ = T.apply(T.rtn(bits=4, group_size=32), params)
  qref = build_model(model.cfg, q)(toks)
  qfast = build_model(dataclasses.replace(model.cfg, matmul_dtype="bfloat16"), q)(toks)
  qrel = float(jnp.max(jnp.abs(qfast - qref)) / jnp.max(jnp.abs(qref)))
  assert qrel < rel, (qrel, rel)


def test_engine_statistics_are_the_rounded_inputs_gram():
  model = tiny.tiny_model(seed=1)
  w = _windows(6, 24, 0)
  seen = {}

  def spy(path, leaf, stats):
    seen[path] = stats
    return leaf

  calibration.run_sequential(model, w, T.leafwise(spy, with_stats=True, name="spy"),
                             batch_size=4, progress=False, matmul_dtype="bfloat16")
  x = _bf16(model.layers[0].attn_norm(model.embed_tokens(jnp.asarray(w))).reshape(-1, 64))
  st = seen["layers/0/attn/q_proj/kernel"]
  assert st.hessian.dtype == jnp.float32
  np.testing.assert_allclose(st.hessian, x.T @ x, rtol=2e-6, atol=1e-4)
  np.testing.assert_allclose(st.sq_sum, np.sum(x * x, 0), rtol=2e-6)
  np.testing.assert_allclose(st.abs_sum, np.sum(np.abs(x), 0), rtol=2e-6)
  # not the float32 inputs' gram
  xf = np.asarray(model.layers[0].attn_norm(model.embed_tokens(jnp.asarray(w))).reshape(-1, 64),
                  np.float64)
  assert np.abs(np.asarray(st.hessian) - xf.T @ xf).max() > 1e-3


def test_engine_forward_multiplies_the_dequantized_block():
  """The propagation pass of a compressed block equals the dense forward of its dequantized
  kernels with the same bfloat16 matmuls."""
  model = tiny.tiny_model(seed=2)
  bm = LlamaBlocks.from_model(model).with_matmul_dtype("bfloat16")
  block = bm.block_params(0)
  qblock = {p: (quantize_rtn(v, bits=4, group_size=32) if p.endswith("proj/kernel") else v)
            for p, v in block.items()}
  assert any(isinstance(v, formats.CompressedArray) for v in qblock.values())
  dense = {p: formats.materialize(v) for p, v in qblock.items()}
  xs = jax.random.normal(jax.random.key(0), (2, 3, 16, 64))
  passes = calibration._Passes(bm, "bfloat16")  # pylint: disable=protected-access
  want = jax.lax.map(lambda x: bm.apply_block(dense, x), xs)
  got = passes.forward(qblock, xs)  # consumes xs
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_gptq_with_bfloat16_matmuls_keeps_its_quality():
  model = tiny.tiny_model(seed=4)
  cal, held = _windows(16, 32, 0), jnp.asarray(_windows(4, 32, 1))
  ref = model(held)
  err = {}
  for label, md in (("f32", None), ("bf16", "bfloat16")):
    q, _ = calibration.run_sequential(model, cal, T.gptq(bits=3, group_size=32), batch_size=8,
                                      progress=False, matmul_dtype=md)
    err[label] = float(jnp.mean((build_model(model.cfg, q)(held) - ref) ** 2))
  r, _ = calibration.run_sequential(model, cal, T.rtn(bits=3, group_size=32), progress=False)
  err["rtn"] = float(jnp.mean((build_model(model.cfg, r)(held) - ref) ** 2))
  assert err["bf16"] < err["rtn"], err
  assert abs(err["bf16"] - err["f32"]) < 0.05 * err["f32"], err


def test_engine_refusals():
  model = tiny.tiny_model(seed=5)
  w = _windows(4, 16, 0)
  with pytest.raises(ValueError, match="matmul_dtype must be one of"):
    calibration.run_sequential(model, w, T.gptq(bits=4), progress=False, matmul_dtype="fp8")
  bm = other_family.Gpt2Blocks(other_family.init_params(0))
  with pytest.raises(ValueError, match="Gpt2Blocks does not offer"):
    calibration.run_sequential(bm, w, T.gptq(bits=4), progress=False, matmul_dtype="bfloat16")


@pytest.mark.parametrize("k", [100, 600, 1100])
def test_gram_tile_rows_assemble_to_the_upper_gram(k):
  """The bfloat16 passes' carry (unpadded tile rows) is the same upper-tile ``X^T X``."""
  x = jax.random.normal(jax.random.key(k), (16, k)).astype(jnp.bfloat16)
  rows = calibration._gram_row_blocks(x)  # pylint: disable=protected-access
  assert len(rows) == (1 if k < 512 else -(-k // 256))
  up = calibration._assemble_upper(rows, k)  # pylint: disable=protected-access
  np.testing.assert_allclose(up, calibration._gram_upper(x), rtol=1e-6, atol=1e-5)  # pylint: disable=protected-access
  full = calibration._mirror(up)  # pylint: disable=protected-access
  xf = np.asarray(x.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(full, xf.T @ xf, rtol=1e-5, atol=1e-4)
