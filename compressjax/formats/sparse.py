"""Sparse weight formats: unstructured bitmask + values, and N:M semi-structured.

* :class:`BitmaskSparse` an unstructured sparse ``(K, N)`` matrix: a 1-bit-per-entry mask plus
  the kept values in row-major order, either as floats or as low-bit codes on a grouped grid
  (sparse + quantized: the grid is that of the *dense* ``(K, N)`` layout, groups of
  ``group_size`` rows along ``K``, as SparseGPT's joint mode and GPTQ with a fixed mask produce).
* :class:`NMSparse` N:M semi-structured sparsity: in every group of ``m`` consecutive input rows
  of a column, exactly ``n`` entries are kept. The kept values form a dense ``(K * n / m, N)``
  matrix (itself any leaf: floats or a :class:`~compressjax.formats.QuantizedArray`) and each
  kept value carries its in-group index in ``ceil(log2(m))`` bits, the layout of sparse tensor
  cores (2:4: two values and two 2-bit indices per group of four).

Both count every stored byte (mask words, index words, codes, scales) and multiply through
:func:`compressjax.formats.dot`.

References:
  Frantar & Alistarh 2023, SparseGPT (arXiv:2301.00774); Mishra et al. 2021, "Accelerating
  Sparse Deep Neural Networks" (the 2:4 metadata layout).
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
from compressjax.formats import packing
from compressjax.formats import quantized
from compressjax.formats import tiled
from compressjax.formats.composite import _shape2

__all__ = ["BitmaskSparse", "NMSparse", "pack_mask", "unpack_mask", "index_bits"]


def pack_mask(keep: jax.Array) -> jax.Array:
  """Packs a boolean ``(K, N)`` mask, row-major, into ``ceil(K * N / 32)`` ``uint32`` words."""
  return packing.pack(keep.reshape(-1).astype(jnp.uint8), 1, axis=0)


def unpack_mask(words: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Inverse of :func:`pack_mask`: the boolean ``shape`` mask."""
  return packing.unpack(words, 1, math.prod(shape), axis=0).reshape(shape).astype(bool)


def _kept_positions(keep: jax.Array, nnz: int | None) -> tuple[int, jax.Array]:
  """``(nnz, flat row-major positions of the kept entries)``.

  With ``nnz`` given this traces under jit; without it ``keep`` must be concrete and the
  positions are found on the host (an eager ``jnp.nonzero(size=nnz)`` would compile once per
  distinct ``nnz``, i.e. once per layer under layer-adaptive budgets).
  """
  if nnz is None:
    idx = np.flatnonzero(np.asarray(keep))
    return int(idx.size), jnp.asarray(idx.astype(np.int32))
  return int(nnz), jnp.nonzero(keep.reshape(-1), size=int(nnz))[0]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class BitmaskSparse(base.CompressedArray):
  """Unstructured sparse ``(K, N)`` weight: a bitmask and the kept values.

  Invariants (``nnz`` kept entries, static):

  * ``mask``: ``uint32`` ``(ceil(K * N / 32),)``, the row-major keep mask packed 1 bit per entry
    (:func:`pack_mask`); exactly ``nnz`` bits are set.
  * float values (``bits is None``): ``values`` floating ``(nnz,)``, the kept entries in
    row-major order; ``scale`` and ``zero`` are ``None``.
  * quantized values (``bits`` in 2, 3, 4, 8): ``values`` ``uint32`` ``(packed_length(nnz, bits),)``,
    the codes of the kept entries in row-major order packed along their only axis; ``scale``
    ``(K // group_size, N)`` and (asymmetric) ``zero`` as in :class:`QuantizedArray`: entry
    ``(k, n)`` decodes with ``scale[k // group_size, n]``.
  * Every entry not kept is exactly zero. ``dtype`` is what :meth:`materialize` returns.

  Storage is ``K * N`` bits of mask plus the values (16 bits each as ``float16``, or ``bits``
  each plus the grid), e.g. 50% sparse ``float16``: 9 bits per parameter.

  Examples:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 0.0], [0.0, -2.0], [3.0, 0.0]])
    >>> s = BitmaskSparse.from_dense(w, w != 0)
    >>> s.nnz, s.materialize().tolist() == w.tolist(), s.nbytes
    (3, True, 10)
  """

  # Float kept values (bits=None) or the grid (quantized); never the mask or packed codes.
  trainable: ClassVar[tuple[str, ...]] = ("values", "scale", "zero")

  mask: jax.Array
  values: jax.Array
  scale: Any = None
  zero: Any = None
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), kw_only=True)
  dtype: Any = dataclasses.field(metadata=dict(static=True), kw_only=True)
  nnz: int = dataclasses.field(metadata=dict(static=True), kw_only=True)
  bits: int | None = dataclasses.field(default=None, metadata=dict(static=True), kw_only=True)
  group_size: int | None = dataclasses.field(default=None, metadata=dict(static=True),
                                             kw_only=True)
  symmetric: bool = dataclasses.field(default=True, metadata=dict(static=True), kw_only=True)

  def __post_init__(self):
    object.__setattr__(self, "shape", _shape2(self.shape))
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    k, n = self.shape
    if not 0 <= self.nnz <= k * n:
      raise ValueError(f"nnz must be in [0, K * N = {k * n}], got nnz={self.nnz}.")
    if self.bits is not None:
      quantized._check_bits(self.bits)  # pylint: disable=protected-access
      quantized._check_group_size(self.group_size, k)  # pylint: disable=protected-access
    m = self.mask
    if hasattr(m, "shape") and hasattr(m, "dtype") and tuple(m.shape) != (
        packing.packed_length(k * n, 1),):
      raise ValueError(f"mask must have shape ({packing.packed_length(k * n, 1)},) for "
                       f"shape={self.shape}, got {tuple(m.shape)}.")
    v = self.values
    want = (self.nnz,) if self.bits is None else (packing.packed_length(self.nnz, self.bits),)
    if hasattr(v, "shape") and hasattr(v, "dtype") and tuple(v.shape) != want:
      raise ValueError(f"values must have shape {want} (nnz={self.nnz}, bits={self.bits}), got "
                       f"{tuple(v.shape)}.")

  def __repr__(self):
    q = "" if self.bits is None else f", bits={self.bits}, group_size={self.group_size}"
    return (f"BitmaskSparse(shape={self.shape}, dtype={self.dtype.name}, nnz={self.nnz}"
            f"{q})")

  @property
  def density(self) -> float:
    return self.nnz / math.prod(self.shape)

  @classmethod
  def from_dense(cls, w, keep, *, value_dtype: Any = jnp.float16, dtype: Any = None,
                 nnz: int | None = None) -> "BitmaskSparse":
    """Float values of ``w`` where ``keep``.

    ``nnz`` (static) is the number of kept entries; when not given it is counted, which needs a
    concrete ``keep`` (outside :func:`jax.jit`).
    """
    keep = jnp.asarray(keep, bool)
    nnz, idx = _kept_positions(keep, nnz)
    vals = jnp.asarray(w).reshape(-1)[idx].astype(value_dtype)
    return cls(pack_mask(keep), vals, shape=tuple(keep.shape),
               dtype=jnp.asarray(w).dtype if dtype is None else dtype, nnz=nnz)

  @classmethod
  def from_codes(cls, codes, keep, scale, zero, *, bits: int, group_size: int, symmetric: bool,
                 dtype: Any = jnp.float32, nnz: int | None = None) -> "BitmaskSparse":
    """Quantized values: ``codes`` ``(K, N)`` on the dense grid, stored only where ``keep``
    (``nnz`` as in :meth:`from_dense`)."""
    keep = jnp.asarray(keep, bool)
    nnz, idx = _kept_positions(keep, nnz)
    kept = jnp.asarray(codes).reshape(-1)[idx].astype(jnp.uint8)
    return cls(pack_mask(keep), packing.pack(kept, bits, axis=0), scale, zero,
               shape=tuple(keep.shape), dtype=dtype, nnz=nnz, bits=bits, group_size=group_size,
               symmetric=symmetric)

  def keep_mask(self) -> jax.Array:
    """The boolean ``(K, N)`` keep mask."""
    return unpack_mask(self.mask, self.shape)

  def _positions(self) -> jax.Array:
    return jnp.nonzero(self.keep_mask().reshape(-1), size=self.nnz)[0]

  def kept_values(self) -> jax.Array:
    """The ``(nnz,)`` kept values (decoded when quantized), in row-major order."""
    acc = base.accumulation_dtype(self.dtype)
    if self.bits is None:
      return self.values.astype(acc)
    codes = packing.unpack(self.values, self.bits, self.nnz, axis=0)
    pos = self._positions()
    g, col = (pos // self.shape[1]) // self.group_size, pos % self.shape[1]
    s = quantized._dense(self.scale)[g, col].astype(acc)  # pylint: disable=protected-access
    z = None if self.zero is None else quantized._dense(self.zero)[g, col].astype(acc)  # pylint: disable=protected-access
    return quantized.dequantize(codes, s, z, bits=self.bits, symmetric=self.symmetric).astype(acc)

  def materialize(self) -> jax.Array:
    acc = base.accumulation_dtype(self.dtype)
    out = jnp.zeros((math.prod(self.shape),), acc).at[self._positions()].set(self.kept_values())
    return out.reshape(self.shape).astype(self.dtype)


def index_bits(m: int) -> int:
  """Bits per in-group index of an N:M format: ``ceil(log2(m))``."""
  return max(1, math.ceil(math.log2(m)))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class NMSparse(base.CompressedArray):
  """N:M semi-structured sparse ``(K, N)`` weight (``n`` kept in every ``m`` rows of a column).

  Invariants (``Kc = K * n // m``, ``m`` divides ``K``):

  * ``values``: a ``(Kc, N)`` dense array or compressed leaf (e.g. a :class:`QuantizedArray`
    whose groups of ``group_size * n / m`` compacted rows are ``group_size`` dense rows); row
    ``r`` holds the ``r % n``-th kept entry of row group ``r // n``.
  * ``indices``: ``uint32`` codes of width :func:`index_bits` ``(m)`` packed along axis 0 of a
    ``(Kc, N)`` array: the in-group offset ``0 <= idx < m`` of each kept value, strictly
    increasing within a group. Entry ``(r, c)`` is ``W[(r // n) * m + idx[r, c], c]``.
  * Every other entry is zero.

  Examples:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0], [0.0], [2.0], [0.0]])
    >>> s = NMSparse.from_dense(w, w != 0, n=2, m=4)
    >>> s.materialize().tolist() == w.tolist(), s.values.shape
    (True, (2, 1))
  """

  # Dense float compacted values; never the indices (compressed values declare their own).
  trainable: ClassVar[tuple[str, ...]] = ("values",)

  values: Any
  indices: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), kw_only=True)
  dtype: Any = dataclasses.field(metadata=dict(static=True), kw_only=True)
  n: int = dataclasses.field(metadata=dict(static=True), kw_only=True)
  m: int = dataclasses.field(metadata=dict(static=True), kw_only=True)

  def __post_init__(self):
    object.__setattr__(self, "shape", _shape2(self.shape))
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    k, n_out = self.shape
    if not (isinstance(self.m, int) and isinstance(self.n, int) and 0 < self.n <= self.m):
      raise ValueError(f"need integers 0 < n <= m, got n={self.n!r}, m={self.m!r}.")
    if k % self.m:
      raise ValueError(f"m={self.m} must divide K={k} (shape={self.shape}).")
    kc = k * self.n // self.m
    v = self.values
    if hasattr(v, "shape") and hasattr(v, "dtype") and tuple(v.shape) != (kc, n_out):
      raise ValueError(f"values must have shape (K * n / m, N) = {(kc, n_out)}, got "
                       f"{tuple(v.shape)}.")
    ix = self.indices
    want = (packing.packed_length(kc, index_bits(self.m)), n_out)
    if hasattr(ix, "shape") and hasattr(ix, "dtype") and tuple(ix.shape) != want:
      raise ValueError(f"indices must have shape {want}, got {tuple(ix.shape)}.")

  def __repr__(self):
    return (f"NMSparse(shape={self.shape}, dtype={self.dtype.name}, {self.n}:{self.m}, "
            f"values={type(self.values).__name__})")

  @property
  def compact_rows(self) -> int:
    return self.shape[0] * self.n // self.m

  @classmethod
  def from_dense(cls, w, keep, *, n: int, m: int, value_dtype: Any = jnp.float16,
                 dtype: Any = None) -> "NMSparse":
    """Compacts ``w`` under an N:M ``keep`` mask (exactly ``n`` per group; jittable)."""
    w = jnp.asarray(w)
    vals, idx = compact_nm(w, keep, n=n, m=m)
    return cls.from_compact(vals.astype(value_dtype), idx, n=n, m=m,
                            dtype=w.dtype if dtype is None else dtype)

  @classmethod
  def from_compact(cls, values, idx, *, n: int, m: int, dtype: Any) -> "NMSparse":
    """From compacted ``values`` (any ``(Kc, N)`` leaf) and unpacked in-group indices."""
    kc, n_out = idx.shape
    return cls(values, packing.pack(idx.astype(jnp.uint8), index_bits(m), axis=0),
               shape=(kc * m // n, n_out), dtype=dtype, n=n, m=m)

  def group_indices(self) -> jax.Array:
    """Unpacked ``(Kc, N)`` in-group offsets."""
    return packing.unpack(self.indices, index_bits(self.m), self.compact_rows, axis=0)

  def row_indices(self) -> jax.Array:
    """``(Kc, N)`` ``int32`` dense row of every kept value."""
    r = jnp.arange(self.compact_rows, dtype=jnp.int32)[:, None]
    return (r // self.n) * self.m + self.group_indices().astype(jnp.int32)

  def _cols(self) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(self.shape[1], dtype=jnp.int32),
                            (self.compact_rows, self.shape[1]))

  def keep_mask(self) -> jax.Array:
    """The boolean ``(K, N)`` keep mask (exact even where a kept value is 0)."""
    return jnp.zeros(self.shape, bool).at[self.row_indices(), self._cols()].set(True)

  def materialize(self) -> jax.Array:
    acc = base.accumulation_dtype(self.dtype)
    vals = dispatch.materialize(self.values).astype(acc)
    out = jnp.zeros(self.shape, acc).at[self.row_indices(), self._cols()].set(vals)
    return out.astype(self.dtype)


def compact_nm(w: jax.Array, keep: jax.Array, *, n: int, m: int) -> tuple[jax.Array, jax.Array]:
  """``(values, idx)``, each ``(K * n / m, N)``: the kept entries of every group of ``m`` rows.

  ``keep`` must keep exactly ``n`` entries in every group (not checked under jit).
  """
  k, cols = w.shape
  if k % m:
    raise ValueError(f"m={m} must divide K={k}.")
  kg = keep.reshape(k // m, m, cols)
  # Offsets of the kept entries, in increasing order: sort (not kept -> m) and take the first n.
  off = jnp.where(kg, jnp.arange(m, dtype=jnp.int32)[None, :, None], m)
  idx = jnp.sort(off, axis=1)[:, :n]  # (K/m, n, N)
  vals = jnp.take_along_axis(w.reshape(k // m, m, cols), idx, axis=1)
  return vals.reshape(-1, cols), idx.reshape(-1, cols)


def _prepare_bitmask_rows(w: BitmaskSparse):
  """Tile decoder: unpacks the tile's mask words and gathers its kept values.

  The kept values are stored row-major, so the first value of a tile is at the number of mask
  bits set before it: an exclusive prefix sum of the words' popcounts (``K * N / 32`` ints),
  computed once per product.
  """
  k, n = w.shape
  acc = base.accumulation_dtype(w.dtype)
  pc = jax.lax.population_count(w.mask).astype(jnp.int32)
  before = jnp.cumsum(pc) - pc  # kept entries before each mask word
  scale = None if w.bits is None else quantized._dense(w.scale)  # pylint: disable=protected-access
  zero = None if w.zero is None else quantized._dense(w.zero)  # pylint: disable=protected-access

  def decode(start, size, dtype):
    if w.nnz == 0:
      return jnp.zeros((size, n), dtype)
    word0 = (start * n) // packing.BLOCK  # start is a multiple of 32
    words = jax.lax.dynamic_slice_in_dim(w.mask, word0, packing.packed_length(size * n, 1))
    keep = packing.unpack(words, 1, size * n).astype(jnp.int32)
    pos = before[word0] + jnp.cumsum(keep) - keep
    pos = jnp.minimum(pos, w.nnz - 1)
    if w.bits is None:
      v = jnp.take(w.values, pos).astype(acc).reshape(size, n)
    else:
      codes = packing.gather(w.values, w.bits, pos).reshape(size, n)
      sc = tiled.group_rows(scale, start, size, w.group_size)
      z = None if zero is None else tiled.group_rows(zero, start, size, w.group_size)
      v = quantized.dequantize(codes, sc, z, bits=w.bits, symmetric=w.symmetric).astype(acc)
    return jnp.where(keep.reshape(size, n) > 0, v, 0).astype(dtype)

  return decode


def _nm_alignment(w: NMSparse) -> int:
  # Tile starts are multiples of m whose compacted row n * start / m is a multiple of both the
  # index packing block (32) and the alignment of the values leaf.
  big = math.lcm(packing.row_alignment(index_bits(w.m)), tiled.row_alignment(w.values))
  return w.m * big // math.gcd(w.n, big)


def _prepare_nm_rows(w: NMSparse):
  """Tile decoder: decodes the tile's compacted rows and places each at its in-group offset."""
  values = tiled.rows_decoder(w.values)
  ib = index_bits(w.m)
  cols = w.shape[1]

  def decode(start, size, dtype):
    cs, csize = start * w.n // w.m, size * w.n // w.m
    vals = values(cs, csize, dtype).reshape(size // w.m, w.n, cols)
    idx = packing.unpack_rows(w.indices, ib, cs, csize).reshape(size // w.m, w.n, cols)
    rows = [jnp.sum(jnp.where(idx == j, vals, 0), axis=1, dtype=dtype) for j in range(w.m)]
    return jnp.stack(rows, axis=1).reshape(size, cols)

  return decode


def bitmask_matmul_xla(x: jax.Array, w: BitmaskSparse) -> jax.Array:
  """``x @ W`` tiled over ``K`` (:func:`compressjax.formats.tiled.tiled_dot`): per tile, the mask
  words are unpacked and the kept values gathered into a ``(T, N)`` block; the dense weight and
  the ``nnz`` positions of the whole matrix are never built."""
  return tiled.tiled_dot(x, w)


def nm_matmul_xla(x: jax.Array, w: NMSparse) -> jax.Array:
  """``x @ W`` tiled over ``K``: per tile, the compacted values (any leaf, decoded by its own
  tile decoder) are placed at their in-group offsets in a ``(T, N)`` block."""
  return tiled.tiled_dot(x, w)


tiled.register_rows_decoder(BitmaskSparse, _prepare_bitmask_rows, lambda w: packing.BLOCK)
tiled.register_rows_decoder(NMSparse, _prepare_nm_rows, _nm_alignment)
jax.tree_util.register_dataclass(
    BitmaskSparse, data_fields=["mask", "values", "scale", "zero"],
    meta_fields=["shape", "dtype", "nnz", "bits", "group_size", "symmetric"])
jax.tree_util.register_dataclass(NMSparse, data_fields=["values", "indices"],
                                 meta_fields=["shape", "dtype", "n", "m"])
dispatch.register_matmul(BitmaskSparse, "xla", bitmask_matmul_xla,
                         priority=dispatch.FALLBACK_PRIORITY)
dispatch.register_matmul(NMSparse, "xla", nm_matmul_xla, priority=dispatch.FALLBACK_PRIORITY)
