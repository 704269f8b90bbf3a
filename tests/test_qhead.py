"""Untied, quantized LM head (compressjax.head, issue 16): logits, kernel, decode, save, export."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import checkpoint, formats, head
from compressjax import transforms as T
from compressjax.io import build_model, model_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_RULE = "lm_head/kernel"


def _tied():
  m = tiny.tiny_model(seed=0)
  return m, m.cfg, model_params(m)


def _quantized_head(bits=4, group_size=64, linears_bits=None):
  """The tiny model untied, its head RTN-quantized (and the linears when asked)."""
  _, cfg, p = _tied()
  cfg, p = head.untie_head(cfg, p)
  rules = [(HEAD_RULE, T.rtn(bits, group_size))]
  if linears_bits:
    rules.append((T.LINEAR_KERNELS, T.rtn(linears_bits, 64)))
  return cfg, T.apply(T.select(*rules), p)[0]


def _tokens(shape=(2, 9), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 300, shape), jnp.int32)


def test_untied_dense_head_equals_the_tied_model():
  m, cfg, p = _tied()
  cfg2, p2 = head.untie_head(cfg, p)
  assert cfg2.tie_word_embeddings is False and cfg.tie_word_embeddings is True
  assert "lm_head" not in p  # the caller's tree is not modified
  np.testing.assert_array_equal(p2["lm_head"]["kernel"], p["embed"]["embedding"].T)
  a, b = m(_tokens()), build_model(cfg2, p2)(_tokens())
  # Same product h @ E.T, only the float32 summation order may differ.
  np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def test_untie_handles_lazy_and_abstract_leaves_and_refuses_bad_input():
  from compressjax.blocks import LazyTensor
  _, cfg, p = _tied()
  e = np.asarray(p["embed"]["embedding"])
  lazy = dict(p, embed={"embedding": LazyTensor(e.shape, e.dtype, lambda: e, name="tok")})
  _, pl = head.untie_head(cfg, lazy)
  assert isinstance(pl["lm_head"]["kernel"], LazyTensor)
  np.testing.assert_array_equal(pl["lm_head"]["kernel"].load(), e.T)
  ab = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)
  assert head.untie_head(cfg, ab)[1]["lm_head"]["kernel"].shape == (64, 300)
  cfg2, p2 = head.untie_head(cfg, p)
  with pytest.raises(ValueError, match="tie_word_embeddings=False"):
    head.untie_head(cfg2, p2)
  with pytest.raises(ValueError, match="no 'embed/embedding'"):
    head.untie_head(cfg, {"norm": p["norm"]})
  with pytest.raises(ValueError, match=r"shape \(300, 32\), expected \(300, 64\)"):
    head.untie_head(cfg, dict(p, embed={"embedding": jnp.zeros((300, 32))}))
  q = T.apply(T.rtn(8, 60, where="embed/embedding"), p)[0]
  with pytest.raises(ValueError, match="compressed QuantizedArray"):
    head.untie_head(cfg, q)


@pytest.mark.parametrize("bits, tol", [(8, 0.01), (4, 0.15)])
def test_quantized_head_logits_against_dense(bits, tol):
  """Relative logit error of an RTN g64 head against the dense model (stated tolerance:
  8 bits 1%, 4 bits 15%, max-abs over max-abs), and the model's logits equal h @ W_q exactly
  up to float32 summation order (XLA path and CPU kernel alike)."""
  m, _, _ = _tied()
  cfg, p = _quantized_head(bits)
  assert isinstance(p["lm_head"]["kernel"], formats.QuantizedArray)
  toks = _tokens()
  dense = m(toks)
  h, _ = m.hidden_states(toks)
  w = p["lm_head"]["kernel"].materialize()
  want = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  bound = np.abs(np.asarray(h, np.float64)) @ np.abs(np.asarray(w, np.float64))
  for impl in ("xla", "cpu"):
    model = build_model(dataclasses.replace(cfg, matmul_implementation=impl), p)
    got = np.asarray(model(toks), np.float64)
    assert np.all(np.abs(got - want) <= 1e-5 * bound + 1e-7), impl
  err = float(jnp.max(jnp.abs(got - dense)) / jnp.max(jnp.abs(dense)))
  assert err < tol, err


@pytest.mark.parametrize("group_size", [pytest.param(32, marks=pytest.mark.slow), 64,
                                        pytest.param(192, marks=pytest.mark.slow)])
def test_cpu_kernel_at_the_reference_head_shape(group_size):
  """K=576 (hidden), N=49152 (vocab) of SmolLM2-135M: the kernel equals the XLA path within
  1e-5 * (|x| @ |W|) elementwise, at 1 row (and 16 rows for g64). (Group 128 does not divide K=576: the
  head's group sizes are the divisors of 576, 32/64/192/288/576 among them.)"""
  from compressjax.kernels import cpu
  k, n = 576, 49152
  rng = np.random.default_rng(group_size)
  w = formats.QuantizedArray.from_codes(
      jnp.asarray(rng.integers(0, 16, (k, n)).astype(np.uint8)),
      jnp.asarray((rng.random((k // group_size, n)) * 0.02 + 0.001).astype(np.float16)), None,
      bits=4, group_size=group_size, symmetric=True, dtype=jnp.float32)
  wabs = jnp.abs(w.materialize())
  for rows in ((1, 16) if group_size == 64 else (1,)):
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    assert cpu.can_use(x, w)
    got = jax.jit(lambda x, w: formats.dot(x, w, implementation="cpu"))(x, w)
    ref = jax.jit(lambda x, w: formats.dot(x, w, implementation="xla"))(x, w)
    bound = jnp.abs(x) @ wabs
    assert got.shape == (rows, n)
    assert bool(jnp.all(jnp.abs(got - ref) <= 1e-5 * bound)), float(jnp.max(jnp.abs(got - ref)))


def test_generate_with_the_quantized_head_matches_the_xla_path():
  cfg, p = _quantized_head(4, linears_bits=4)
  from compressjax import generate as G
  prompt = np.asarray(_tokens((1, 5), seed=3))[0]
  toks = {impl: G.generate(build_model(dataclasses.replace(cfg, matmul_implementation=impl), p),
                           prompt, 8) for impl in ("xla", "cpu")}
  np.testing.assert_array_equal(toks["cpu"], toks["xla"])


def test_checkpoint_round_trip_keeps_the_untied_config(tmp_path):
  from compressjax.model import LlamaConfig
  from compressjax.pipeline import model_config_dict
  cfg, p = _quantized_head(4)
  path = str(tmp_path / "ck")
  checkpoint.save(path, p, metadata={"model_config": model_config_dict(cfg)})
  back, meta = checkpoint.restore(path)
  cfg2 = LlamaConfig(**meta["model_config"])
  assert cfg2.tie_word_embeddings is False
  assert isinstance(back["lm_head"]["kernel"], formats.QuantizedArray)
  toks = _tokens()
  np.testing.assert_array_equal(build_model(cfg2, back)(toks), build_model(cfg, p)(toks))


def test_exports_write_the_head_or_refuse(tmp_path):
  from compressjax.io import export, gguf, hf
  cfg, p = _quantized_head(4, linears_bits=4)
  toks = _tokens()
  want = build_model(cfg, p)(toks)
  # Dense HF checkpoint: lm_head.weight materialized, tie_word_embeddings false.
  out = hf.save_hf(str(tmp_path / "hf"), cfg, p)
  import json
  assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
  cfg_h, p_h, _ = hf.load_hf(out)
  assert cfg_h.tie_word_embeddings is False
  np.testing.assert_allclose(build_model(cfg_h, p_h)(toks), want, rtol=0, atol=1e-5)
  # compressed-tensors: the head is a quantized Linear; import gives the same codes.
  ct = export.export_compressed_tensors(str(tmp_path / "ct"), cfg, p)
  cfg_c, p_c, _ = export.load_compressed_tensors(ct)
  assert cfg_c.tie_word_embeddings is False
  hq = p_c["lm_head"]["kernel"]
  assert isinstance(hq, formats.QuantizedArray)
  np.testing.assert_array_equal(hq.materialize(), p["lm_head"]["kernel"].materialize())
  # GPTQ keeps lm_head dense: a quantized head is refused, naming it.
  with pytest.raises(ValueError, match="'lm_head/kernel' is quantized.*export_compressed_tensors"):
    export.export_gptq(str(tmp_path / "gptq"), cfg, p)
  assert not os.path.exists(tmp_path / "gptq")
  # GGUF: output.weight in the exact type of the 4-bit g64 symmetric head (Q4_0).
  tok = _tokenizer()
  types = gguf.export_gguf(p, cfg, tok, str(tmp_path / "m.gguf"))
  assert types["output.weight"] == "Q4_0"
  cfg_g, p_g, _ = gguf.load_gguf(str(tmp_path / "m.gguf"))
  assert cfg_g.tie_word_embeddings is False
  np.testing.assert_array_equal(np.asarray(formats.materialize(p_g["lm_head"]["kernel"])),
                                np.asarray(p["lm_head"]["kernel"].materialize()))
  # A 2-bit head has no exact GGUF type: refused unless materialize_other.
  cfg2, p2 = _quantized_head(2)
  with pytest.raises(ValueError, match="lm_head/kernel"):
    gguf.export_gguf(p2, cfg2, tok, str(tmp_path / "m2.gguf"))


def _tokenizer():
  from compressjax.io import gguf
  import tempfile
  d = tempfile.mkdtemp()
  path = tiny.write_tiny_gguf(os.path.join(d, "t.gguf"), tiny.tiny_model(seed=0))
  return gguf.load_gguf(path)[2]


def test_bench_qhead_methods_build():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  try:
    import bench_kernels  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  _, cfg, p = _tied()
  for method, hb, lb in (("rtn4_g64_cpukernel_qhead", 4, 4), ("rtn4_g64_cpukernel_qhead8", 8, 4),
                         ("rtn2_g64_cpukernel_qhead4", 4, 2)):
    assert bench_kernels.head_bits(method) == hb
    mcfg, mp = bench_kernels.decode_setup(cfg, p, method)
    assert mcfg.tie_word_embeddings is False and mcfg.matmul_implementation == "cpu"
    assert mp["lm_head"]["kernel"].bits == hb
    assert mp["layers"][0]["mlp"]["up_proj"]["kernel"].bits == lb
  assert bench_kernels.head_bits("rtn4_g64_cpukernel") is None
  with pytest.raises(ValueError, match="untie the head"):
    bench_kernels.decode_params(p, "rtn4_g64_cpukernel_qhead")


@pytest.mark.slow  # ~15 s: a compress + evaluate + save + re-evaluate job
def test_pipeline_config_untie_head_end_to_end(tiny_gguf, tiny_data, tmp_path):
  """configs/rtn_w4g64_qhead4 on the tiny GGUF: the head is compressed, counted in
  lm_head_bytes / model_bytes (not in bits_per_param), saved untied and re-evaluated bit for bit."""
  import importlib
  from compressjax import pipeline
  cfg = importlib.import_module("configs.rtn_w4g64_qhead4").get_config()
  cfg.model, cfg.data.dir = tiny_gguf[0], tiny_data
  cfg.data.seq_len, cfg.data.num_eval_windows, cfg.data.batch_size = 64, 2, 2
  cfg.eval_before = False
  cfg.output_dir = str(tmp_path / "ck")
  rec = pipeline.run_compress(cfg)
  # 300 x 64 head at 4 bits + float16 scales of groups of 64: 300 * 64 * (4 + 16 / 64) / 8.
  assert rec["lm_head_bytes"] == 300 * 64 * 4 // 8 + 300 * 2
  assert rec["bits_per_param"] == pytest.approx(4.25)
  assert rec["model_bytes"] > rec["other_bytes"] > rec["lm_head_bytes"]
  params, meta = checkpoint.restore(cfg.output_dir)
  assert meta["model_config"]["tie_word_embeddings"] is False
  assert isinstance(params["lm_head"]["kernel"], formats.QuantizedArray)
  # The baseline is the tied dense model as loaded (embedding, 2 x 7 linears, 5 norms; float32):
  # the untied head is not part of it.
  assert rec["dense_model_bytes"] == 4 * (300 * 64 + 73728 + 5 * 64)
  again = pipeline.run_eval(cfg.output_dir)
  assert all(r["matches_saved"] for r in again.values())
