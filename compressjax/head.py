"""An untied, compressible LM head for models whose head is the token embedding.

A tied model (``tie_word_embeddings=True``, SmolLM2, Llama-3.2-1B, ...) computes its logits as
``h @ E.T`` with the embedding ``E``: at batch-1 decode on CPU that product reads the whole
``(vocab, hidden)`` float32 table per token (113 MB on SmolLM2-135M), the largest cost outside the
decoder linears once those are compressed. Quantizing ``E`` itself would make the embedding
*lookup* approximate too. :func:`untie_head` instead gives the model its own head
``lm_head/kernel = E.T`` (``(hidden, vocab)``, the ``(K, N)`` layout of every linear) and sets
``tie_word_embeddings=False``; the embedding stays dense and exact, and the head is an ordinary
linear kernel that the normal quantizers compress when a selector names it::

    cfg, params = head.untie_head(cfg, params)
    params, _ = T.apply(T.select((LINEAR_KERNELS, T.rtn(4, 64)),
                                 ("lm_head/kernel", T.rtn(4, 64))), params)
    model = build_model(cfg, params)     # the head is a QuantizedArray: formats.dot, CPU kernel

Before compression the untied model computes the same logits as the tied one (``h @ E.T``
either way; at one row the float32 summation order may differ, as it does between the two
forms of ``Llama.logits``).

Accounting. The untied head is a *new tensor*, stored in addition to the embedding (which stays
dense). :func:`compressjax.accounting.size_report` counts it under ``other_*`` (it is not a decoder
linear), so the ``bits_per_param`` of result records (decoder linears over their parameter count)
is unchanged and stays comparable with tied rows, while ``model_bytes`` / ``other_bytes`` grow by
the head's stored bytes (4-bit g64 on SmolLM2-135M: ``49152 * 576 * 4.25 / 8`` = 15.0 MB on top of
the 113 MB float32 embedding); :func:`compressjax.pipeline.run_compress` records them as
``lm_head_bytes``. The config change is part of the checkpoint (``model_config`` metadata), so a
saved untied model restores untied.

Exports: ``compressjax.io.save_hf`` writes ``lm_head.weight`` (materialized) and
``tie_word_embeddings: false``; compressed-tensors writes the quantized head like any other
``Linear``; GGUF writes ``output.weight`` in the exact ggml type of the leaf (a 4-bit g32/g64
symmetric head is ``Q4_0``, 8-bit ``Q8_0``; other grids are refused unless
``materialize_other``); the GPTQ export refuses a quantized head (GPTQ checkpoints keep
``lm_head`` dense).

References:
  llama.cpp ``convert_hf_to_gguf.py`` / ``llama-quant.cpp``: a tied model's ``output.weight``
  is the token embedding and is quantized (Q6_K / Q8_0 for ``output``) while the lookup table
  keeps its own type; Press & Wolf, "Using the Output Embedding to Improve Language Models",
  arXiv:1608.05859 (weight tying).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from compressjax.formats import CompressedArray
from compressjax.model import LlamaConfig

__all__ = ["HEAD_PATH", "untie_head"]

#: Parameter path of the untied head (``(hidden, vocab)``, ``y = h @ kernel``).
HEAD_PATH = "lm_head/kernel"


def _transposed(e: Any, where: str) -> Any:
  from compressjax.blocks import LazyTensor  # pylint: disable=g-import-not-at-top

  if isinstance(e, CompressedArray):
    raise ValueError(f"{where}: parameter 'embed/embedding' is a compressed "
                     f"{type(e).__name__}; untie the head before compressing the embedding "
                     "(the head is built from the dense table)")
  if isinstance(e, LazyTensor):  # read (and transposed) only when the head is loaded
    return LazyTensor(e.shape[::-1], e.dtype, lambda: np.ascontiguousarray(e.load().T),
                      name=f"{HEAD_PATH} (= {e.name or 'embed/embedding'} transposed)")
  if isinstance(e, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(e.shape)[::-1], e.dtype)
  if isinstance(e, np.ndarray):
    return np.ascontiguousarray(e.T)
  if isinstance(e, jax.Array):
    return e.T
  raise ValueError(f"{where}: parameter 'embed/embedding' must be an array, a LazyTensor or a "
                   f"ShapeDtypeStruct, got {type(e).__name__}")


def untie_head(cfg: LlamaConfig, params: dict[str, Any]) -> tuple[LlamaConfig, dict[str, Any]]:
  """Gives a tied-embedding model its own LM head ``lm_head/kernel = E.T``.

  Args:
    cfg: the model config; must have ``tie_word_embeddings=True``.
    params: the model's parameters as a nested dict (``compressjax.io.model_params(model)``, or
      the lazy tree of ``compressjax.io.open_model``; leaves may be arrays, ``LazyTensor`` s or
      ``jax.ShapeDtypeStruct`` s). Not modified.

  Returns:
    ``(new_cfg, new_params)``: ``cfg`` with ``tie_word_embeddings=False`` and a shallow copy of
    ``params`` with ``lm_head/kernel`` of shape ``(hidden, vocab)`` (a lazy leaf stays lazy and
    is transposed when read). Compress it with any quantizer by selecting ``"lm_head/kernel"``.

  Raises:
    ValueError: ``cfg`` is already untied, ``params`` already holds an ``lm_head``, has no
      dense ``embed/embedding`` of shape ``(vocab_size, hidden_size)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
    ...                   num_heads=4, num_kv_heads=2)
    >>> cfg2, p2 = untie_head(cfg, {"embed": {"embedding": jnp.ones((64, 32))}})
    >>> cfg2.tie_word_embeddings, p2["lm_head"]["kernel"].shape
    (False, (32, 64))
  """
  where = "untie_head"
  if not isinstance(cfg, LlamaConfig):
    raise ValueError(f"{where}: cfg must be a LlamaConfig, got {type(cfg).__name__}")
  if not cfg.tie_word_embeddings:
    raise ValueError(f"{where}: the model config has tie_word_embeddings=False: it already has "
                     f"its own head ({HEAD_PATH!r}); select that path to compress it")
  if not isinstance(params, dict):
    raise ValueError(f"{where}: params must be a nested dict of parameters (e.g. "
                     f"compressjax.io.model_params(model)), got {type(params).__name__}")
  if params.get("lm_head") is not None:
    raise ValueError(f"{where}: params already hold 'lm_head' although the config is tied")
  e = params.get("embed", {}).get("embedding") if isinstance(params.get("embed"), dict) else None
  if e is None:
    raise ValueError(f"{where}: params have no 'embed/embedding' (got top-level keys "
                     f"{sorted(params)})")
  want = (cfg.vocab_size, cfg.hidden_size)
  if tuple(e.shape) != want:
    raise ValueError(f"{where}: parameter 'embed/embedding' has shape {tuple(e.shape)}, expected "
                     f"{want} (vocab_size, hidden_size)")
  new = dict(params)
  new["lm_head"] = {"kernel": _transposed(e, where)}
  return dataclasses.replace(cfg, tie_word_embeddings=False), new
