"""Paths, predicates and tree traversal that treat compressed leaves as leaves.

A parameter path is the ``/``-joined key path of a leaf in a nested-dict parameter tree, e.g.
``layers/3/attn/q_proj/kernel``. A *selector* (the ``where`` of every transform) is:

* a string: a regular expression that must match the whole path (``re.fullmatch``);
* a callable ``(path, leaf) -> bool``;
* a list or tuple of selectors: selected when any of them selects;
* ``None``: everything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from compressjax.formats import CompressedArray

__all__ = [
    "Selector",
    "as_predicate",
    "is_leaf",
    "path_str",
    "leaves_with_paths",
    "map_with_path",
    "LINEAR_KERNELS",
]

Selector = str | Callable[[str, Any], bool] | Sequence[Any] | None

# Every linear layer of the decoder blocks; the embedding and the (tied or untied) LM head are
# left alone by default, as in the GPTQ/AWQ references.
LINEAR_KERNELS = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"


def is_leaf(x: Any) -> bool:
  """Compressed leaves and ``None`` are leaves of a parameter tree, whatever their children."""
  return isinstance(x, CompressedArray) or x is None


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(keypath: Sequence[Any]) -> str:
  """``/``-joined string of a JAX key path."""
  return "/".join(_key_str(k) for k in keypath)


def leaves_with_paths(params: Any) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` in tree order; compressed leaves are not descended into."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
  return [(path_str(kp), leaf) for kp, leaf in flat if leaf is not None]


def map_with_path(fn: Callable[[str, Any], Any], params: Any) -> Any:
  """Maps ``fn(path, leaf)`` over the leaves (compressed leaves are leaves)."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: x if x is None else fn(path_str(kp), x), params, is_leaf=is_leaf)


def as_predicate(where: Selector) -> Callable[[str, Any], bool]:
  """Turns a selector into a ``(path, leaf) -> bool`` predicate."""
  if where is None:
    return lambda path, leaf: True
  if isinstance(where, str):
    try:
      rx = re.compile(where)
    except re.error as e:
      raise ValueError(f"selector {where!r} is not a valid regular expression: {e}") from e
    return lambda path, leaf: rx.fullmatch(path) is not None
  if callable(where):
    return where
  if isinstance(where, (list, tuple)):
    preds = [as_predicate(w) for w in where]
    return lambda path, leaf: any(p(path, leaf) for p in preds)
  raise TypeError(f"selector must be a regex string, a callable (path, leaf) -> bool, a list of "
                  f"those, or None; got {type(where).__name__}")
