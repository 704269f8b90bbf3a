"""Model behaviour on tiny random weights: shapes, causality, KV cache, compressed leaves, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny
from compressjax import formats, transforms
from compressjax.generate import generate
from compressjax.io import build_model, model_params
from compressjax.model import LlamaConfig, init_cache


def test_forward_shapes_and_causality():
  model = tiny.tiny_model()
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 12)), jnp.int32)
  logits = model(toks)
  assert logits.shape == (2, 12, 300) and logits.dtype == jnp.float32
  # Changing a later token never changes earlier logits.
  toks2 = toks.at[:, 8].set((toks[:, 8] + 1) % 300)
  np.testing.assert_array_equal(np.asarray(model(toks2)[:, :8]), np.asarray(logits[:, :8]))
  assert not np.allclose(model(toks2)[:, 8:], logits[:, 8:])


def test_cache_prefill_and_decode_match_full_forward():
  model = tiny.tiny_model()
  toks = jnp.asarray(np.random.default_rng(1).integers(0, 300, (2, 10)), jnp.int32)
  full = model(toks)
  cache = init_cache(model.cfg, 2, 16)
  l1, cache = model(toks[:, :6], cache)
  l2, cache = model(toks[:, 6:7], cache)
  l3, cache = model(toks[:, 7:], cache)
  got = jnp.concatenate([l1, l2, l3], axis=1)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=1e-5)
  assert int(cache.length) == 10


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generate_with_cache_equals_without(temperature):
  model = tiny.tiny_model(seed=3)
  prompt = np.random.default_rng(2).integers(0, 300, (2, 7))
  a = generate(model, prompt, 12, use_cache=True, temperature=temperature, seed=5)
  b = generate(model, prompt, 12, use_cache=False, temperature=temperature, seed=5)
  assert a.shape == (2, 12)
  np.testing.assert_array_equal(a, b)


def test_generate_eos_sticks_and_bad_input():
  model = tiny.tiny_model(seed=3)
  out = generate(model, [5, 6, 7], 8)
  eos = int(out[2])
  out2 = generate(model, [5, 6, 7], 8, eos_id=eos)
  assert (out2[2:] == eos).all()
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, [1, 2], 0)
  with pytest.raises(ValueError, match="prompt_tokens"):
    generate(model, np.zeros((1, 0), np.int32), 3)


def test_sliding_window_and_bias_and_untied_head():
  model = tiny.tiny_model(attention_bias=True, tie_word_embeddings=False, sliding_window=4)
  p = model_params(model)
  assert "bias" in p["layers"][0]["attn"]["q_proj"] and "lm_head" in p
  toks = jnp.arange(12, dtype=jnp.int32)[None]
  full = model(toks)
  # With a window of 4, the last position only sees tokens 8..11: earlier tokens are irrelevant.
  toks2 = toks.at[:, :5].set(0)
  np.testing.assert_allclose(model(toks2)[:, -1], full[:, -1], atol=1e-5)


def test_compressed_model_runs_jits_and_generates_without_materializing():
  model = tiny.tiny_model(seed=4)
  params = model_params(model)
  qparams, _ = transforms.apply(transforms.rtn(bits=8), params)
  qmodel = build_model(model.cfg, qparams)
  kernel = qmodel.layers[0].attn.q_proj.kernel.get_value()
  assert isinstance(kernel, formats.QuantizedArray)
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 300, (1, 9)), jnp.int32)
  graphdef, state = nnx.split(qmodel)
  f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  out = f(state, toks)
  np.testing.assert_allclose(out, model(toks), atol=0.05)  # 8-bit: close to the dense model
  # The jitted program is fed the packed uint32 codes; no dense float kernel exists in its inputs.
  leaves = jax.tree.leaves(state)
  assert sum(x.dtype == jnp.uint32 for x in leaves) == 7 * model.cfg.num_layers
  dense_2d = [x.shape for x in leaves if x.dtype == jnp.float32 and x.ndim == 2]
  assert dense_2d == [(300, 64)]  # only the (tied) embedding stays dense
  assert generate(qmodel, toks[0], 4).shape == (4,)


def test_config_validation():
  with pytest.raises(ValueError, match="num_kv_heads"):
    LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4,
                num_kv_heads=3)
  with pytest.raises(ValueError, match="rope_type"):
    LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4,
                num_kv_heads=4, rope_scaling={"rope_type": "weird"})
  with pytest.raises(ValueError, match="hidden_size"):
    LlamaConfig(vocab_size=10, hidden_size=0, intermediate_size=8, num_layers=1, num_heads=4,
                num_kv_heads=4)


def test_generate_does_not_recompile_on_a_second_call():
  from compressjax import generate as gen
  model = tiny.tiny_model(seed=6)
  generate(model, [1, 2, 3], 4)
  graphdef, state = nnx.split(model)
  state_def = jax.tree.structure(state)
  decode = gen._cached_decode(graphdef, state_def, 0.0, 4, None)
  compiled = decode._cache_size()
  generate(model, [7, 8, 9], 4)  # same shapes: no new trace or compile
  assert gen._cached_decode(graphdef, state_def, 0.0, 4, None) is decode
  assert decode._cache_size() == compiled
