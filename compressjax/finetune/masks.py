"""Which parameters a fine-tune may train: masks over parameter trees, and the split/merge
that keeps discrete children out of :func:`jax.grad`.

A compressed leaf declares its continuous children in ``trainable`` (see
:class:`compressjax.formats.CompressedArray`): a child is trainable when the innermost compressed
leaf holding it lists the field it sits in and the child is a floating array. Integer children
(codes, masks, indices, pointers) are never trainable, whatever a format lists.

:func:`trainable_mask` returns a pytree of bools of the same structure as the parameter tree
(compressed leaves keep their class, with bool children), so it works with
``optax.masked(adam, mask)`` and ``optax.multi_transform``. :func:`partition` splits a tree into
``(trainable, frozen)`` (``None`` where a leaf belongs to the other part) and :func:`combine`
merges them back; gradients are then taken w.r.t. ``trainable`` only.

References:
  Egiazarian et al. 2024, "Extreme Compression of Large Language Models via Additive
  Quantization" (AQLM), arXiv:2401.06118 (fine-tuning the continuous parameters of quantized
  layers: codebooks, scales, norms; codes stay fixed).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compressjax.formats import CompressedArray
from compressjax.transforms.selection import Selector, as_predicate, map_with_path

__all__ = ["NORMS", "combine", "leaf_mask", "partition", "trainable_mask"]

#: Dense leaves of normalization layers (Llama ``attn_norm/scale``, GPT-2 ``ln_1/bias``...).
NORMS = r"(.*/)?([^/]*norm[^/]*|ln_[^/]*)/(scale|bias|weight)"


def _is_float_array(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return (dtype is not None and isinstance(getattr(x, "shape", None), tuple)
          and jnp.issubdtype(dtype, jnp.floating))


def _child(obj: Any, key: Any) -> Any:
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(obj, key.name)
  if isinstance(key, jax.tree_util.SequenceKey):
    return obj[key.idx]
  if isinstance(key, jax.tree_util.DictKey):
    return obj[key.key]
  raise TypeError(f"trainable_mask: cannot follow key {key!r} inside {type(obj).__name__}")


def _child_trainable(leaf: CompressedArray, keypath, x) -> bool:
  """Whether child ``x`` at ``keypath`` of ``leaf`` is trainable (see the module docstring)."""
  owner, field, obj = leaf, None, leaf
  for key in keypath:
    if isinstance(obj, CompressedArray):
      owner = obj
      field = key.name if isinstance(key, jax.tree_util.GetAttrKey) else None
    obj = _child(obj, key)
  return field in type(owner).trainable and _is_float_array(x)


def leaf_mask(leaf: CompressedArray, selected: bool = True) -> CompressedArray:
  """``leaf`` with each child replaced by whether it is trainable (all ``False`` unless
  ``selected``)."""
  for name in type(leaf).trainable:
    if not hasattr(leaf, name):
      raise TypeError(f"{type(leaf).__name__}.trainable lists {name!r}, which is not a field")
  flat, treedef = jax.tree_util.tree_flatten_with_path(leaf)
  return jax.tree_util.tree_unflatten(
      treedef, [selected and _child_trainable(leaf, kp, x) for kp, x in flat])


def _no_selector(s: Selector) -> bool:
  return s is None or (isinstance(s, (list, tuple)) and not s)


def _mask(params: Any, where: Selector, train_dense: Selector):
  pick = as_predicate(where)
  pick_dense = (lambda p, x: False) if _no_selector(train_dense) else as_predicate(train_dense)
  hits = {"where": 0, "dense": 0}

  def one(path, leaf):
    if isinstance(leaf, CompressedArray):
      sel = bool(pick(path, leaf))
      hits["where"] += sel
      return leaf_mask(leaf, sel)
    sel = _is_float_array(leaf) and bool(pick_dense(path, leaf))
    hits["dense"] += sel
    return sel

  return map_with_path(one, params), hits


def trainable_mask(params: Any, where: Selector = None, train_dense: Selector = None) -> Any:
  """A pytree of bools: ``True`` exactly on the children a fine-tune may train.

  Args:
    params: a parameter tree (dense arrays, compressed leaves, or their
      ``jax.ShapeDtypeStruct`` versions).
    where: selects the compressed leaves whose declared trainable children are trained
      (a selector of :mod:`compressjax.transforms.selection`; ``None``: every compressed leaf).
    train_dense: selects dense floating leaves to train too (e.g. :data:`NORMS`); ``None`` (the
      default) or ``()`` selects none.

  Returns:
    The mask, of the same tree structure as ``params`` (compressed leaves are of their own class
    with ``bool`` children), for ``optax.masked``/``optax.multi_transform`` or :func:`partition`.

  Raises:
    ValueError: ``where`` (when given) selects no compressed leaf, or ``train_dense`` (when not
      empty) selects no dense floating leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from compressjax import formats
    >>> q = formats.QuantizedArray.from_codes(jnp.zeros((32, 2), jnp.uint8),
    ...     jnp.ones((1, 2)), None, bits=4, group_size=32, symmetric=True)
    >>> m = trainable_mask({"w": q, "norm": {"scale": jnp.ones(2)}}, train_dense=NORMS)
    >>> m["w"].packed, m["w"].scale, m["norm"]["scale"]
    (False, True, True)
  """
  mask, hits = _mask(params, where, train_dense)
  if where is not None and not hits["where"]:
    raise ValueError(f"trainable_mask: where={where!r} matched no compressed leaf")
  if not _no_selector(train_dense) and not hits["dense"]:
    raise ValueError(f"trainable_mask: train_dense={train_dense!r} matched no dense floating leaf")
  return mask


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
  """``(trainable, frozen)``: ``params`` split by ``mask`` (``None`` where a leaf is in the other
  part). Take gradients w.r.t. ``trainable`` only; :func:`combine` merges them back.

  Examples:
    >>> import jax.numpy as jnp
    >>> t, f = partition({"a": jnp.ones(2), "b": jnp.zeros(2, jnp.int32)}, {"a": True, "b": False})
    >>> t["b"] is None and f["a"] is None
    True
  """
  trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
  return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
  """Inverse of :func:`partition`: each leaf from whichever part holds it."""
  return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen,
                      is_leaf=lambda x: x is None)
