"""Export to and import from the packed-integer checkpoints serving engines load.

:func:`export_compressed_tensors` writes a Hugging Face checkpoint directory in the
compressed-tensors ``pack-quantized`` format (what vLLM and llm-compressor use; transformers
loads it with the ``compressed-tensors`` package), :func:`export_gptq` one in the GPTQ format
(``qweight``/``qzeros``/``scales``/``g_idx``, ``checkpoint_format`` ``"gptq"``, the v1 layout
transformers/optimum/GPTQModel read). :func:`load_compressed_tensors` and :func:`load_gptq`
read them back into :class:`~compressjax.formats.QuantizedArray` leaves exactly (no
re-quantization): import then export writes the same tensors byte for byte.

Decoder linears must be :class:`QuantizedArray` leaves whose zero points are integers (see
:mod:`compressjax.io.qformats_core`): symmetric RTN/GPTQ/AWQ results always are; asymmetric ones
(``zero = min``) go through :func:`snap_zero_points` first. GPTQ act-order results are stored in
the original row order with contiguous groups, so they export with the trivial ``g_idx`` and
``desc_act: false``. Other leaves are dense tensors (embeddings, norms, ``lm_head``, or a linear
left dense). Any other compressed leaf (sparse, low-rank, codebooks, bilevel SpQR statistics)
has no equivalent in these formats and raises a ``ValueError`` naming its path and the formats
that would work. compressed-tensors 0.20 has dropped its 2:4 sparse format (``Sparse24``), so
:class:`~compressjax.formats.NMSparse` leaves are refused too.

The files are written like :func:`compressjax.io.save_hf`'s: into a temporary sibling directory
renamed to ``path`` when complete.

References:
  compressed-tensors 0.20.0 (``ModelCompressor.update_config``, ``QuantizationConfig``,
  ``PackedQuantizationCompressor``); transformers ``CompressedTensorsHfQuantizer`` and
  ``GptqHfQuantizer``; GPTQModel 7.7.0 ``QuantizeConfig`` (``quantize_config.json``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from compressjax.formats.base import CompressedArray
from compressjax.formats.quantized import QUANTIZED_BITS, QuantizedArray
from compressjax.io import hf
from compressjax.io import qformats_core as core
from compressjax.io.qformats_core import snap_zero_points
from compressjax.model import LlamaConfig

__all__ = ["CT_VERSION", "export_checkpoint", "export_compressed_tensors", "export_gptq",
           "load_compressed_tensors", "load_gptq", "snap_tree", "snap_zero_points"]

#: The compressed-tensors version written into ``quantization_config.version``.
CT_VERSION = "0.20.0"
_OTHER_FORMATS = ("dense save_hf (materialized)", "compressjax.checkpoint (every format)",
                  "GGUF (llama.cpp types, where one matches)")


def _path_str(path) -> str:
  return "/".join(map(str, path))


def snap_tree(params: Any) -> Any:
  """:func:`snap_zero_points` applied to every asymmetric :class:`QuantizedArray` leaf."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.tree.map(lambda x: snap_zero_points(x) if isinstance(x, QuantizedArray) else x,
                      hf._params_tree(params), is_leaf=lambda x: isinstance(x, QuantizedArray))


def _leaf_for_export(leaf: Any, path, fmt: str) -> Any:
  """``leaf`` if the format stores it (``QuantizedArray`` or dense), else a clear error."""
  if isinstance(leaf, QuantizedArray):
    if isinstance(leaf.scale, CompressedArray) or isinstance(leaf.zero, CompressedArray):
      raise ValueError(
          f"{fmt} export: parameter {_path_str(path)!r} is a QuantizedArray with compressed "
          f"scale/zero (SpQR bilevel statistics), which {fmt} cannot store; formats that can: "
          f"{', '.join(_OTHER_FORMATS)}")
    return leaf
  if isinstance(leaf, CompressedArray) or hasattr(leaf, "materialize"):
    extra = (" (compressed-tensors >= 0.15 dropped its 2:4 'Sparse24' format)"
             if type(leaf).__name__ == "NMSparse" else "")
    raise ValueError(
        f"{fmt} export: parameter {_path_str(path)!r} is a {type(leaf).__name__}, which has no "
        f"{fmt} equivalent{extra}; {fmt} stores QuantizedArray (integer zero points) or dense "
        f"tensors. Formats that can store it: {', '.join(_OTHER_FORMATS)}")
  return leaf


def _scheme(qa: QuantizedArray) -> tuple:
  return (qa.bits, None if qa.group_size == qa.shape[0] else qa.group_size, qa.symmetric)


def _module_name(spec: hf.TensorSpec) -> str:
  return spec.hf_name[:-len(".weight")]


def _check_dir(path: str, overwrite: bool, fn: str) -> str:
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path):
    if not os.path.isdir(path) or os.path.islink(path):
      raise FileExistsError(f"{fn}: {path!r} exists and is not a directory")
    if os.listdir(path) and not overwrite:
      raise FileExistsError(f"{fn}: {path!r} is a non-empty directory; pass overwrite=True")
  return path


def _atomic_dir(path: str, write) -> str:
  """Runs ``write(tmp)`` into a temporary sibling of ``path``, then renames it to ``path``."""
  return hf.atomic_dir(path, write)


def _collect(cfg: LlamaConfig, params: Any, fmt: str, where: str):
  """``[(spec, leaf)]`` in checkpoint order, shapes checked, unsupported leaves refused."""
  tree = hf._params_tree(params)
  specs = hf.tensor_specs(cfg)
  expected = {tuple(str(k) for k in s.path) for s in specs}
  extra = sorted(_path_str(p) for p in hf._leaf_paths(tree)
                 if tuple(str(k) for k in p) not in expected)
  if extra:
    raise ValueError(f"{where}: params hold {extra[:8]} which this config's checkpoint cannot "
                     "store (tie_word_embeddings/attention_bias?)")
  out = []
  for s in specs:
    leaf = _leaf_for_export(hf._get(tree, s.path, where), s.path, fmt)
    want = s.hf_shape[::-1] if s.transpose else s.hf_shape
    if tuple(leaf.shape) != want:
      raise ValueError(f"{where}: parameter {_path_str(s.path)!r} has shape {tuple(leaf.shape)}, "
                       f"expected {want}")
    if isinstance(leaf, QuantizedArray) and not s.transpose:
      raise ValueError(f"{where}: parameter {_path_str(s.path)!r} is quantized but is not a "
                       f"linear weight; {fmt} quantizes Linear modules only")
    out.append((s, leaf))
  return out


def _dense_tensor(s: hf.TensorSpec, leaf: Any, np_dtype) -> np.ndarray:
  w = np.asarray(leaf)
  w = w if w.dtype == np_dtype else w.astype(np_dtype)
  return np.ascontiguousarray(w.T if s.transpose else w)


def _write_common(tmp: str, cfg: LlamaConfig, tokenizer, hf_config: dict, tensors: dict) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  hf._write_json(os.path.join(tmp, "config.json"), hf_config)
  gen = {"_from_model_config": True}
  if cfg.bos_token_id is not None:
    gen["bos_token_id"] = cfg.bos_token_id
  if cfg.eos_token_id is not None:
    gen["eos_token_id"] = cfg.eos_token_id
  hf._write_json(os.path.join(tmp, "generation_config.json"), gen)
  if tokenizer is not None:
    hf._write_tokenizer(tmp, cfg, tokenizer)


def _ct_scheme_dict(scheme: tuple) -> dict[str, Any]:
  bits, group_size, symmetric = scheme
  return {
      "format": "pack-quantized",
      "input_activations": None,
      "output_activations": None,
      "targets": ["Linear"],
      "weights": {"dynamic": False, "group_size": group_size, "num_bits": bits,
                  "strategy": "channel" if group_size is None else "group",
                  "symmetric": symmetric, "type": "int"},
  }


def compressed_tensors_config(schemes: Mapping[tuple, list[str]], dense_linears: list[str]):
  """The ``quantization_config`` dict for modules grouped by ``(bits, group_size, symmetric)``.

  One scheme: ``targets: ["Linear"]`` and the dense linears in ``ignore`` (as llm-compressor
  writes it); several: one ``config_groups`` entry per scheme whose targets are the exact module
  names.
  """
  groups = {}
  for i, (scheme, names) in enumerate(sorted(schemes.items(), key=lambda kv: str(kv[0]))):
    g = _ct_scheme_dict(scheme)
    if len(schemes) > 1:
      g["targets"] = sorted(names)
    groups[f"group_{i}"] = g
  return {
      "config_groups": groups,
      "format": "pack-quantized",
      "global_compression_ratio": None,
      "ignore": sorted(dense_linears),
      "kv_cache_scheme": None,
      "moe_sparsity_config": None,
      "quant_method": "compressed-tensors",
      "quantization_status": "compressed",
      "sparsity_config": {},
      "transform_config": {},
      "version": CT_VERSION,
  }


def export_compressed_tensors(path: str, cfg: LlamaConfig, params: Any, tokenizer: Any = None, *,
                              dtype: str = "float32", overwrite: bool = False) -> str:
  """Writes ``params`` as a compressed-tensors ``pack-quantized`` checkpoint directory.

  ``QuantizedArray`` linears become ``weight_packed``/``weight_scale``/``weight_zero_point``/
  ``weight_shape`` (``group`` strategy, or ``channel`` for per-channel arrays; scales keep their
  dtype); every other tensor is written dense in ``dtype``. ``config.json`` carries the
  ``quantization_config`` (``quant_method: compressed-tensors``, ``quantization_status:
  compressed``) that transformers and vLLM read.

  Args:
    path: output directory (written atomically).
    cfg: the model config.
    params: nested dict in the :mod:`compressjax.model` layout, an ``nnx.State`` or a model.
    tokenizer: ``tokenizers.Tokenizer``, a transformers tokenizer, or ``None``.
    dtype: dtype of the dense tensors (``float32``, ``bfloat16``, ``float16``).
    overwrite: replace a non-empty directory at ``path``.

  Returns:
    ``path``.

  Raises:
    ValueError: a leaf with no compressed-tensors equivalent (named by path, with the formats
      that would store it), an asymmetric leaf whose zero is not an integer zero point, or a
      parameter of the wrong shape.
  """
  path = _check_dir(path, overwrite, "export_compressed_tensors")
  where = f"export_compressed_tensors({path!r})"
  np_dtype = hf._np_dtype(dtype)
  items = _collect(cfg, params, "compressed-tensors", where)
  tensors, schemes, dense_linears = {}, {}, []
  for s, leaf in items:
    if isinstance(leaf, QuantizedArray):
      mod = _module_name(s)
      for name, t in core.ct_pack(leaf, f"{where}: {_path_str(s.path)}").items():
        tensors[f"{mod}.{name}"] = t
      schemes.setdefault(_scheme(leaf), []).append(mod)
    else:
      if s.transpose:
        dense_linears.append(_module_name(s))
      tensors[s.hf_name] = _dense_tensor(s, leaf, np_dtype)
  if not schemes:
    raise ValueError(f"{where}: no QuantizedArray leaves to export; use "
                     "compressjax.io.save_hf for a dense checkpoint")
  hf_config = hf.config_to_hf(cfg, dtype)
  hf_config["quantization_config"] = compressed_tensors_config(schemes, dense_linears)
  return _atomic_dir(path, lambda tmp: _write_common(tmp, cfg, tokenizer, hf_config, tensors))


def _gptq_config(bits: int, group_size: int, sym: bool, checkpoint_format: str) -> dict:
  return {"bits": bits, "group_size": group_size, "desc_act": False, "sym": sym,
          "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
          "quant_method": "gptq", "checkpoint_format": checkpoint_format,
          "pack_dtype": "int32", "format": checkpoint_format,
          "meta": {"quantizer": ["compressjax"]}}


def export_gptq(path: str, cfg: LlamaConfig, params: Any, tokenizer: Any = None, *,
                dtype: str = "float16", checkpoint_format: str = "gptq",
                overwrite: bool = False) -> str:
  """Writes ``params`` as a GPTQ-format checkpoint directory (``qweight``/``qzeros``/...).

  Every decoder linear must be a :class:`QuantizedArray` with the same ``bits`` (2, 4 or 8),
  ``group_size`` and ``symmetric`` (GPTQ configs are global); ``lm_head`` and embeddings stay
  dense. ``checkpoint_format="gptq"`` (default) is the v1 layout with the historical zero-point
  minus-one offset (see :mod:`compressjax.io.qformats_core`); ``"gptq_v2"`` stores zero points
  as they are. ``config.json`` gets ``quantization_config`` (``quant_method: gptq``) and
  ``quantize_config.json`` the same dict (GPTQModel/AutoGPTQ read it). Scales keep their dtype.

  Raises:
    ValueError: as :func:`export_compressed_tensors`, plus mixed schemes, a dense decoder linear,
      a quantized ``lm_head`` (refused: GPTQ checkpoints keep the head dense), 3-bit codes or
      dimensions that do not fill whole ``int32`` words.
  """
  path = _check_dir(path, overwrite, "export_gptq")
  where = f"export_gptq({path!r})"
  np_dtype = hf._np_dtype(dtype)
  items = _collect(cfg, params, "GPTQ", where)
  tensors, schemes = {}, {}
  for s, leaf in items:
    if isinstance(leaf, QuantizedArray) and s.path[0] == "lm_head":
      raise ValueError(f"{where}: parameter 'lm_head/kernel' is quantized (an untied compressed "
                       "head, compressjax.head.untie_head); GPTQ checkpoints keep lm_head dense "
                       "(transformers/optimum do not load a quantized head). Use "
                       "export_compressed_tensors (stores the head as a quantized Linear), GGUF "
                       "(output.weight), or keep the head dense")
    if isinstance(leaf, QuantizedArray):
      mod = _module_name(s)
      for name, t in core.gptq_pack(leaf, checkpoint_format=checkpoint_format,
                                    where=f"{where}: {_path_str(s.path)}").items():
        tensors[f"{mod}.{name}"] = t
      schemes.setdefault((leaf.bits, leaf.symmetric), []).append((_path_str(s.path), leaf))
    else:
      if s.transpose and s.path[0] == "layers":
        raise ValueError(f"{where}: decoder linear {_path_str(s.path)!r} is dense; GPTQ "
                         "checkpoints quantize every decoder linear (compressed-tensors can "
                         "leave some dense via 'ignore')")
      tensors[s.hf_name] = _dense_tensor(s, leaf, np_dtype)
  # One global group_size: leaves grouped below K share it; per-channel leaves (group_size ==
  # K) fit it when K equals it or when every leaf is per-channel (group_size -1).
  grouped = {leaf.group_size for v in schemes.values() for _, leaf in v
             if leaf.group_size < leaf.shape[0]}
  group_size = grouped.pop() if len(grouped) == 1 else -1
  misfit = [p for v in schemes.values() for p, leaf in v
            if leaf.group_size != group_size and not (group_size == -1 and
                                                       leaf.group_size == leaf.shape[0])]
  if len(schemes) != 1 or grouped or misfit:
    raise ValueError(f"{where}: GPTQ needs one (bits, group_size, sym) for all linears, got "
                     f"(bits, sym) {sorted(schemes)}, group sizes "
                     f"{sorted({leaf.group_size for v in schemes.values() for _, leaf in v})} "
                     f"(first misfits {misfit[:2]}); use compressed-tensors, which allows one "
                     "scheme per module")
  (bits, sym), = schemes
  qcfg = _gptq_config(bits, group_size, sym, checkpoint_format)
  hf_config = hf.config_to_hf(cfg, dtype)
  hf_config["quantization_config"] = qcfg

  def write(tmp):
    _write_common(tmp, cfg, tokenizer, hf_config, tensors)
    hf._write_json(os.path.join(tmp, "quantize_config.json"), qcfg)

  return _atomic_dir(path, write)


def export_checkpoint(checkpoint_dir: str, out: str, *, fmt: str, dtype: str | None = None,
                      snap: bool = False, overwrite: bool = False) -> str:
  """Exports a checkpoint written by ``compressjax compress`` (``compressjax export``).

  Args:
    checkpoint_dir: a :mod:`compressjax.checkpoint` directory with ``model_config`` metadata
      (and ``tokenizer.json``, copied when present).
    out: the output directory.
    fmt: ``"compressed-tensors"``, ``"gptq"`` or ``"gguf"`` (then ``out`` is the ``.gguf`` file;
      :func:`compressjax.io.gguf.export_gguf` with the exact llama.cpp type of each leaf and
      the tokenizer metadata built from the checkpoint's ``tokenizer.json``).
    dtype: dtype of the dense tensors; ``None``: ``float32`` (compressed-tensors, GGUF) or
      ``float16`` (GPTQ).
    snap: apply :func:`snap_tree` first (lossy for asymmetric ``zero = min`` grids).
    overwrite: replace a non-empty ``out``.
  """
  from compressjax import checkpoint  # pylint: disable=g-import-not-at-top

  if fmt not in ("compressed-tensors", "gptq", "gguf"):
    raise ValueError(f"fmt must be 'compressed-tensors', 'gptq' or 'gguf', got {fmt!r}")
  params, meta = checkpoint.restore(checkpoint_dir)
  if "model_config" not in meta:
    raise checkpoint.CheckpointError(f"checkpoint path {checkpoint_dir!r}: metadata has no "
                                     "'model_config' (not written by compressjax compress)")
  cfg = LlamaConfig(**meta["model_config"])
  tok = None
  tok_path = os.path.join(checkpoint_dir, "tokenizer.json")
  if os.path.isfile(tok_path):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    tok = Tokenizer.from_file(tok_path)
  if snap:
    params = snap_tree(params)
  if fmt == "gguf":
    from compressjax.io import gguf  # pylint: disable=g-import-not-at-top

    dense = {None: "F32", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    if dtype not in dense:
      raise ValueError(f"dtype {dtype!r}: expected one of float32, float16, bfloat16 for GGUF")
    if tok is None:
      raise ValueError(f"checkpoint path {checkpoint_dir!r}: no tokenizer.json, which a GGUF "
                       "export needs for its tokenizer metadata")
    if os.path.exists(out) and not overwrite:
      raise FileExistsError(f"out {out!r} exists (pass overwrite=True / --overwrite to replace it)")
    gguf.export_gguf(params, cfg, tok, out, dense_type=dense[dtype])
    return out
  if fmt == "gptq":
    return export_gptq(out, cfg, params, tok, dtype=dtype or "float16", overwrite=overwrite)
  return export_compressed_tensors(out, cfg, params, tok, dtype=dtype or "float32",
                                   overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


def _read_dir(path: str):
  """``(hf_config, {name: np.ndarray})`` of a single-file or sharded safetensors directory."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path!r}: no such directory")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"checkpoint {path!r}: config.json not found")
  hf_cfg = hf._read_json(hf._inside(path, "config.json"))
  wmap, _ = hf._weight_map(path)
  tensors = {}
  for fpath in sorted(set(wmap.values())):
    with hf._safe_open(fpath) as f:
      for name in f.keys():
        try:
          tensors[name] = f.get_tensor(name)
        except Exception as e:  # a truncated data section
          raise ValueError(f"safetensors file {fpath!r}: tensor {name!r} cannot be read "
                           f"({type(e).__name__}: {e})") from e
  return hf_cfg, tensors


def _base_config(hf_cfg: dict, path: str, tensors: dict) -> LlamaConfig:
  plain = {k: v for k, v in hf_cfg.items() if k != "quantization_config"}
  if "tie_word_embeddings" not in plain:
    plain["tie_word_embeddings"] = "lm_head.weight" not in tensors
  return hf.config_from_hf(plain, os.path.join(path, "config.json"))


def _matches(target: str, name: str, is_linear: bool) -> bool:
  if target == "Linear":
    return is_linear
  if target.startswith("re:"):
    return re.match(target[3:], name) is not None
  return target == name


def _load(path: str, fmt: str, dtype, build_leaf):
  hf_cfg, tensors = _read_dir(path)
  cfg = _base_config(hf_cfg, path, tensors)
  params: dict[str, Any] = {}
  used = set()
  np_dtype = None if dtype is None else hf._np_dtype(dtype)
  for s in hf.tensor_specs(cfg):
    mod = _module_name(s) if s.hf_name.endswith(".weight") else s.hf_name
    leaf = build_leaf(s, mod, tensors, used) if s.transpose else None
    if leaf is None:
      if s.hf_name not in tensors:
        raise ValueError(f"{fmt} checkpoint {path!r}: tensor {s.hf_name!r} is missing")
      used.add(s.hf_name)
      w = tensors[s.hf_name]
      hf._check_shape(path, path, s, tuple(w.shape))
      if np_dtype is not None and w.dtype != np_dtype:
        w = w.astype(np_dtype)
      leaf = np.ascontiguousarray(w.T) if s.transpose else w
    else:
      want = s.hf_shape[::-1]
      if leaf.shape != want:
        raise ValueError(f"{fmt} checkpoint {path!r}: module {mod!r} decodes to shape "
                         f"{leaf.shape}, expected {want} from config.json")
    hf._set(params, s.path, leaf)
  ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
  unused = sorted(n for n in tensors if n not in used and n not in ignorable
                  and not n.endswith(hf._IGNORED_SUFFIXES))
  if unused:
    raise ValueError(f"{fmt} checkpoint {path!r}: tensors {unused[:8]} belong to no parameter "
                     "of the model (an unsupported quantization of that module?)")
  return cfg, params, hf._load_tokenizer(path) if os.path.isfile(
      os.path.join(path, "tokenizer.json")) else None


def load_compressed_tensors(path: str, *, dtype: Any = "float32"):
  """Reads a compressed-tensors ``pack-quantized`` checkpoint into ``QuantizedArray`` leaves.

  Integer weight schemes (``type: int``, ``group``/``channel`` strategy, symmetric or not,
  1..8 bits of which 2, 3, 4, 8 are supported) become :class:`QuantizedArray` leaves decoding
  exactly ``scale * (q - zero_point)``; unquantized tensors are read dense (cast to ``dtype``;
  ``None`` keeps the stored dtype, as :func:`compressjax.io.load_hf`).

  Returns:
    ``(cfg, params, tokenizer)`` as :func:`compressjax.io.load_hf`.

  Raises:
    ValueError: a format other than ``pack-quantized`` (or ``dense``), activation
      quantization, a ``tensor_group``/``block``/``tensor`` strategy, act-order ``weight_g_idx``,
      a float weight type, or tensors of the wrong shape; the message names the module.
  """
  path = os.fspath(path)
  qcfg_holder = {}

  def qcfg():
    if "q" not in qcfg_holder:
      c = hf._read_json(hf._inside(path, "config.json")).get("quantization_config") or {}
      if c.get("quant_method") != "compressed-tensors":
        raise ValueError(f"checkpoint {path!r}: quantization_config.quant_method is "
                         f"{c.get('quant_method')!r}, expected 'compressed-tensors'")
      if c.get("quantization_status") not in (None, "compressed"):
        raise ValueError(f"checkpoint {path!r}: quantization_status "
                         f"{c.get('quantization_status')!r}; only 'compressed' checkpoints hold "
                         "packed weights")
      qcfg_holder["q"] = c
    return qcfg_holder["q"]

  def scheme_of(mod: str):
    c = qcfg()
    if any(_matches(t, mod, True) for t in c.get("ignore") or ()):
      return None
    for gname, g in (c.get("config_groups") or {}).items():
      if any(_matches(t, mod, True) for t in g.get("targets") or ()):
        return gname, g
    return None

  def build(s, mod, tensors, used):
    q = scheme_of(mod)
    if q is None:
      return None
    gname, g = q
    where = f"compressed-tensors checkpoint {path!r}: module {mod!r} (config group {gname!r})"
    fmt = g.get("format") or qcfg().get("format")
    w = g.get("weights") or {}
    if fmt == "dense" or not w:
      return None
    if fmt != "pack-quantized":
      raise ValueError(f"{where}: format {fmt!r} is not supported; compressjax imports "
                       "'pack-quantized' (integer weights)")
    if g.get("input_activations") or g.get("output_activations"):
      raise ValueError(f"{where}: activation quantization is not supported (weight-only)")
    if w.get("type", "int") != "int" or w.get("dynamic"):
      raise ValueError(f"{where}: weights type {w.get('type')!r} / dynamic={w.get('dynamic')} "
                       "not supported; expected static int weights")
    strategy = w.get("strategy")
    if strategy not in ("group", "channel"):
      raise ValueError(f"{where}: strategy {strategy!r} not supported (group or channel)")
    if int(w.get("num_bits", 0)) not in QUANTIZED_BITS:
      raise ValueError(f"{where}: num_bits={w.get('num_bits')!r}; QuantizedArray holds "
                       f"{QUANTIZED_BITS} bits")
    g_idx = tensors.get(f"{mod}.weight_g_idx")
    if g_idx is not None:  # act-order: accepted only when it is the identity grouping
      gs = int(w.get("group_size") or g_idx.shape[0])
      if not np.array_equal(g_idx, np.arange(g_idx.shape[0]) // gs):
        raise ValueError(f"{where}: act-order weight_g_idx with non-contiguous groups is not "
                         "supported (QuantizedArray groups are contiguous)")
      used.add(f"{mod}.weight_g_idx")
    names = ["weight_packed", "weight_scale", "weight_shape"] + (
        [] if w.get("symmetric", True) else ["weight_zero_point"])
    got = {n: tensors[f"{mod}.{n}"] for n in names if f"{mod}.{n}" in tensors}
    qa = core.ct_unpack(got, bits=int(w["num_bits"]),
                        group_size=None if strategy == "channel" else int(w["group_size"]),
                        symmetric=bool(w.get("symmetric", True)),
                        dtype=np.float32 if dtype is None else hf._np_dtype(dtype), where=where)
    used.update(f"{mod}.{n}" for n in got)
    return qa

  return _load(path, "compressed-tensors", dtype, build)


def load_gptq(path: str, *, dtype: Any = "float32"):
  """Reads a GPTQ-format checkpoint (``quant_method: gptq``) into ``QuantizedArray`` leaves.

  ``checkpoint_format`` ``"gptq"`` (v1, the default when absent) or ``"gptq_v2"``; bits 2, 4, 8;
  ``g_idx`` must be the contiguous ``k // group_size`` (``desc_act`` checkpoints whose groups
  are permuted are refused). Returns ``(cfg, params, tokenizer)`` as
  :func:`load_compressed_tensors`.
  """
  path = os.fspath(path)
  c = hf._read_json(hf._inside(path, "config.json")) if os.path.isfile(
      os.path.join(path, "config.json")) else {}
  q = c.get("quantization_config") or {}
  if q and q.get("quant_method") != "gptq":
    raise ValueError(f"checkpoint {path!r}: quantization_config.quant_method is "
                     f"{q.get('quant_method')!r}, expected 'gptq'")
  fmt_name = q.get("checkpoint_format") or q.get("format") or "gptq"
  if fmt_name not in ("gptq", "gptq_v2"):
    raise ValueError(f"checkpoint {path!r}: checkpoint_format {fmt_name!r} not supported "
                     "(gptq or gptq_v2)")

  def build(s, mod, tensors, used):
    if f"{mod}.qweight" not in tensors:
      return None
    names = ("qweight", "qzeros", "scales", "g_idx")
    got = {n: tensors[f"{mod}.{n}"] for n in names if f"{mod}.{n}" in tensors}
    qa = core.gptq_unpack(got, bits=int(q.get("bits", 4)), sym=bool(q.get("sym", True)),
                          in_features=s.hf_shape[1], out_features=s.hf_shape[0],
                          checkpoint_format=fmt_name,
                          dtype=np.float32 if dtype is None else hf._np_dtype(dtype),
                          where=f"GPTQ checkpoint {path!r}: module {mod!r}")
    used.update(f"{mod}.{n}" for n in got)
    return qa

  return _load(path, "GPTQ", dtype, build)
