"""The common base class of every compressed weight leaf.

A compressed leaf is a registered pytree dataclass: its arrays are pytree
children (so they flow through :func:`jax.jit`, sharding and checkpointing) and
its metadata is static. Every format states its invariants in its docstring
and answers the same questions: its logical dense ``shape`` and ``dtype``, how
to :meth:`~CompressedArray.materialize` itself, and how many bytes it really
stores (:attr:`~CompressedArray.nbytes`).
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import jax
import numpy as np

__all__ = [
    "CompressedArray",
    "accumulation_dtype",
    "array_nbytes",
    "is_compressed",
    "tree_nbytes",
]


def accumulation_dtype(*dtypes: Any) -> np.dtype:
  """``float64`` if any of ``dtypes`` is ``float64``, else ``float32``.

  The dtype in which formats decode and accumulate. Chosen explicitly rather
  than by type promotion so that code also runs under
  ``jax_numpy_dtype_promotion="strict"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> accumulation_dtype(jnp.float16, jnp.bfloat16)
    dtype('float32')
  """
  if any(np.dtype(d) == np.float64 for d in dtypes):
    return np.dtype(np.float64)
  return np.dtype(np.float32)


def array_nbytes(x: Any) -> int:
  """Bytes stored by one array-like leaf: ``size * itemsize``.

  Works on concrete arrays (:class:`jax.Array`, :class:`numpy.ndarray`), on
  tracers and on :class:`jax.ShapeDtypeStruct`, since only the static shape and
  dtype are read. ``None`` stores nothing.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> array_nbytes(jax.ShapeDtypeStruct((9, 64), jnp.float16))
    1152
    >>> array_nbytes(None)
    0
  """
  if x is None:
    return 0
  return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def tree_nbytes(tree: Any) -> int:
  """Sum of :func:`array_nbytes` over the leaves of a pytree.

  Compressed leaves are pytrees themselves, so this counts the bytes they
  really store, not the bytes of their dense equivalent.

  Examples:
    >>> import jax.numpy as jnp
    >>> tree_nbytes({"a": jnp.zeros((2, 3)), "b": None})
    24
  """
  return sum(array_nbytes(leaf) for leaf in jax.tree_util.tree_leaves(tree))


class CompressedArray(abc.ABC):
  """Abstract base of compressed weight leaves (formats).

  Subclasses are registered pytree dataclasses: array children are pytree
  children and metadata is static. They must provide

  * ``shape``: logical dense shape (a tuple of ints), and
  * ``dtype``: logical dense dtype (what :meth:`materialize` returns),

  as static dataclass fields or properties (they are declared here as
  annotations rather than abstract properties because a dataclass field cannot
  override a read-only property), and implement :meth:`materialize`.

  :attr:`nbytes` counts every array child, so it is the honest storage cost,
  including scales, zero points and padding. It works on abstract leaves whose
  children are :class:`jax.ShapeDtypeStruct`.

  :attr:`trainable` names the dataclass fields holding continuous values that a
  fine-tune may train (scales, zeros, codebooks, dense low-rank factors, kept
  float values); discrete children (codes, masks, indices, pointers, packed
  bits) are never listed. A listed field is trainable only where it holds a
  plain floating array: a nested compressed leaf in any field declares its own
  :attr:`trainable`, and integer arrays are never trained
  (:func:`compressjax.finetune.trainable_mask` applies these rules).
  """

  shape: tuple[int, ...]
  dtype: Any
  #: Fields whose plain floating-array values a fine-tune may train.
  trainable: ClassVar[tuple[str, ...]] = ()

  @abc.abstractmethod
  def materialize(self) -> jax.Array:
    """Returns the dense ``shape`` array in ``dtype`` that this leaf encodes."""

  @property
  def ndim(self) -> int:
    """Number of logical dimensions."""
    return len(self.shape)

  def __getitem__(self, index):
    """``w[...]`` is ``w`` itself (how Flax NNX's ``Linear`` reads its kernel); nothing else.

    Raises:
      TypeError: for any other index (materialize first to slice).
    """
    if index is Ellipsis:
      return self
    raise TypeError(f"{type(self).__name__} supports only w[...] (the whole leaf); call "
                    f"materialize() to index it, got index={index!r}")

  @property
  def nbytes(self) -> int:
    """Bytes really stored: the sum of the bytes of all array children."""
    return sum(array_nbytes(c) for c in jax.tree_util.tree_leaves(self))

  @property
  def num_params(self) -> int:
    """Number of logical parameters, ``prod(shape)``."""
    return math.prod(self.shape)

  @property
  def bits_per_param(self) -> float:
    """Average stored bits per logical parameter, ``8 * nbytes / num_params``."""
    return 8 * self.nbytes / self.num_params


def is_compressed(x: Any) -> bool:
  """Whether ``x`` is a compressed leaf (a :class:`CompressedArray`).

  Useful as ``is_leaf=`` when mapping over parameter trees.

  Examples:
    >>> import jax.numpy as jnp
    >>> is_compressed(jnp.zeros(3))
    False
  """
  return isinstance(x, CompressedArray)
