"""Read and write Hugging Face checkpoint directories (``config.json`` + safetensors).

:func:`load_hf` reads Llama-family checkpoints (``model_type`` ``llama``, ``mistral``, ``qwen2``;
SmolLM checkpoints are ``llama``) into the parameter layout of :mod:`compressjax.model`, and
:func:`save_hf` writes that layout back as a directory that ``transformers``
``AutoModelForCausalLM.from_pretrained`` loads. Hugging Face linear weights are ``(out, in)``; ours
are ``(in, out)``, so every linear weight is transposed on the way in and out. Both directions
share one table of tensor names (:func:`tensor_specs`), so they cannot drift apart.

The export is **dense**: compressed leaves (anything with a ``materialize`` method, e.g. a
:class:`compressjax.formats.QuantizedArray`) are materialized to ``dtype`` before writing, so the
files hold the weights the compressed model really computes with, at dense size.

Only ``numpy``, ``safetensors`` and ``tokenizers`` are needed; ``transformers`` and ``torch`` are
not imported.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from compressjax.io.loading import confined_path
from compressjax.model import LlamaConfig

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TensorSpec",
    "config_from_hf",
    "config_to_hf",
    "load_hf",
    "save_hf",
    "tensor_specs",
]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
# Tensors that some checkpoints carry but that hold no weights of ours.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Defaults of the ``transformers`` config classes for fields a config.json may omit.
_HF_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
}


class TensorSpec(NamedTuple):
  """One checkpoint tensor.

  Attributes:
    hf_name: name in the safetensors files, e.g. ``model.layers.0.self_attn.q_proj.weight``.
    path: key path in our nested parameter dict, e.g. ``("layers", 0, "attn", "q_proj", "kernel")``.
    hf_shape: shape in the Hugging Face file.
    transpose: whether our array is the transpose of the file's (linear weights).
  """

  hf_name: str
  path: tuple[Any, ...]
  hf_shape: tuple[int, ...]
  transpose: bool


def tensor_specs(cfg: LlamaConfig) -> list[TensorSpec]:
  """The Hugging Face tensors of ``cfg``'s model, in checkpoint order."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
  specs = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding"), (cfg.vocab_size, d),
                      False)]

  def layer(i, name, path, shape, transpose):
    specs.append(TensorSpec(f"model.layers.{i}.{name}", ("layers", i) + path, shape, transpose))

  for i in range(cfg.num_layers):
    add = functools.partial(layer, i)
    add("input_layernorm.weight", ("attn_norm", "scale"), (d,), False)
    for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
      add(f"self_attn.{name}.weight", ("attn", name, "kernel"), (out, d), True)
      if cfg.attention_bias:
        add(f"self_attn.{name}.bias", ("attn", name, "bias"), (out,), False)
    add("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), (d, q_out), True)
    add("post_attention_layernorm.weight", ("mlp_norm", "scale"), (d,), False)
    add("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (f, d), True)
    add("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (f, d), True)
    add("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (d, f), True)
  specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), (d,), False))
  if not cfg.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (cfg.vocab_size, d), True))
  return specs


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def _first_id(v):
  if isinstance(v, (list, tuple)):
    return int(v[0]) if v else None
  return None if v is None else int(v)


def _rope_from_hf(hf: Mapping[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
  """``(rope_theta, rope_scaling)`` from either ``rope_parameters`` (transformers >= 5) or the
  legacy ``rope_theta`` + ``rope_scaling`` fields."""
  params = hf.get("rope_parameters")
  if params is not None and not isinstance(params, Mapping):
    raise ValueError(f"{where}: rope_parameters must be a dict, got {params!r}")
  if params is not None and params and all(isinstance(v, Mapping) for v in params.values()):
    raise ValueError(
        f"{where}: per-layer-type rope_parameters ({sorted(params)}) are not supported")
  legacy = hf.get("rope_scaling")
  src = dict(params) if params else (dict(legacy) if legacy else {})
  theta = hf.get("rope_theta", src.get("rope_theta"))
  theta = 10000.0 if theta is None else float(theta)
  src.pop("rope_theta", None)
  rtype = src.pop("rope_type", None) or src.pop("type", None) or "default"
  src.pop("type", None)
  if float(src.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
  if rtype == "default":
    return theta, None
  return theta, {"rope_type": rtype, **src}


def _sliding_window_from_hf(hf: Mapping[str, Any], model_type: str, where: str) -> int | None:
  window = hf.get("sliding_window")
  if model_type == "llama" or window is None:
    return None
  if model_type == "qwen2":
    if not hf.get("use_sliding_window", False):
      return None
    n = int(hf["num_hidden_layers"])
    kinds = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else "full_attention"
        for i in range(n)]
    if all(k == "full_attention" for k in kinds):
      return None
    if not all(k == "sliding_attention" for k in kinds):
      raise ValueError(
          f"{where}: a sliding window on some layers only (layer_types/max_window_layers) is not "
          "supported; every layer must use the same attention")
  return int(window)


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> LlamaConfig:
  """Maps a Hugging Face ``config.json`` dict to :class:`LlamaConfig`.

  Args:
    hf: the parsed ``config.json``.
    where: the file it came from, quoted in error messages.

  Raises:
    ValueError: for an unsupported ``model_type``/architecture or feature (biases other than
      Qwen2's q/k/v biases, an activation other than SiLU, per-layer sliding windows, a
      quantized checkpoint, a RoPE variant :func:`compressjax.model.rope_inv_freq` lacks).
  """
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
        f"{where}: model_type {model_type!r} (architectures {archs}) is not supported; supported "
        f"model types: {SUPPORTED_MODEL_TYPES} (architectures {tuple(_ARCHITECTURES.values())})")
  bad_archs = [a for a in archs if a not in _ARCHITECTURES.values()]
  if bad_archs:
    raise ValueError(f"{where}: architecture(s) {bad_archs} not supported; supported "
                     f"architectures: {tuple(_ARCHITECTURES.values())}")
  if hf.get("quantization_config"):
    method = hf["quantization_config"].get("quant_method")
    raise ValueError(f"{where}: quantized checkpoints ({method!r}) are not supported; export a "
                     "dense (float16/bfloat16/float32) checkpoint")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
  if hf.get("mlp_bias", False):
    raise ValueError(f"{where}: mlp_bias=true is not supported")
  if model_type == "qwen2":
    attention_bias = True  # Qwen2 always has q/k/v biases (and none on o_proj).
  else:
    attention_bias = False
    if hf.get("attention_bias", False):
      raise ValueError(f"{where}: attention_bias=true for model_type {model_type!r} (biases on "
                       "q/k/v *and* o_proj) is not supported; only Qwen2-style q/k/v biases are")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if hf.get(k) is None]
  if missing:
    raise ValueError(f"{where}: required field(s) {missing} missing")
  defaults = _HF_DEFAULTS[model_type]
  theta, scaling = _rope_from_hf(hf, where)
  n_heads = int(hf["num_attention_heads"])
  try:
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=n_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=None if hf.get("head_dim") is None else int(hf["head_dim"]),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(
            hf.get("max_position_embeddings", defaults["max_position_embeddings"])),
        attention_bias=attention_bias,
        sliding_window=_sliding_window_from_hf(hf, model_type, where),
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
    )
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def config_to_hf(cfg: LlamaConfig, dtype: str = "float32") -> dict[str, Any]:
  """The Hugging Face ``config.json`` dict of ``cfg``.

  ``model_type`` is ``qwen2`` when ``cfg.attention_bias`` (q/k/v biases), else ``mistral`` when
  ``cfg.sliding_window`` is set (plain Llama has no sliding window), else ``llama``. RoPE is
  written both as ``rope_parameters`` (transformers >= 5) and as the legacy ``rope_theta`` +
  ``rope_scaling`` pair (older readers).
  """
  if cfg.attention_bias:
    model_type = "qwen2"
  elif cfg.sliding_window is not None:
    model_type = "mistral"
  else:
    model_type = "llama"
  scaling = None
  if cfg.rope_type != "default":
    scaling = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
    scaling["rope_type"] = cfg.rope_type
  hf = {
      "architectures": [_ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": scaling,
      "rope_parameters": {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta,
                          **(scaling or {})},
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": cfg.eos_token_id,
      "torch_dtype": dtype,
      "dtype": dtype,
  }
  if model_type == "llama":
    hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  elif model_type == "mistral":
    hf.update(sliding_window=cfg.sliding_window)
  else:
    sw = cfg.sliding_window
    kind = "sliding_attention" if sw is not None else "full_attention"
    hf.update(use_sliding_window=sw is not None, sliding_window=sw,
              max_window_layers=0 if sw is not None else cfg.num_layers,
              layer_types=[kind] * cfg.num_layers)
  return hf


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path!r}: not valid JSON ({e})") from e


def _inside(path: str, name: str) -> str:
  return confined_path(path, name, what="HF checkpoint")


def _safe_open(fpath: str):
  """``safetensors.safe_open``; a damaged file is a ``ValueError`` naming it."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  try:
    return safe_open(fpath, framework="np")
  except Exception as e:  # SafetensorError, OSError, ... on a damaged header
    raise ValueError(f"safetensors file {fpath!r} is corrupt or not a safetensors file "
                     f"({type(e).__name__}: {e})") from e


def _weight_map(path: str) -> tuple[dict[str, str], str]:
  """``({tensor name: file}, description of where names come from)``."""
  index = os.path.join(path, _INDEX_FILE)
  single = os.path.join(path, _SINGLE_FILE)
  if os.path.lexists(index):
    index = _inside(path, _INDEX_FILE)
  if os.path.isfile(index):
    wm = _read_json(index).get("weight_map")
    if not isinstance(wm, dict):
      raise ValueError(f"{index!r}: expected a 'weight_map' dict of tensor name -> shard file")
    out = {}
    for name, fname in wm.items():
      if not isinstance(fname, str) or not fname:
        raise ValueError(f"{index!r}: shard of tensor {name!r} is {fname!r}, expected a file name")
      try:
        fpath = _inside(path, fname)
      except ValueError as e:
        raise ValueError(f"{index!r}: shard {fname!r} (holding tensor {name!r}) is refused: "
                         f"{e}") from e
      if not os.path.isfile(fpath):
        raise FileNotFoundError(
            f"{index!r}: shard {fname!r} (holding tensor {name!r}) not found in {path!r}")
      out[name] = fpath
    return out, index
  if os.path.isfile(single):
    single = _inside(path, _SINGLE_FILE)
    with _safe_open(single) as f:
      return {name: single for name in f.keys()}, single
  weight_exts = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".safetensors")
  others = sorted(n for n in os.listdir(path) if n.endswith(weight_exts))
  hint = f" (found {others}; convert them to safetensors)" if others else ""
  raise FileNotFoundError(
      f"HF checkpoint {path!r}: no safetensors weights: expected {_SINGLE_FILE!r} or "
      f"{_INDEX_FILE!r} with its shards{hint}")


def load_hf(path: str, *, dtype: Any = "float32",
            lazy: bool = False) -> tuple[LlamaConfig, dict[str, Any], Any]:
  """Reads a Hugging Face checkpoint directory into ``(config, params, tokenizer)``.

  Args:
    path: directory with ``config.json``, ``model.safetensors`` (or
      ``model.safetensors.index.json`` and its shards) and optionally ``tokenizer.json``.
    dtype: numpy dtype (or name) of the returned arrays; ``None`` keeps each tensor's stored
      dtype (``bfloat16`` arrives as an ``ml_dtypes.bfloat16`` numpy array).
    lazy: return :class:`compressjax.blocks.LazyTensor` leaves: every tensor's name, shape and
      dtype are checked now (from the safetensors headers, no data read); its data is read
      from the memory-mapped file, cast and transposed only when its ``load()`` is called.

  Returns:
    ``(cfg, params, tokenizer)``: ``params`` is a nested dict of numpy arrays in the layout of
    :mod:`compressjax.model` (kernels ``(in, out)``, layer keys ints), as :func:`load_gguf`
    returns; ``tokenizer`` is a ``tokenizers.Tokenizer`` or ``None`` (with a warning) when the
    directory has no ``tokenizer.json``.

  Raises:
    FileNotFoundError: missing directory, ``config.json``, safetensors files or shards.
    ValueError: unsupported model, a missing or unexpected tensor, a shape mismatch, a corrupt
      or truncated safetensors file, or a file that lies outside ``path`` (an index naming an
      absolute path or ``..``, a symbolic link pointing elsewhere); the message names the
      tensor and the file.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"HF checkpoint {path!r}: no such directory")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"HF checkpoint {path!r}: config.json not found (expected a Hugging "
                            "Face checkpoint directory with config.json and *.safetensors)")
  cfg_path = _inside(path, "config.json")
  hf_cfg = _read_json(cfg_path)
  wmap, source = _weight_map(path)
  if "tie_word_embeddings" not in hf_cfg:  # class defaults differ across versions: ask the weights
    hf_cfg = {**hf_cfg, "tie_word_embeddings": "lm_head.weight" not in wmap}
  cfg = config_from_hf(hf_cfg, cfg_path)
  specs = tensor_specs(cfg)

  expected = {s.hf_name for s in specs}
  ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
  unexpected = sorted(n for n in wmap if n not in expected and n not in ignorable
                      and not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise ValueError(f"HF checkpoint {path!r}: unexpected tensor(s) {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''} in {source!r}; the model "
                     f"(model_type {hf_cfg.get('model_type')!r}) has no such parameters")

  by_file: dict[str, list[TensorSpec]] = {}
  for s in specs:
    if s.hf_name not in wmap:
      raise ValueError(f"HF checkpoint {path!r}: tensor {s.hf_name!r} is missing from {source!r}")
    by_file.setdefault(wmap[s.hf_name], []).append(s)

  from compressjax.blocks import LazyTensor  # pylint: disable=g-import-not-at-top

  np_dtype = None if dtype is None else _np_dtype(dtype)
  params: dict[str, Any] = {}
  for fpath, fspecs in by_file.items():
    with _safe_open(fpath) as f:
      keys = set(f.keys())
      for s in fspecs:
        if s.hf_name not in keys:
          raise ValueError(
              f"HF checkpoint {path!r}: tensor {s.hf_name!r} is missing from {fpath!r}")
        if lazy:
          sl = f.get_slice(s.hf_name)
          shape, stored = tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype())
          if stored is None:
            raise ValueError(f"safetensors file {fpath!r}: tensor {s.hf_name!r} has dtype "
                             f"{sl.get_dtype()!r}, which compressjax cannot read")
          _check_shape(path, fpath, s, shape)
          w = LazyTensor(shape[::-1] if s.transpose else shape,
                         stored if np_dtype is None else np_dtype,
                         _reader(fpath, s, np_dtype), name=s.hf_name)
        else:
          w = _read_tensor(fpath, s, np_dtype, f, path)
        _set(params, s.path, w)
  return cfg, params, _load_tokenizer(path)


_SAFETENSORS_DTYPES = {"F64": np.dtype("float64"), "F32": np.dtype("float32"),
                       "F16": np.dtype("float16"), "BF16": np.dtype(ml_dtypes.bfloat16),
                       "I64": np.dtype("int64"), "I32": np.dtype("int32"),
                       "I16": np.dtype("int16"), "I8": np.dtype("int8"),
                       "U8": np.dtype("uint8"), "BOOL": np.dtype("bool")}


def _check_shape(path: str, fpath: str, s: TensorSpec, shape: tuple) -> None:
  if tuple(shape) != s.hf_shape:
    raise ValueError(f"HF checkpoint {path!r}: tensor {s.hf_name!r} in {fpath!r} has shape "
                     f"{tuple(shape)}, expected {s.hf_shape} from config.json")


def _reader(fpath: str, s: TensorSpec, np_dtype):
  return lambda: _read_tensor(fpath, s, np_dtype)


def _read_tensor(fpath: str, s: TensorSpec, np_dtype, f=None, path: str | None = None):
  """One tensor of a safetensors file, checked, cast to ``np_dtype`` and transposed."""
  if f is None:
    with _safe_open(fpath) as g:
      return _decode_tensor(g, fpath, s, np_dtype, path)
  return _decode_tensor(f, fpath, s, np_dtype, path)


#: A transposed tensor larger than this is read in row blocks of about this many bytes,
#: written straight into its transposed array (one copy of the tensor in memory, not two).
_TRANSPOSE_CHUNK_BYTES = 64 << 20


def _decode_tensor(f, fpath: str, s: TensorSpec, np_dtype, path: str | None):
  def damaged(e):
    return ValueError(f"safetensors file {fpath!r}: tensor {s.hf_name!r} cannot be read, "
                      f"the file is truncated or corrupt ({type(e).__name__}: {e})")

  try:
    sl = f.get_slice(s.hf_name)
    shape = tuple(sl.get_shape())
  except Exception as e:  # a damaged header entry
    raise damaged(e) from e
  _check_shape(path or os.path.dirname(fpath), fpath, s, shape)
  stored = _SAFETENSORS_DTYPES.get(sl.get_dtype())
  dtype = np_dtype if np_dtype is not None else stored
  if (s.transpose and len(shape) == 2 and stored is not None and
      shape[0] * shape[1] * max(stored.itemsize, dtype.itemsize) > _TRANSPOSE_CHUNK_BYTES):
    out = np.empty(shape[::-1], dtype)
    step = max(1, _TRANSPOSE_CHUNK_BYTES // max(1, shape[1] * stored.itemsize))
    try:
      for a in range(0, shape[0], step):
        e = min(a + step, shape[0])  # safetensors slices do not clip
        out[:, a:e] = sl[a:e].T  # cast on assignment when the dtypes differ
    except Exception as e:  # a truncated or damaged data section
      raise damaged(e) from e
    return out
  try:
    w = f.get_tensor(s.hf_name)
  except Exception as e:  # a truncated or damaged data section
    raise damaged(e) from e
  if np_dtype is not None and w.dtype != np_dtype:
    w = w.astype(np_dtype)
  if s.transpose:
    w = np.ascontiguousarray(w.T)
  return w


def _load_tokenizer(path: str):
  tok_path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tok_path):
    warnings.warn(f"HF checkpoint {path!r}: no tokenizer.json; returning tokenizer=None",
                  stacklevel=3)
    return None
  tok_path = _inside(path, "tokenizer.json")
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  try:
    return Tokenizer.from_file(tok_path)
  except Exception as e:  # tokenizers raises a bare Exception on a damaged file
    raise ValueError(f"HF checkpoint {path!r}: tokenizer file {tok_path!r} cannot be read "
                     f"({type(e).__name__}: {e})") from e


def _np_dtype(dtype: Any) -> np.dtype:
  if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype({"fp32": "float32", "fp16": "float16"}.get(dtype, dtype))


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _get(tree: Any, path: tuple, where: str):
  node = tree
  for k in path:
    if hasattr(node, "get_value") and not isinstance(node, Mapping):  # nnx.Variable
      node = node.get_value()
    if not isinstance(node, Mapping):
      raise ValueError(
          f"{where}: parameter {'/'.join(map(str, path))!r} missing (hit a leaf at {k!r})")
    if k in node:
      node = node[k]
    elif str(k) in node:
      node = node[str(k)]
    else:
      raise ValueError(f"{where}: parameter {'/'.join(map(str, path))!r} is missing from params")
  if hasattr(node, "get_value") and not hasattr(node, "materialize"):
    node = node.get_value()
  return node


def _leaf_paths(tree: Any, prefix: tuple = ()) -> Iterator[tuple]:
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _leaf_paths(v, prefix + (k,))
  elif tree is not None:
    yield prefix


def _dense(leaf: Any, np_dtype: np.dtype) -> np.ndarray:
  if hasattr(leaf, "materialize"):  # a compressed leaf: export its dense equivalent
    leaf = leaf.materialize()
  elif hasattr(leaf, "load") and hasattr(leaf, "shape"):  # a LazyTensor: read (or made) now
    leaf = leaf.load()
  arr = np.asarray(leaf)
  return arr if arr.dtype == np_dtype else arr.astype(np_dtype)


def _plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int | None):
  if max_shard_bytes is None:
    return [specs]
  shards, cur, size = [], [], 0
  for s in specs:
    n = int(np.prod(s.hf_shape)) * itemsize
    if cur and size + n > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(s)
    size += n
  if cur:
    shards.append(cur)
  return shards


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")


def _write_tokenizer(tmp: str, cfg: LlamaConfig, tokenizer) -> None:
  if hasattr(tokenizer, "save_pretrained"):  # a transformers tokenizer
    tokenizer.save_pretrained(tmp)
    return
  tokenizer.save(os.path.join(tmp, "tokenizer.json"))

  def token(i):
    return None if i is None else tokenizer.id_to_token(i)

  _write_json(os.path.join(tmp, "tokenizer_config.json"), {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": token(cfg.bos_token_id),
      "eos_token": token(cfg.eos_token_id),
      "model_max_length": cfg.max_position_embeddings,
      "add_bos_token": False,
      "clean_up_tokenization_spaces": False,
  })


def _params_tree(params: Any) -> Any:
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if isinstance(params, nnx.Module):
    return nnx.to_pure_dict(nnx.state(params, nnx.Param))
  if isinstance(params, nnx.State):
    return nnx.to_pure_dict(params)
  return params


def save_hf(path: str, cfg: LlamaConfig, params: Any, tokenizer: Any = None, *,
            dtype: str = "float32", max_shard_bytes: int | None = None,
            overwrite: bool = False) -> str:
  """Writes ``params`` as a Hugging Face checkpoint directory, atomically.

  The export is dense: compressed leaves are materialized (see the module docstring). Files:
  ``config.json`` (``LlamaForCausalLM``; ``Qwen2ForCausalLM`` when ``cfg.attention_bias``;
  ``MistralForCausalLM`` for a sliding window), ``generation_config.json``, ``model.safetensors``
  (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` when
  ``max_shard_bytes`` splits the weights into more than one shard, as ``transformers`` does), and
  ``tokenizer.json`` + ``tokenizer_config.json`` when a tokenizer is given.

  Everything is written into a temporary sibling directory that is renamed to ``path`` only once
  complete, so an error leaves nothing new at ``path`` (an overwritten directory keeps its old
  contents).

  Args:
    path: the output directory.
    cfg: the model config.
    params: nested dict in the :mod:`compressjax.model` layout (numpy/jax arrays, compressed
      leaves or :class:`compressjax.blocks.LazyTensor` s, each read only when its shard is
      written; layer keys ints or digit strings), an ``nnx.State`` or a :class:`Llama` module.
      With ``LazyTensor`` leaves and ``max_shard_bytes`` only one shard is held at a time.
    tokenizer: ``tokenizers.Tokenizer``, a ``transformers`` tokenizer, or ``None``.
    dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: dtype of the stored weights.
    max_shard_bytes: split the weights into shards of at most this many bytes (a tensor larger
      than that gets a shard of its own); ``None`` writes one file.
    overwrite: replace an existing non-empty directory at ``path``.

  Returns:
    ``path``.

  Raises:
    FileExistsError: ``path`` is a file, or a non-empty directory and ``overwrite`` is false.
    ValueError: a parameter is missing, has the wrong shape, or is not part of the model.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(
        f"save_hf: dtype {dtype!r} not supported; expected float32, bfloat16 or float16")
  if max_shard_bytes is not None and max_shard_bytes <= 0:
    raise ValueError(f"save_hf: max_shard_bytes must be positive, got {max_shard_bytes}")
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path):
    if not os.path.isdir(path) or os.path.islink(path):
      raise FileExistsError(f"save_hf: {path!r} exists and is not a directory")
    if os.listdir(path) and not overwrite:
      raise FileExistsError(
          f"save_hf: {path!r} is a non-empty directory; pass overwrite=True to replace it")

  tree = _params_tree(params)
  specs = tensor_specs(cfg)
  where = f"save_hf({path!r})"
  expected_paths = {tuple(str(k) for k in s.path) for s in specs}
  extra = sorted("/".join(map(str, p)) for p in _leaf_paths(tree)
                 if tuple(str(k) for k in p) not in expected_paths)
  if extra:
    raise ValueError(f"{where}: params hold {extra[:8]} which a {config_to_hf(cfg)['model_type']} "
                     "checkpoint of this config cannot store (tie_word_embeddings/attention_bias?)")
  for s in specs:  # check shapes before writing anything
    leaf = _get(tree, s.path, where)
    shape = tuple(leaf.shape)
    want = s.hf_shape[::-1] if s.transpose else s.hf_shape
    if shape != want:
      raise ValueError(f"{where}: parameter {'/'.join(map(str, s.path))!r} has shape {shape}, "
                       f"expected {want}")

  np_dtype = _np_dtype(dtype)

  def write(tmp):
    shards = _plan_shards(specs, np_dtype.itemsize, max_shard_bytes)
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
      fname = _SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      tensors = {}
      for s in shard:
        w = _dense(_get(tree, s.path, where), np_dtype)
        tensors[s.hf_name] = np.ascontiguousarray(w.T if s.transpose else w)
        total += tensors[s.hf_name].nbytes
        weight_map[s.hf_name] = fname
      save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
      del tensors
    if n > 1:
      _write_json(os.path.join(tmp, _INDEX_FILE), {"metadata": {"total_size": total},
                                                   "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), config_to_hf(cfg, dtype))
    gen = {"_from_model_config": True}
    if cfg.bos_token_id is not None:
      gen["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id is not None:
      gen["eos_token_id"] = cfg.eos_token_id
    _write_json(os.path.join(tmp, "generation_config.json"), gen)
    if tokenizer is not None:
      _write_tokenizer(tmp, cfg, tokenizer)

  return atomic_dir(path, write)


def atomic_dir(path: str, write) -> str:
  """Runs ``write(tmp)`` into a temporary sibling of ``path``, then renames it to ``path``.

  An existing directory at ``path`` is moved aside first and deleted only after the rename; on
  any failure the temporary directory is removed and the old one put back.
  """
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  backup = None
  try:
    write(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    if os.path.isdir(path):
      if os.listdir(path):
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rmdir(backup)
        os.rename(path, backup)
      else:
        os.rmdir(path)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if backup is not None and not os.path.exists(path):
      os.rename(backup, path)
      backup = None
    raise
  if backup is not None:
    shutil.rmtree(backup, ignore_errors=True)
  return path
