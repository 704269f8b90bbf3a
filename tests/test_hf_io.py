"""Hugging Face checkpoint I/O: round trips, atomic writes, errors, parity with transformers."""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from compressjax import formats
from compressjax.blocks import materialize
from compressjax.io import build_model, hf, load_hf, load_model, model_params, save_hf
from compressjax.io.gguf import unpermute_qk
from compressjax.model import Llama, LlamaConfig, rope_inv_freq
from conftest import require

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
LINEAR = {"rope_type": "linear", "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}


def tiny_config(**kw) -> LlamaConfig:
  base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
              num_kv_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
  base.update(kw)
  return LlamaConfig(**base)


def random_params(cfg: LlamaConfig, seed: int = 0):
  """Params of a tiny model, all randomized (norm scales and biases too) as float32 numpy."""
  model = Llama(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)

  def rand(path, x):
    x = np.asarray(x)
    if path[-1] == "scale":
      return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    if path[-1] == "bias":
      return (0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    return (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32)

  def walk(tree, path=()):
    if isinstance(tree, dict):
      return {k: walk(v, path + (k,)) for k, v in tree.items()}
    return rand(path, tree)

  return walk(model_params(model))


def flatten(tree, prefix=()):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, prefix + (str(k),)))
    return out
  return {"/".join(prefix): tree}


def assert_trees_equal(a, b, **tol):
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert np.asarray(fa[k]).shape == np.asarray(fb[k]).shape, k
    if tol:
      np.testing.assert_allclose(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32),
                                 err_msg=k, **tol)
    else:
      np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def load_quiet(path, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return load_hf(path, **kw)


def tiny_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 128)}}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return tok


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {},
    {"tie_word_embeddings": False},
    {"attention_bias": True},
    {"attention_bias": True, "tie_word_embeddings": False, "sliding_window": 7},
    {"sliding_window": 5, "head_dim": 32},
    {"rope_scaling": LLAMA3, "rope_theta": 5e5},
])
@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_round_trip_exact(tmp_path, kw, max_shard_bytes):
  cfg = tiny_config(**kw)
  params = random_params(cfg)
  out = save_hf(tmp_path / "ck", cfg, params, max_shard_bytes=max_shard_bytes)
  assert out == str(tmp_path / "ck")
  files = sorted(os.listdir(out))
  if max_shard_bytes is None:
    assert "model.safetensors" in files and hf._INDEX_FILE not in files
  else:
    index = json.load(open(os.path.join(out, hf._INDEX_FILE)))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == [f for f in files if f.startswith("model-")]
    assert set(index["weight_map"]) == {s.hf_name for s in hf.tensor_specs(cfg)}
    assert index["metadata"]["total_size"] == sum(
        sum(v.nbytes for v in load_file(os.path.join(out, s)).values()) for s in shards)
  cfg2, params2, tok = load_quiet(out)
  assert cfg2 == cfg
  assert tok is None
  assert_trees_equal(params2, params)
  hf_cfg = json.load(open(os.path.join(out, "config.json")))
  expected_type = "qwen2" if cfg.attention_bias else ("mistral" if cfg.sliding_window else "llama")
  assert hf_cfg["model_type"] == expected_type
  gen = json.load(open(os.path.join(out, "generation_config.json")))
  assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2


def test_round_trip_bfloat16(tmp_path):
  cfg = tiny_config(tie_word_embeddings=False, attention_bias=True)
  params = random_params(cfg)
  save_hf(tmp_path / "ck", cfg, params, dtype="bfloat16", max_shard_bytes=30_000)
  assert json.load(open(tmp_path / "ck" / "config.json"))["torch_dtype"] == "bfloat16"
  _, loaded, _ = load_quiet(tmp_path / "ck")
  rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in flatten(params).items()}
  for k, v in flatten(loaded).items():
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, rounded[k], err_msg=k)
  assert_trees_equal(loaded, params, rtol=1e-2, atol=1e-2)
  _, native, _ = load_quiet(tmp_path / "ck", dtype=None)
  assert all(v.dtype == ml_dtypes.bfloat16 for v in flatten(native).values())


@pytest.mark.parametrize("save_dtype,load_dtype", [("float32", "float32"),
                                                   ("bfloat16", "float32"),
                                                   ("bfloat16", None)])
def test_transposed_tensors_read_in_row_blocks_equal_the_whole_read(tmp_path, monkeypatch,
                                                                    save_dtype, load_dtype):
  """Large transposed tensors (the kernels and the head) are read in row blocks straight into
  their transposed array (one copy in memory); the values are those of the whole read."""
  cfg = tiny_config(tie_word_embeddings=False)
  save_hf(tmp_path / "ck", cfg, random_params(cfg), dtype=save_dtype)
  _, whole, _ = load_quiet(tmp_path / "ck", dtype=load_dtype)
  monkeypatch.setattr(hf, "_TRANSPOSE_CHUNK_BYTES", 1000)  # every kernel in several row blocks
  _, blocks, _ = load_quiet(tmp_path / "ck", dtype=load_dtype)
  _, lazy, _ = load_quiet(tmp_path / "ck", dtype=load_dtype, lazy=True)
  assert_trees_equal(blocks, whole)
  assert_trees_equal(materialize(lazy), whole)
  for v in flatten(blocks).values():
    assert v.dtype == (ml_dtypes.bfloat16 if load_dtype is None else np.float32)
    assert v.flags.c_contiguous


def test_save_accepts_module_and_string_keys(tmp_path):
  cfg = tiny_config()
  model = Llama(cfg, rngs=nnx.Rngs(3))
  save_hf(tmp_path / "a", cfg, model)
  params = model_params(model)  # layer keys as strings, as from JSON/orbax metadata
  params = {**params, "layers": {str(k): v for k, v in params["layers"].items()}}
  save_hf(tmp_path / "b", cfg, params)
  _, pa, _ = load_quiet(tmp_path / "a")
  _, pb, _ = load_quiet(tmp_path / "b")
  assert_trees_equal(pa, pb)
  assert_trees_equal(pa, model_params(model))


def test_compressed_leaves_are_materialized(tmp_path):
  cfg = tiny_config()
  params = random_params(cfg)
  rng = np.random.default_rng(1)
  codes = jnp.asarray(rng.integers(0, 16, (64, 64)), jnp.uint8)
  scale = jnp.asarray(rng.uniform(0.01, 0.02, (2, 64)), jnp.float32)
  zero = jnp.asarray(rng.uniform(-0.1, 0.0, (2, 64)), jnp.float32)
  qa = formats.QuantizedArray.from_codes(codes, scale, zero, bits=4, group_size=32, symmetric=False)
  params["layers"][1]["attn"]["q_proj"]["kernel"] = qa
  save_hf(tmp_path / "ck", cfg, params)
  _, loaded, _ = load_quiet(tmp_path / "ck")
  np.testing.assert_array_equal(loaded["layers"][1]["attn"]["q_proj"]["kernel"],
                                np.asarray(qa.materialize()))


def test_tokenizer_round_trip(tmp_path):
  cfg = tiny_config()
  tok = tiny_tokenizer()
  save_hf(tmp_path / "ck", cfg, random_params(cfg), tok)
  tc = json.load(open(tmp_path / "ck" / "tokenizer_config.json"))
  assert tc["bos_token"] == "<s>" and tc["eos_token"] == "</s>"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, _, tok2 = load_hf(tmp_path / "ck")
  assert tok2.encode("t5 t7 </s>").ids == tok.encode("t5 t7 </s>").ids == [5, 7, 2]


def test_missing_tokenizer_warns(tmp_path):
  cfg = tiny_config()
  save_hf(tmp_path / "ck", cfg, random_params(cfg))
  with pytest.warns(UserWarning, match="no tokenizer.json"):
    assert load_hf(tmp_path / "ck")[2] is None


def test_load_model_from_hf_dir(tmp_path):
  cfg = tiny_config(tie_word_embeddings=False)
  params = random_params(cfg)
  save_hf(tmp_path / "ck", cfg, params, tiny_tokenizer())
  model, tok = load_model(str(tmp_path / "ck"))
  assert tok is not None
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(model(tokens)),
                                np.asarray(build_model(cfg, params)(tokens)))


# ------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------


def _siblings(tmp_path):
  return sorted(os.listdir(tmp_path))


def test_refuses_non_empty_dir_and_overwrites_on_request(tmp_path):
  cfg = tiny_config()
  target = tmp_path / "ck"
  target.mkdir()
  (target / "keep.txt").write_text("old")
  with pytest.raises(FileExistsError, match="non-empty directory"):
    save_hf(target, cfg, random_params(cfg))
  assert os.listdir(target) == ["keep.txt"]
  save_hf(target, cfg, random_params(cfg, seed=1), overwrite=True)
  assert "keep.txt" not in os.listdir(target)
  assert_trees_equal(load_quiet(target)[1], random_params(cfg, seed=1))
  assert _siblings(tmp_path) == ["ck"]  # no temporary or backup directories left


def test_empty_dir_is_reused_and_file_refused(tmp_path):
  cfg = tiny_config()
  (tmp_path / "empty").mkdir()
  save_hf(tmp_path / "empty", cfg, random_params(cfg))
  assert "config.json" in os.listdir(tmp_path / "empty")
  (tmp_path / "afile").write_text("x")
  with pytest.raises(FileExistsError, match="not a directory"):
    save_hf(tmp_path / "afile", cfg, random_params(cfg))


class _ExplodingTokenizer:

  def save(self, path):
    with open(path, "w") as f:
      f.write("{")
    raise RuntimeError("disk full")


def test_error_leaves_nothing_behind(tmp_path):
  cfg = tiny_config()
  with pytest.raises(RuntimeError, match="disk full"):
    save_hf(tmp_path / "ck", cfg, random_params(cfg), _ExplodingTokenizer(), max_shard_bytes=40_000)
  assert _siblings(tmp_path) == []


def test_error_during_overwrite_keeps_old_contents(tmp_path):
  cfg = tiny_config()
  save_hf(tmp_path / "ck", cfg, random_params(cfg))
  before = {n: (tmp_path / "ck" / n).read_bytes() for n in os.listdir(tmp_path / "ck")}
  with pytest.raises(RuntimeError, match="disk full"):
    save_hf(tmp_path / "ck", cfg, random_params(cfg, seed=5), _ExplodingTokenizer(), overwrite=True)
  assert {n: (tmp_path / "ck" / n).read_bytes() for n in os.listdir(tmp_path / "ck")} == before
  assert _siblings(tmp_path) == ["ck"]


def test_save_validates_params_before_writing(tmp_path):
  cfg = tiny_config()
  params = random_params(cfg)
  params["layers"][0]["mlp"]["up_proj"]["kernel"] = np.zeros((96, 64), np.float32)
  with pytest.raises(ValueError, match=r"layers/0/mlp/up_proj/kernel.*\(96, 64\).*\(64, 96\)"):
    save_hf(tmp_path / "ck", cfg, params)
  params = random_params(cfg)
  params["lm_head"] = {"kernel": np.zeros((64, 128), np.float32)}  # tied config: nowhere to go
  with pytest.raises(ValueError, match="lm_head/kernel"):
    save_hf(tmp_path / "ck", cfg, params)
  params = random_params(cfg)
  del params["layers"][1]["attn"]["k_proj"]
  with pytest.raises(ValueError, match="layers/1/attn/k_proj/kernel.*missing"):
    save_hf(tmp_path / "ck", cfg, params)
  with pytest.raises(ValueError, match="dtype"):
    save_hf(tmp_path / "ck", cfg, random_params(cfg), dtype="int8")
  assert _siblings(tmp_path) == []


# ------------------------------------------------------------------------------------------
# Loading errors
# ------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
  cfg = tiny_config(tie_word_embeddings=False)
  path = save_hf(tmp_path / "ck", cfg, random_params(cfg))
  return cfg, path


def _edit_config(path, **changes):
  p = os.path.join(path, "config.json")
  c = json.load(open(p))
  c.update(changes)
  json.dump(c, open(p, "w"))


def test_error_missing_dir_and_config(tmp_path, saved):
  with pytest.raises(FileNotFoundError, match="nope.*no such directory"):
    load_hf(tmp_path / "nope")
  _, path = saved
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(FileNotFoundError, match=f"{path}.*config.json not found"):
    load_hf(path)


def test_error_unsupported_model_type(saved):
  _, path = saved
  _edit_config(path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
  msg = r"config.json.*'gpt2'.*GPT2LMHeadModel.*supported model types.*llama"
  with pytest.raises(ValueError, match=msg):
    load_hf(path)
  _edit_config(path, model_type="llama", architectures=["LlamaForSequenceClassification"])
  with pytest.raises(ValueError, match="LlamaForSequenceClassification.*LlamaForCausalLM"):
    load_hf(path)


@pytest.mark.parametrize("changes, match", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "longrope"),
])
def test_error_unsupported_features(saved, changes, match):
  _, path = saved
  _edit_config(path, **changes)
  with pytest.raises(ValueError, match=match):
    load_hf(path)


def test_error_no_safetensors(saved):
  _, path = saved
  os.remove(os.path.join(path, "model.safetensors"))
  open(os.path.join(path, "pytorch_model.bin"), "wb").close()
  msg = f"{path}.*no safetensors.*model.safetensors.*pytorch_model.bin"
  with pytest.raises(FileNotFoundError, match=msg):
    load_hf(path)


def test_error_missing_tensor(saved):
  _, path = saved
  f = os.path.join(path, "model.safetensors")
  tensors = load_file(f)
  del tensors["model.layers.1.mlp.down_proj.weight"]
  save_file(tensors, f)
  msg = r"'model.layers.1.mlp.down_proj.weight' is missing from .*model.safetensors"
  with pytest.raises(ValueError, match=msg):
    load_hf(path)


def test_error_missing_tensor_in_shard_and_missing_shard(tmp_path):
  cfg = tiny_config()
  path = save_hf(tmp_path / "ck", cfg, random_params(cfg), max_shard_bytes=40_000)
  index = json.load(open(os.path.join(path, hf._INDEX_FILE)))
  name = "model.layers.0.self_attn.v_proj.weight"
  shard = os.path.join(path, index["weight_map"][name])
  tensors = load_file(shard)
  del tensors[name]
  save_file(tensors, shard)
  with pytest.raises(ValueError, match=f"'{name}' is missing from '{shard}'"):
    load_hf(path)
  os.remove(shard)
  with pytest.raises(FileNotFoundError, match=f"shard '{os.path.basename(shard)}'.*not found"):
    load_hf(path)


def test_error_shape_mismatch(saved):
  _, path = saved
  f = os.path.join(path, "model.safetensors")
  tensors = load_file(f)
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
  save_file(tensors, f)
  msg = r"'model.layers.0.self_attn.k_proj.weight'.*shape \(64, 64\), expected \(32, 64\)"
  with pytest.raises(ValueError, match=msg):
    load_hf(path)


def test_error_unexpected_tensor(saved):
  _, path = saved
  f = os.path.join(path, "model.safetensors")
  tensors = load_file(f)
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros((64,), np.float32)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((8,), np.float32)  # ignored
  save_file(tensors, f)
  msg = r"unexpected tensor\(s\) \['model.layers.0.self_attn.o_proj.bias'\]"
  with pytest.raises(ValueError, match=msg):
    load_hf(path)


def test_tied_checkpoint_ignores_lm_head(saved):
  cfg, path = saved
  _edit_config(path, tie_word_embeddings=True)
  cfg2, params, _ = load_quiet(path)
  assert cfg2.tie_word_embeddings and "lm_head" not in params


# ------------------------------------------------------------------------------------------
# config.json mapping
# ------------------------------------------------------------------------------------------


def _hf_llama(**kw):
  c = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128,
       "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
  c.update(kw)
  return c


def test_config_from_hf_variants():
  c = hf.config_from_hf(_hf_llama())
  assert (c.num_kv_heads, c.head_dim, c.rope_theta, c.rope_scaling, c.rms_norm_eps) == (
      4, 16, 1e4, None, 1e-6)
  legacy = hf.config_from_hf(
      _hf_llama(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
  new = hf.config_from_hf(
      _hf_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}))
  assert legacy == new
  assert new.rope_theta == 5e5 and new.rope_scaling == {"rope_type": "linear", "factor": 2.0}
  assert hf.config_from_hf(_hf_llama(eos_token_id=[7, 8])).eos_token_id == 7
  # Llama has no sliding window; Mistral does; Qwen2 only with use_sliding_window.
  assert hf.config_from_hf(_hf_llama(sliding_window=4)).sliding_window is None
  assert hf.config_from_hf(_hf_llama(model_type="mistral", sliding_window=4)).sliding_window == 4
  q = _hf_llama(model_type="qwen2", architectures=["Qwen2ForCausalLM"], sliding_window=4)
  assert hf.config_from_hf(q).attention_bias
  assert hf.config_from_hf(q).sliding_window is None
  windowed = {**q, "use_sliding_window": True}
  assert hf.config_from_hf({**windowed, "max_window_layers": 0}).sliding_window == 4
  assert hf.config_from_hf({**windowed, "max_window_layers": 2}).sliding_window is None
  with pytest.raises(ValueError, match="some layers only"):
    hf.config_from_hf({**windowed, "max_window_layers": 1})
  with pytest.raises(ValueError, match=r"required field\(s\) \['hidden_size'\]"):
    hf.config_from_hf({k: v for k, v in _hf_llama().items() if k != "hidden_size"})


@pytest.mark.parametrize("kw", [{}, {"attention_bias": True, "sliding_window": 9},
                                {"sliding_window": 3}, {"rope_scaling": YARN},
                                {"rope_scaling": LINEAR, "tie_word_embeddings": False}])
def test_config_to_hf_round_trip(kw):
  cfg = tiny_config(**kw)
  assert hf.config_from_hf(json.loads(json.dumps(hf.config_to_hf(cfg)))) == cfg


def test_tie_inferred_from_weights_when_config_is_silent(saved):
  _, path = saved
  c = json.load(open(os.path.join(path, "config.json")))
  del c["tie_word_embeddings"]
  json.dump(c, open(os.path.join(path, "config.json"), "w"))
  assert not load_quiet(path)[0].tie_word_embeddings  # lm_head.weight is present


# ------------------------------------------------------------------------------------------
# GGUF Q/K permutation
# ------------------------------------------------------------------------------------------


def llama_cpp_permute(w, n_head):
  """``convert_hf_to_gguf.py`` ``LlamaModel.permute``."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("n_head, head_dim, extra", [(4, 16, (24,)), (2, 8, ()), (3, 64, (5,))])
def test_unpermute_qk_inverts_llama_cpp_permute(n_head, head_dim, extra):
  w = np.random.default_rng(0).standard_normal((n_head * head_dim, *extra)).astype(np.float32)
  p = llama_cpp_permute(w, n_head)
  assert not np.array_equal(p, w)
  np.testing.assert_array_equal(unpermute_qk(p, n_head), w)
  np.testing.assert_array_equal(llama_cpp_permute(unpermute_qk(w, n_head), n_head), w)


def test_permute_maps_rotate_half_rope_to_interleaved_rope():
  """What the permutation is for: interleaved RoPE on permuted rows == rotate_half RoPE."""
  n_head, hd = 2, 8
  rng = np.random.default_rng(0)
  q = rng.standard_normal((n_head * hd,))
  theta = rng.uniform(0, 3, (hd // 2,))
  c, s = np.cos(theta), np.sin(theta)

  def rope_half(x):  # Hugging Face / ours, per head
    x = x.reshape(n_head, hd)
    a, b = x[:, :hd // 2], x[:, hd // 2:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1).reshape(-1)

  def rope_interleaved(x):  # llama.cpp / GPT-J, per head
    x = x.reshape(n_head, hd // 2, 2)
    a, b = x[..., 0], x[..., 1]
    return np.stack([a * c - b * s, b * c + a * s], axis=-1).reshape(-1)

  np.testing.assert_allclose(rope_interleaved(llama_cpp_permute(q, n_head)),
                             llama_cpp_permute(rope_half(q), n_head), rtol=1e-12)
  np.testing.assert_allclose(unpermute_qk(rope_interleaved(llama_cpp_permute(q, n_head)), n_head),
                             rope_half(q), rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Parity with transformers (PyTorch, CPU)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_mod():
  torch = require("torch")  # fail, never skip: CI installs torch and transformers
  transformers = require("transformers")
  transformers.utils.logging.disable_progress_bar()
  transformers.utils.logging.set_verbosity_error()
  return torch, transformers


YARN_CUSTOM = {**YARN, "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3}


@pytest.mark.parametrize("rope", [LINEAR, LLAMA3, YARN, YARN_CUSTOM])
def test_rope_inv_freq_matches_transformers(transformers_mod, rope):
  torch, transformers = transformers_mod
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  cfg = tiny_config(rope_scaling=rope, rope_theta=5e5)
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf.config_to_hf(cfg).items()
                                       if k not in ("architectures", "model_type")})
  inv, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, torch.device("cpu"))
  ours, our_scaling = rope_inv_freq(cfg)
  np.testing.assert_allclose(np.asarray(ours), inv.numpy(), rtol=1e-6, atol=0)
  assert our_scaling == pytest.approx(scaling, rel=1e-7)


PARITY_CASES = {
    "llama-tied": {},
    "llama-untied-llama3": {"tie_word_embeddings": False, "rope_scaling": LLAMA3,
                            "rope_theta": 5e5},
    "llama-linear": {"rope_scaling": LINEAR},
    "llama-yarn": {"rope_scaling": YARN},
    "qwen2-bias": {"attention_bias": True, "tie_word_embeddings": False, "num_kv_heads": 1},
    "mistral-window": {"sliding_window": 6, "head_dim": 32},
}


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_logits_match_transformers(tmp_path, transformers_mod, name):
  torch, transformers = transformers_mod
  cfg = tiny_config(**PARITY_CASES[name])
  params = random_params(cfg)
  path = save_hf(tmp_path / "ck", cfg, params)
  ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  expected_cls = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(
      name.split("-")[0], "LlamaForCausalLM")
  assert type(ref).__name__ == expected_cls
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 20))
  with torch.inference_mode():
    want = ref(torch.as_tensor(tokens)).logits.numpy()
  got = np.asarray(build_model(cfg, params)(jnp.asarray(tokens, jnp.int32)))
  assert np.abs(want).max() > 0.5  # the comparison is not trivially about zeros
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # and the directory transformers read loads back to the same model
  cfg2, params2, _ = load_quiet(path)
  assert cfg2 == cfg
  assert_trees_equal(params2, params)


# --------------------------------------------------------------------------------------------
# Files stay inside the model directory; damaged files are named.
# --------------------------------------------------------------------------------------------


def _sharded(tmp_path):
  cfg = tiny_config()
  path = save_hf(tmp_path / "ck", cfg, random_params(cfg), max_shard_bytes=40_000)
  index_path = os.path.join(path, hf._INDEX_FILE)
  return path, index_path, json.load(open(index_path))


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_index_naming_a_file_outside_the_directory_is_refused(tmp_path, where):
  path, index_path, index = _sharded(tmp_path)
  name = "model.layers.0.self_attn.v_proj.weight"
  shard = os.path.join(path, index["weight_map"][name])
  outside = tmp_path / "elsewhere.safetensors"
  os.replace(shard, outside)
  moved = {n for n, f in index["weight_map"].items() if f == index["weight_map"][name]}
  if where in ("absolute", "dotdot"):
    for n in moved:
      index["weight_map"][n] = str(outside) if where == "absolute" else "../elsewhere.safetensors"
  else:
    os.symlink(outside, shard)
  json.dump(index, open(index_path, "w"))
  with pytest.raises(ValueError, match=r"(elsewhere|model-0000).*outside the directory"):
    load_quiet(path)


def test_symlinked_files_leaving_the_directory_are_refused(tmp_path, saved):
  _, path = saved
  for name in ("config.json", "model.safetensors"):
    target = tmp_path / f"outside-{name}"
    os.replace(os.path.join(path, name), target)
    os.symlink(target, os.path.join(path, name))
    with pytest.raises(ValueError, match=f"'{name}' resolves to .*outside-{name}.*outside"):
      load_quiet(path)
    if name == "config.json":
      from compressjax.io import resolve_model_path
      with pytest.raises(ValueError, match="'config.json' resolves to .*outside"):
        resolve_model_path(path)
    os.remove(os.path.join(path, name))
    os.replace(target, os.path.join(path, name))
  # A link that stays inside, and a directory reached through a link, are fine.
  os.replace(os.path.join(path, "model.safetensors"), os.path.join(path, "weights.bin.real"))
  os.symlink("weights.bin.real", os.path.join(path, "model.safetensors"))
  os.symlink(path, tmp_path / "alias")
  load_quiet(str(tmp_path / "alias"))


def test_corrupt_safetensors_header_names_the_file(saved):
  _, path = saved
  f = os.path.join(path, "model.safetensors")
  with open(f, "r+b") as fh:
    fh.write(b"\xff" * 16)
  with pytest.raises(ValueError, match=f"'{f}' is corrupt or not a safetensors file"):
    load_quiet(path)


def test_truncated_safetensors_names_the_file(saved):
  _, path = saved
  f = os.path.join(path, "model.safetensors")
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)
  with pytest.raises(ValueError, match=f"'{f}'.*(corrupt|truncated)"):
    load_quiet(path)


def test_lazy_load_reads_each_tensor_on_demand(tmp_path, monkeypatch):
  from compressjax.blocks import LazyTensor, materialize
  from compressjax.io import open_model
  cfg = tiny_config(tie_word_embeddings=False, attention_bias=True)
  params = random_params(cfg)
  out = save_hf(tmp_path / "ck", cfg, params, dtype="bfloat16", max_shard_bytes=30_000)
  reads = []
  real = hf._read_tensor
  monkeypatch.setattr(hf, "_read_tensor", lambda f, s, *a: reads.append(s.hf_name) or real(f, s, *a))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    cfg2, lazy, _ = open_model(out)
    _, eager, _ = load_hf(out)
  assert cfg2 == cfg
  reads.clear()
  flat_lazy, flat_eager = flatten(lazy), flatten(eager)
  assert flat_lazy.keys() == flat_eager.keys()
  for k, v in flat_lazy.items():
    assert isinstance(v, LazyTensor) and v.shape == flat_eager[k].shape
    assert v.dtype == np.float32
  assert reads == []  # shapes and dtypes come from the headers
  k = flat_lazy["layers/0/mlp/down_proj/kernel"]
  np.testing.assert_array_equal(k.load(), flat_eager["layers/0/mlp/down_proj/kernel"])
  assert reads == ["model.layers.0.mlp.down_proj.weight"]
  assert_trees_equal(jax.tree.map(np.asarray, materialize(lazy)), eager)
