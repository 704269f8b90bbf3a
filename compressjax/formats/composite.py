"""Formats built from other formats: sums, sparse outliers, kept rows and transposed views.

These are the shared pieces that SpQR (grouped codes + bilevel statistics + sparse outliers),
OWQ (grouped codes + a few full-precision input rows) and later the low-rank and sparse recipes
are assembled from, instead of each method getting its own code path:

* :class:`SumArray` ``W = sum(terms)``, each term dense or compressed; a product decodes the sum
  of the terms one ``K``-tile at a time (low-rank terms multiply factorized), so neither the
  sum nor any term is ever materialized for a product.
* :class:`SparseOutliers` an unstructured sparse ``(K, N)`` matrix in compressed-sparse-column
  form (``uint16`` row indices when ``K <= 65536``, ``float16`` values, ``int32`` column pointers).
* :class:`KeptRows` a few full rows (input features) of ``W`` stored densely with their indices.
* :class:`Transposed` the transpose of another leaf (SpQR quantizes its per-group statistics
  in groups along the *output* dimension, i.e. a :class:`QuantizedArray` of the transposed
  statistics matrix).

Every class counts the bytes it really stores (index arrays and pointers included).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats import dispatch
from compressjax.formats import tiled

__all__ = ["KeptRows", "SparseOutliers", "SumArray", "Transposed"]


def _shape2(shape) -> tuple[int, int]:
  shape = tuple(int(d) for d in shape)
  if len(shape) != 2:
    raise ValueError(f"shape must be 2-D (K, N), got shape={shape}.")
  return shape


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class SumArray(base.CompressedArray):
  """``W = terms[0] + terms[1] + ...``, each term a dense array or a compressed leaf.

  Invariants: ``terms`` is a non-empty tuple; every term has ``shape`` ``(K, N)`` (checked for
  terms that have a shape); ``dtype`` is the dtype :meth:`materialize` returns. ``x @ W`` is
  ``sum(dot(x, t))``: each term goes through the dispatch point with its own implementation.

  Examples:
    >>> import jax.numpy as jnp
    >>> w = SumArray((jnp.ones((4, 2)), jnp.eye(4, 2)), shape=(4, 2), dtype=jnp.float32)
    >>> w.materialize()[0].tolist(), w.nbytes
    ([2.0, 1.0], 64)
  """

  # Dense float terms may be tuned; compressed terms declare their own.
  trainable: ClassVar[tuple[str, ...]] = ("terms",)

  terms: tuple[Any, ...]
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), kw_only=True)
  dtype: Any = dataclasses.field(metadata=dict(static=True), kw_only=True)

  def __post_init__(self):
    object.__setattr__(self, "shape", _shape2(self.shape))
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    if not isinstance(self.terms, tuple) or not self.terms:
      raise ValueError(f"terms must be a non-empty tuple, got {type(self.terms).__name__}.")
    for i, t in enumerate(self.terms):
      s = getattr(t, "shape", None)
      if isinstance(s, tuple) and hasattr(t, "dtype") and tuple(s) != self.shape:
        raise ValueError(f"terms[{i}] has shape {tuple(s)}, expected {self.shape}.")

  def __repr__(self):
    inner = ", ".join(type(t).__name__ for t in self.terms)
    return f"SumArray(shape={self.shape}, dtype={self.dtype.name}, terms=({inner}))"

  def materialize(self) -> jax.Array:
    acc = base.accumulation_dtype(self.dtype)
    out = dispatch.materialize(self.terms[0]).astype(acc)
    for t in self.terms[1:]:
      out = out + dispatch.materialize(t).astype(acc)
    return out.astype(self.dtype)


def _rows(x) -> int:
  return math.prod(x.shape[:-1])


def _prepare_sum_rows(w: SumArray):
  decoders = [tiled.rows_decoder(t) for t in w.terms]

  def decode(start, size, dtype):
    out = decoders[0](start, size, dtype)
    for d in decoders[1:]:
      out = out + d(start, size, dtype)
    return out

  return decode


def _sum_alignment(w: SumArray) -> int:
  return math.lcm(*(tiled.row_alignment(t) for t in w.terms))


def sum_matmul_xla(x: jax.Array, w: SumArray) -> jax.Array:
  """``x @ W`` for a sum: the terms that decode row tiles (dense arrays, packed codes, sparse
  formats) are summed tile by tile inside one :func:`~compressjax.formats.tiled.tiled_dot`;
  low-rank terms multiply factorized (``(x @ A) @ B``) and terms without a tile decoder
  (e.g. :class:`Incoherent`, :class:`Transposed`) through their own product. No dense
  ``(K, N)`` temporary is built for any row count."""
  from compressjax.formats.lowrank import LowRank  # pylint: disable=g-import-not-at-top
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  tileable = tuple(t for t in w.terms
                   if not isinstance(t, LowRank) and tiled.has_rows_decoder(t))
  others = [t for t in w.terms if not any(t is u for u in tileable)]
  y = None
  if tileable:
    if len(tileable) > 1:  # one tiled loop decodes the sum of these terms tile by tile
      y = tiled.tiled_dot(x, SumArray(tileable, shape=w.shape, dtype=w.dtype)).astype(acc)
    else:  # a single term: its own product (possibly a faster registered kernel)
      y = dispatch.dot(x, tileable[0]).astype(acc)
  for t in others:
    yt = dispatch.dot(x, t).astype(acc)
    y = yt if y is None else y + yt
  return y.astype(out_dtype)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class SparseOutliers(base.CompressedArray):
  """An unstructured sparse ``(K, N)`` matrix in compressed-sparse-column (CSC) form.

  Invariants (``nnz`` entries): ``indptr`` is ``int32`` ``(N + 1,)``, non-decreasing, with
  ``indptr[0] == 0`` and ``indptr[N] == nnz``; ``rows`` holds the row index of each entry, column
  by column (``uint16`` when ``K <= 65536``, else ``int32``); ``values`` ``(nnz,)`` floating.
  Entry ``e`` with ``indptr[n] <= e < indptr[n + 1]`` is ``W[rows[e], n] = values[e]``; every other
  entry is zero. An ``(row, column)`` pair appears at most once. Storage is ``16 + 16`` bits per
  entry plus ``32 (N + 1)`` bits, as in SpQR's CSR outlier layout.

  Examples:
    >>> import numpy as np
    >>> dense = np.zeros((4, 3), np.float32); dense[2, 0] = 5.0; dense[1, 2] = -1.0
    >>> s = SparseOutliers.from_dense(dense)
    >>> s.nnz, s.materialize().tolist() == dense.tolist(), s.nbytes
    (2, True, 24)
  """

  # The float values may be tuned; never the row indices or pointers.
  trainable: ClassVar[tuple[str, ...]] = ("values",)

  indptr: jax.Array
  rows: jax.Array
  values: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), kw_only=True)
  dtype: Any = dataclasses.field(metadata=dict(static=True), kw_only=True)

  def __post_init__(self):
    object.__setattr__(self, "shape", _shape2(self.shape))
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    k, n = self.shape
    ip = self.indptr
    if hasattr(ip, "shape") and hasattr(ip, "dtype") and tuple(ip.shape) != (n + 1,):
      raise ValueError(f"indptr must have shape (N + 1,) = ({n + 1},), got {tuple(ip.shape)}.")
    r, v = self.rows, self.values
    if (hasattr(r, "shape") and hasattr(v, "shape") and hasattr(v, "dtype")
        and tuple(r.shape) != tuple(v.shape)):
      raise ValueError(f"rows and values must have the same (nnz,) shape, got {tuple(r.shape)} "
                       f"and {tuple(v.shape)}.")

  def __repr__(self):
    return f"SparseOutliers(shape={self.shape}, dtype={self.dtype.name}, nnz={self.nnz})"

  @property
  def nnz(self) -> int:
    return int(self.values.shape[0])

  @classmethod
  def from_dense(cls, dense, *, value_dtype: Any = jnp.float16,
                 dtype: Any = None) -> "SparseOutliers":
    """Builds the CSC form of the non-zeros of a concrete ``(K, N)`` array (not under jit)."""
    d = np.asarray(dense)
    if d.ndim != 2:
      raise ValueError(f"dense must be 2-D (K, N), got shape {d.shape}.")
    k, n = d.shape
    cols, rows = np.nonzero(d.T)  # column-major order
    indptr = np.zeros(n + 1, np.int32)
    np.add.at(indptr, cols + 1, 1)
    indptr = np.cumsum(indptr).astype(np.int32)
    row_dtype = np.uint16 if k <= 65536 else np.int32
    values = d[rows, cols]
    return cls(jnp.asarray(indptr), jnp.asarray(rows.astype(row_dtype)),
               jnp.asarray(values).astype(value_dtype), shape=(k, n),
               dtype=d.dtype if dtype is None else dtype)

  def columns(self) -> jax.Array:
    """Column index of every entry, ``(nnz,)`` ``int32`` (recomputed from ``indptr``)."""
    e = jnp.arange(self.values.shape[0], dtype=jnp.int32)
    return (jnp.searchsorted(self.indptr, e, side="right") - 1).astype(jnp.int32)

  def materialize(self) -> jax.Array:
    acc = base.accumulation_dtype(self.dtype)
    out = jnp.zeros(self.shape, acc)
    out = out.at[self.rows.astype(jnp.int32), self.columns()].add(self.values.astype(acc))
    return out.astype(self.dtype)


def _prepare_outlier_rows(w: SparseOutliers):
  rows = w.rows.astype(jnp.int32)
  cols = w.columns()

  def decode(start, size, dtype):
    r = rows - start
    r = jnp.where((r >= 0) & (r < size), r, size)  # out of the tile: dropped
    out = jnp.zeros((size, w.shape[1]), dtype)
    return out.at[r, cols].add(w.values.astype(dtype), mode="drop")

  return decode


def sparse_matmul_xla(x: jax.Array, w: SparseOutliers) -> jax.Array:
  """``y[..., n] = sum_e x[..., rows[e]] * values[e]`` over the entries of column ``n`` while the
  ``(M, nnz)`` products stay below a quarter of the dense weight's elements; otherwise tiled over
  ``K`` (each tile scatters the entries that fall in it into a ``(T, N)`` block)."""
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  n = w.shape[1]
  if w.values.shape[0] == 0:
    return jnp.zeros(x.shape[:-1] + (n,), out_dtype)
  if 4 * _rows(x) * w.values.shape[0] > math.prod(w.shape):
    return tiled.tiled_dot(x, w)
  contrib = x[..., w.rows.astype(jnp.int32)].astype(acc) * w.values.astype(acc)  # (..., nnz)
  batch = x.shape[:-1]
  flat = contrib.reshape(-1, contrib.shape[-1]).T  # (nnz, M)
  y = jax.ops.segment_sum(flat, w.columns(), num_segments=n)  # (N, M)
  return y.T.reshape(batch + (n,)).astype(out_dtype)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class KeptRows(base.CompressedArray):
  """A ``(K, N)`` matrix that is zero except for ``r`` full rows kept densely.

  Invariants: ``rows`` ``int32`` ``(r,)`` distinct indices in ``[0, K)``; ``values`` floating
  ``(r, N)`` with ``W[rows[i]] = values[i]``; all other rows are zero. OWQ's "weak columns" of the
  paper's ``(out, in)`` weight are rows (input features) of our ``(in, out)`` kernels.

  Examples:
    >>> import jax.numpy as jnp
    >>> kr = KeptRows(jnp.array([1], jnp.int32), jnp.ones((1, 3), jnp.float16), shape=(4, 3),
    ...               dtype=jnp.float32)
    >>> kr.materialize().sum(axis=1).tolist(), kr.nbytes
    ([0.0, 3.0, 0.0, 0.0], 10)
  """

  # The float values may be tuned; never the row indices or pointers.
  trainable: ClassVar[tuple[str, ...]] = ("values",)

  rows: jax.Array
  values: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), kw_only=True)
  dtype: Any = dataclasses.field(metadata=dict(static=True), kw_only=True)

  def __post_init__(self):
    object.__setattr__(self, "shape", _shape2(self.shape))
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    v = self.values
    if hasattr(v, "shape") and hasattr(v, "dtype") and len(v.shape) == 2 and (
        v.shape[1] != self.shape[1]):
      raise ValueError(f"values must have shape (r, N={self.shape[1]}), got {tuple(v.shape)}.")

  def __repr__(self):
    return f"KeptRows(shape={self.shape}, dtype={self.dtype.name}, rows={self.rows.shape[0]})"

  def materialize(self) -> jax.Array:
    out = jnp.zeros(self.shape, self.dtype)
    return out.at[self.rows].set(self.values.astype(self.dtype))


def _prepare_kept_rows(w: KeptRows):
  def decode(start, size, dtype):
    r = w.rows.astype(jnp.int32) - start
    r = jnp.where((r >= 0) & (r < size), r, size)
    return jnp.zeros((size, w.shape[1]), dtype).at[r].set(w.values.astype(dtype), mode="drop")
  return decode


def kept_rows_matmul_xla(x: jax.Array, w: KeptRows) -> jax.Array:
  """``x[..., rows] @ values``: reads only the kept rows."""
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  y = jnp.matmul(x[..., w.rows].astype(acc), w.values.astype(acc), preferred_element_type=acc)
  return y.astype(out_dtype)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Transposed(base.CompressedArray):
  """The transpose of a 2-D leaf: ``materialize() == inner.materialize().T``.

  Invariants: ``inner`` is a 2-D dense array or compressed leaf of shape ``(N, K)``; this leaf's
  ``shape`` is ``(K, N)`` and its ``dtype`` is ``inner.dtype``.

  Examples:
    >>> import jax.numpy as jnp
    >>> Transposed(jnp.zeros((3, 2))).shape
    (2, 3)
  """

  # A dense float inner matrix may be tuned; a compressed one declares its own.
  trainable: ClassVar[tuple[str, ...]] = ("inner",)

  inner: Any

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(reversed(tuple(self.inner.shape)))

  @property
  def dtype(self):
    return np.dtype(self.inner.dtype)

  def __repr__(self):
    return f"Transposed({self.inner!r})"

  def materialize(self) -> jax.Array:
    return dispatch.materialize(self.inner).T


def transposed_matmul_xla(x: jax.Array, w: Transposed) -> jax.Array:
  """``x @ inner^T`` tiled over ``N`` (the rows of ``inner``): each block of output columns is
  ``x @ inner[s : s + T]^T`` with the block decoded by ``inner``'s tile decoder, so the dense
  weight is never built (a dense ``inner`` is multiplied directly)."""
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  if not isinstance(w.inner, base.CompressedArray):
    return jnp.matmul(x.astype(out_dtype), jnp.asarray(w.inner).T.astype(out_dtype),
                      preferred_element_type=acc).astype(out_dtype)
  k, n = w.shape
  align = tiled.row_alignment(w.inner)
  tile = tiled.pick_tile(n, k, align)
  decode = tiled.rows_decoder(w.inner)
  batch = x.shape[:-1]
  xm = x.reshape((-1, k)).astype(out_dtype)
  nfull, rem = divmod(n, tile)

  def block(s, size):
    wt = decode(s, size, acc).astype(out_dtype)  # (size, K)
    return jnp.matmul(xm, wt.T, preferred_element_type=acc)

  y = jnp.zeros((xm.shape[0], n), acc)
  if nfull:
    y = jax.lax.fori_loop(
        0, nfull, lambda i, y: jax.lax.dynamic_update_slice_in_dim(
            y, block(i * tile, tile), i * tile, axis=1), y)
  if rem:
    y = y.at[:, nfull * tile:].set(block(nfull * tile, rem))
  return y.reshape(batch + (n,)).astype(out_dtype)


for _cls, _field in ((SumArray, ["terms"]), (SparseOutliers, ["indptr", "rows", "values"]),
                     (KeptRows, ["rows", "values"])):
  jax.tree_util.register_dataclass(_cls, data_fields=_field, meta_fields=["shape", "dtype"])
jax.tree_util.register_dataclass(Transposed, data_fields=["inner"], meta_fields=[])

tiled.register_rows_decoder(SumArray, _prepare_sum_rows, _sum_alignment)
tiled.register_rows_decoder(SparseOutliers, _prepare_outlier_rows, lambda w: 1)
tiled.register_rows_decoder(KeptRows, _prepare_kept_rows, lambda w: 1)
dispatch.register_matmul(SumArray, "xla", sum_matmul_xla, priority=dispatch.FALLBACK_PRIORITY)
dispatch.register_matmul(SparseOutliers, "xla", sparse_matmul_xla,
                         priority=dispatch.FALLBACK_PRIORITY)
dispatch.register_matmul(KeptRows, "xla", kept_rows_matmul_xla, priority=dispatch.FALLBACK_PRIORITY)
dispatch.register_matmul(Transposed, "xla", transposed_matmul_xla,
                         priority=dispatch.FALLBACK_PRIORITY)
