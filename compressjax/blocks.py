"""The model interface of the calibration engine, lazily loaded weights, and our Llama's adapter.

The engine (:func:`compressjax.calibration.run_sequential`) never needs a whole model in memory.
It asks a :class:`BlockModel` for

* ``abstract_params()``: the whole parameter tree as ``jax.ShapeDtypeStruct`` leaves (transforms
  are initialised and planned on it; no weight is read);
* ``num_blocks`` and ``block_prefix(i)``: the repeated blocks and the path prefix of block ``i``'s
  parameters (``"layers/3/"``);
* ``block_params(i)``: block ``i``'s parameters as a flat dict ``{relative path: array}``
  (``"attn/q_proj/kernel"``), read from disk only when asked for;
* ``outside_params()``: the parameters outside the blocks (embeddings, final norm, head), a flat
  dict keyed by full path;
* ``embed(outside, tokens)``: tokens ``(B, T)`` -> the first block's inputs ``(B, T, D)``;
* ``apply_block(block, x, capture)``: one block as a pure function of its flat parameter dict
  (dense or compressed leaves), jittable; when ``capture`` is a dict it receives, at trace
  time, the input of every linear layer under a capture name;
* ``linear_inputs``: ``{relative kernel path: capture name}``, which captured input feeds which
  kernel (several kernels may share one, e.g. q/k/v). Kernels are ``(in, out)``; the statistics
  of the kernel at ``prefix + path`` are those of its capture;
* optionally ``token_nll(outside, h, tokens)``, the final part (last block's outputs -> per-token
  next-token NLL), for the block-wise evaluation
  (:func:`compressjax.evaluate.perplexity_by_block`), and ``embed_params()`` /
  ``final_params()``, the outside parameters ``embed`` / ``token_nll`` read (default: all of
  them; :class:`LlamaBlocks` reads only the embedding, and only the final norm and the head).

:class:`LlamaBlocks` implements it for :class:`compressjax.model.Llama` (every loader's layout);
``tests/other_family.py`` implements it for a GPT-2-style model (LayerNorm with bias, fused QKV)
to show that nothing in the engine is Llama-specific.

Lazy weights: :class:`LazyTensor` is a leaf with a shape and dtype whose values are read when
:meth:`LazyTensor.load` is called (GGUF tensors dequantized one at a time from the memory-mapped
file, safetensors tensors read from their memory-mapped file). ``compressjax.io.open_model``
returns a parameter tree of them.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compressjax.transforms.selection import leaves_with_paths, path_str

__all__ = ["BlockModel", "LazyTensor", "LlamaBlocks", "as_block_model", "materialize", "nest",
           "to_abstract_tree", "unflatten"]


class LazyTensor:
  """A weight read on demand: ``shape``, ``dtype`` and ``load() -> np.ndarray``.

  Not a pytree node: ``jax.tree`` treats it as a leaf, so a parameter tree may hold lazy and
  loaded leaves side by side; :func:`materialize` reads them.
  """

  __slots__ = ("shape", "dtype", "name", "_load")

  def __init__(self, shape, dtype, load: Callable[[], np.ndarray], name: str = ""):
    self.shape = tuple(int(s) for s in shape)
    self.dtype = np.dtype(dtype)
    self.name = name
    self._load = load

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def load(self) -> np.ndarray:
    a = np.asarray(self._load())
    if a.shape != self.shape:
      raise ValueError(f"tensor {self.name!r}: read shape {a.shape}, expected {self.shape}")
    return a

  def __repr__(self):
    return f"LazyTensor({self.name!r}, shape={self.shape}, dtype={self.dtype})"


def _load_leaf(x, dtype):
  if isinstance(x, LazyTensor):
    x = x.load()
  if isinstance(x, np.ndarray):
    if dtype is not None and np.issubdtype(x.dtype, np.floating):
      return jnp.asarray(x, dtype=dtype)
    return jnp.asarray(x)
  return x


def materialize(tree, dtype=None):
  """``tree`` with every :class:`LazyTensor` read (and numpy leaves made jax arrays; floating
  ones cast to ``dtype`` when given)."""
  return jax.tree.map(lambda x: _load_leaf(x, dtype), tree,
                      is_leaf=lambda x: isinstance(x, LazyTensor))


def to_abstract_tree(tree):
  """The same tree with ``jax.ShapeDtypeStruct`` leaves (nothing is read)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree,
                      is_leaf=lambda x: isinstance(x, LazyTensor))


def nest(template, flat: Mapping[str, Any]):
  """The tree of ``template``'s structure whose leaf at path ``p`` is ``flat[p]``."""
  return jax.tree_util.tree_map_with_path(lambda kp, _: flat[path_str(kp)], template,
                                          is_leaf=lambda x: isinstance(x, LazyTensor))


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}`` (the inverse of a flat path dict)."""
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    *parents, last = path.split("/")
    node = tree
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = v
  return tree


def _flat(tree) -> dict[str, Any]:
  return dict(leaves_with_paths(tree))


class BlockModel(abc.ABC):
  """What the calibration engine needs from a model (see the module docstring)."""

  num_blocks: int
  linear_inputs: Mapping[str, str]

  @abc.abstractmethod
  def abstract_params(self) -> Any:
    """The whole parameter tree with ``jax.ShapeDtypeStruct`` leaves."""

  @abc.abstractmethod
  def block_prefix(self, i: int) -> str:
    """Path prefix of block ``i``'s parameters, ending in ``/``."""

  @abc.abstractmethod
  def block_params(self, i: int) -> dict[str, Any]:
    """Block ``i``'s parameters ``{path relative to the prefix: array}``."""

  @abc.abstractmethod
  def outside_params(self) -> dict[str, Any]:
    """Parameters outside the blocks ``{full path: array}``."""

  @abc.abstractmethod
  def embed(self, outside: Mapping[str, Any], tokens: jax.Array) -> jax.Array:
    """Tokens ``(B, T)`` -> first block inputs ``(B, T, D)``; jittable."""

  @abc.abstractmethod
  def apply_block(self, block: Mapping[str, Any], x: jax.Array,
                  capture: dict[str, jax.Array] | None = None) -> jax.Array:
    """One block ``(B, T, D) -> (B, T, D)``; fills ``capture`` with linear inputs; jittable."""

  def outside_params_at(self, paths: Collection[str]) -> dict[str, Any]:
    """The parameters outside the blocks at ``paths`` (full paths), read (default:
    :meth:`outside_params` filtered; a model over lazily loaded weights reads only those)."""
    return {p: v for p, v in self.outside_params().items() if p in paths}

  def embed_params(self) -> dict[str, Any]:
    """The parameters outside the blocks that :meth:`embed` reads (default: all of them)."""
    return self.outside_params()

  def final_params(self) -> dict[str, Any]:
    """The parameters outside the blocks that :meth:`token_nll` reads (default: all of them)."""
    return self.outside_params()

  def token_nll(self, outside: Mapping[str, Any], h: jax.Array, tokens: jax.Array) -> jax.Array:
    """The final part: the last block's outputs ``h`` ``(B, T, D)`` -> float32 negative
    log-likelihood ``(B, T-1)`` of each next token ``tokens[:, 1:]``; jittable. Only the
    block-wise evaluation needs it; models that do not offer it refuse."""
    raise NotImplementedError(f"{type(self).__name__} does not implement BlockModel.token_nll "
                              "(the final part), which block-wise evaluation needs")

  def with_matmul_dtype(self, matmul_dtype: str) -> "BlockModel":
    """This model with its blocks' dense matmuls in ``matmul_dtype`` with float32 accumulation
    (see :attr:`compressjax.model.LlamaConfig.matmul_dtype`); models that do not offer it
    refuse."""
    raise ValueError(f"matmul_dtype={matmul_dtype!r}: {type(self).__name__} does not offer "
                     "reduced-precision matmuls (implement BlockModel.with_matmul_dtype), use "
                     "matmul_dtype=None")


class LlamaBlocks(BlockModel):
  """:class:`BlockModel` of :class:`compressjax.model.Llama` over a parameter tree.

  ``params`` is the nested tree of :mod:`compressjax.model`'s layout; its leaves may be arrays,
  compressed leaves or :class:`LazyTensor` s (then each block is read when the engine reaches
  it and dropped after). Floating leaves are cast to ``dtype``.
  """

  def __init__(self, cfg, params, *, dtype=jnp.float32):
    from compressjax.model import Block  # pylint: disable=g-import-not-at-top

    self.cfg = cfg
    self.params = params
    self.dtype = dtype
    self.num_blocks = cfg.num_layers
    self.linear_inputs = {f"{lin}/kernel": src for lin, src in Block.LINEAR_INPUTS.items()}
    self._block_cls = Block
    self._template = None

  @classmethod
  def from_checkpoint(cls, cfg, path: str, *, dtype=jnp.float32) -> "LlamaBlocks":
    """The model of a compressjax checkpoint at ``path`` (e.g. one streamed block by block),
    read lazily: ``block_params(i)`` restores only block ``i``'s leaves, ``embed_params()`` only
    the embedding, ``final_params()`` only the final norm and the head (each checked against
    its checksum), so the whole model is never in memory."""
    return _CheckpointLlamaBlocks(cfg, path, dtype=dtype)

  @classmethod
  def from_model(cls, model) -> "LlamaBlocks":
    from compressjax.io.loading import model_params  # pylint: disable=g-import-not-at-top

    dtype = model.embed.embedding.get_value().dtype
    return cls(model.cfg, model_params(model), dtype=dtype)

  def abstract_params(self):
    return to_abstract_tree(self.params)

  def with_matmul_dtype(self, matmul_dtype):
    return LlamaBlocks(dataclasses.replace(self.cfg, matmul_dtype=matmul_dtype), self.params,
                       dtype=self.dtype)

  def block_prefix(self, i: int) -> str:
    return f"layers/{i}/"

  def block_params(self, i: int) -> dict[str, Any]:
    return _flat(materialize(self.params["layers"][i], self.dtype))

  def outside_params(self) -> dict[str, Any]:
    return self._outside(lambda p: True)

  def outside_params_at(self, paths: Collection[str]) -> dict[str, Any]:
    return self._outside(lambda p: p in paths)

  def embed_params(self) -> dict[str, Any]:
    return self._outside(lambda p: p == "embed/embedding")

  def final_params(self) -> dict[str, Any]:
    head = "embed/embedding" if self.cfg.tie_word_embeddings else "lm_head/kernel"
    return self._outside(lambda p: p in ("norm/scale", head))

  def _outside(self, keep: Callable[[str], bool]) -> dict[str, Any]:
    """The leaves outside the blocks whose full paths ``keep`` accepts, read."""
    rest = _flat({k: v for k, v in self.params.items() if k != "layers"})
    return materialize({p: v for p, v in rest.items() if keep(p)}, self.dtype)

  def embed(self, outside, tokens):
    return outside["embed/embedding"][tokens]

  def _block_module(self, block: Mapping[str, Any]):
    from compressjax.io.loading import _int_keys  # pylint: disable=g-import-not-at-top

    if self._template is None:
      abstract = nnx.eval_shape(lambda: self._block_cls(self.cfg, rngs=nnx.Rngs(0),
                                                        dtype=self.dtype))
      self._template = nnx.split(abstract)
    graphdef, template = self._template
    state = jax.tree.map(lambda v: v, template)
    nnx.replace_by_pure_dict(state, _int_keys(unflatten(block)))
    return nnx.merge(graphdef, state)

  def apply_block(self, block, x, capture=None):
    from compressjax.model import rope_cos_sin  # pylint: disable=g-import-not-at-top

    b, t, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(self.cfg, pos, t)
    out, _ = self._block_module(block)(x, cos, sin, pos, pos, None, capture)
    return out

  def token_nll(self, outside, h, tokens):
    from compressjax.evaluate import nll_of_hidden  # pylint: disable=g-import-not-at-top
    from compressjax.model import _rms_norm, head_logits  # pylint: disable=g-import-not-at-top

    hn = _rms_norm(h, outside["norm/scale"], self.cfg.rms_norm_eps)
    kernel = None if self.cfg.tie_word_embeddings else outside["lm_head/kernel"]
    return nll_of_hidden(
        lambda hc: head_logits(hc, embedding=outside.get("embed/embedding"), kernel=kernel,
                               implementation=self.cfg.matmul_implementation), hn, tokens)


class _CheckpointLlamaBlocks(LlamaBlocks):
  """:meth:`LlamaBlocks.from_checkpoint`: the tree is the checkpoint's abstract one (from its
  manifest); leaves are restored per block / outside part when asked for."""

  def __init__(self, cfg, path, *, dtype=jnp.float32):
    from compressjax import checkpoint_stream  # pylint: disable=g-import-not-at-top

    self.path = path
    super().__init__(cfg, checkpoint_stream.abstract_leaves(path), dtype=dtype)

  def _restore(self, select) -> dict[str, Any]:
    from compressjax import checkpoint  # pylint: disable=g-import-not-at-top

    tree, _ = checkpoint.restore(self.path, select=select)
    return _flat(materialize(tree, self.dtype))

  def block_params(self, i: int) -> dict[str, Any]:
    prefix = self.block_prefix(i)
    flat = self._restore(lambda p: p.startswith(prefix))
    return {p[len(prefix):]: v for p, v in flat.items()}

  def _outside(self, keep):
    return self._restore(lambda p: not p.startswith("layers/") and keep(p))

  def with_matmul_dtype(self, matmul_dtype):
    raise ValueError("a checkpoint's LlamaBlocks does not offer matmul_dtype (it evaluates the "
                     "stored model)")


def as_block_model(model) -> BlockModel:
  """``model`` if it is a :class:`BlockModel`; a :class:`LlamaBlocks` of an NNX Llama."""
  if isinstance(model, BlockModel):
    return model
  from compressjax.model import Llama  # pylint: disable=g-import-not-at-top

  if isinstance(model, Llama):
    return LlamaBlocks.from_model(model)
  raise TypeError(f"the calibration engine needs a compressjax.model.Llama or a "
                  f"compressjax.blocks.BlockModel, got {type(model).__name__}")
