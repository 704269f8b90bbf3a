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
  of the kernel at ``prefix + path`` are those of its capture.

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
from typing import Any, Callable, Mapping

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
    rest = {k: v for k, v in self.params.items() if k != "layers"}
    return _flat(materialize(rest, self.dtype))

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


def as_block_model(model) -> BlockModel:
  """``model`` if it is a :class:`BlockModel`; a :class:`LlamaBlocks` of an NNX Llama."""
  if isinstance(model, BlockModel):
    return model
  from compressjax.model import Llama  # pylint: disable=g-import-not-at-top

  if isinstance(model, Llama):
    return LlamaBlocks.from_model(model)
  raise TypeError(f"the calibration engine needs a compressjax.model.Llama or a "
                  f"compressjax.blocks.BlockModel, got {type(model).__name__}")
