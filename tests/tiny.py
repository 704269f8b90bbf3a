"""Tiny models, tokenizers, GGUF files and corpora for fast tests (no big downloads)."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from compressjax.io import model_params
from compressjax.model import Llama, LlamaConfig

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256,
            bos_token_id=256, eos_token_id=257)


def tiny_config(**overrides) -> LlamaConfig:
  return LlamaConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Llama:
  model = Llama(tiny_config(**overrides), rngs=nnx.Rngs(seed))
  # Non-trivial norm scales so that norm handling is exercised too.
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "scale":
      v = var.get_value()
      var.set_value(jax.numpy.asarray(1.0 + 0.1 * rng.standard_normal(v.shape), v.dtype))
  return model


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable unicode map (the byte-level BPE alphabet)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def tiny_vocab(vocab_size: int) -> tuple[list[str], list[str], list[int]]:
  """Byte alphabet + 2 control tokens + a few merges, padded to ``vocab_size``."""
  alphabet = list(bytes_to_unicode().values())
  tokens = alphabet + ["<|endoftext|>", "<|im_start|>"]
  types = [1] * 256 + [3, 3]
  merges = []
  sp = bytes_to_unicode()[ord(" ")]
  for a, b in [(sp, "t"), ("h", "e"), (sp + "t", "he"), ("i", "n"), (sp, "a"), ("e", "r"),
               ("o", "n"), (sp, "s"), ("r", "e"), ("a", "n")]:
    merges.append(f"{a} {b}")
    tokens.append(a + b)
    types.append(1)
  i = 0
  while len(tokens) < vocab_size:
    tokens.append(f"<unused{i}>")
    types.append(5)
    i += 1
  return tokens[:vocab_size], merges, types[:vocab_size]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's ``LlamaModel.permute`` (HF rotate_half rows -> interleaved rows)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str, model: Llama) -> str:
  """Writes ``model`` as a llama.cpp GGUF (F32 tensors, Q/K permuted as llama.cpp does)."""
  import gguf  # pylint: disable=g-import-not-at-top

  cfg = model.cfg
  p = jax.tree.map(np.asarray, model_params(model))
  w = gguf.GGUFWriter(path, arch="llama")
  w.add_name("tiny")
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_rope_dimension_count(cfg.head_dim)
  tokens, merges, types = tiny_vocab(cfg.vocab_size)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_bos_token_id(cfg.bos_token_id)
  w.add_eos_token_id(cfg.eos_token_id)
  f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
  w.add_tensor("token_embd.weight", f32(p["embed"]["embedding"]))
  for i in range(cfg.num_layers):
    L = p["layers"][i]
    b = f"blk.{i}."
    w.add_tensor(b + "attn_norm.weight", f32(L["attn_norm"]["scale"]))
    w.add_tensor(b + "attn_q.weight", f32(permute_qk(L["attn"]["q_proj"]["kernel"].T, cfg.num_heads)))
    w.add_tensor(b + "attn_k.weight", f32(permute_qk(L["attn"]["k_proj"]["kernel"].T, cfg.num_kv_heads)))
    w.add_tensor(b + "attn_v.weight", f32(L["attn"]["v_proj"]["kernel"].T))
    w.add_tensor(b + "attn_output.weight", f32(L["attn"]["o_proj"]["kernel"].T))
    w.add_tensor(b + "ffn_norm.weight", f32(L["mlp_norm"]["scale"]))
    for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
      w.add_tensor(b + theirs + ".weight", f32(L["mlp"][ours]["kernel"].T))
  w.add_tensor("output_norm.weight", f32(p["norm"]["scale"]))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


WORDS = ("the quick brown fox jumps over the lazy dog while the rain in spain stays mainly in the "
         "plain and then another sentence about nothing in particular ").split()


def write_tiny_corpora(root: str, words_per_file: int = 3000, seed: int = 0) -> str:
  """A directory laid out like ``../shared/data`` with small random-word files."""
  rng = np.random.default_rng(seed)
  names = ["wiki/enwiki_sample.txt"] + [f"austen/{n}.txt" for n in (
      "pride_and_prejudice", "emma", "mansfield_park", "northanger_abbey", "persuasion",
      "sense_and_sensibility")]
  for name in names:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(" ".join(rng.choice(WORDS, size=words_per_file)))
  return root


def engine_split_and_whole(transform, mesh, *, seed: int = 2) -> dict[bool, dict]:
  """``calibration.run_sequential`` of ``transform`` on a one-block tiny model over ``mesh``
  with the solvers split (``True``) and whole (``False``, ``shard_solvers=False``), on the same
  windows: ``{split: {path: compressed leaf}}`` (for the mesh-solver tests' subprocesses)."""
  from compressjax import calibration, formats  # pylint: disable=g-import-not-at-top
  from compressjax.transforms.selection import leaves_with_paths  # pylint: disable=g-import-not-at-top
  model = tiny_model(seed=seed, num_layers=1)
  w = np.random.default_rng(0).integers(0, 300, (8, 16)).astype(np.int32)
  res = {}
  for on in (True, False):
    out, _ = calibration.run_sequential(model, w, transform, batch_size=8, progress=False,
                                        mesh=mesh, shard_solvers=on)
    res[on] = {p: v for p, v in leaves_with_paths(out) if isinstance(v, formats.CompressedArray)}
  return res
