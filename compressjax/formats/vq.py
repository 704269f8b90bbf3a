"""Vector-quantized weights: codes into per-block codebooks of ``d``-dimensional vectors (GPTVQ).

:class:`VQArray` stores, for every vector of ``d`` consecutive input rows of one output column,
the index of a codeword in the codebook of its block (``group_size`` input rows by
``out_block`` outputs). Codebooks are ``int8`` with one floating scale per codebook.

Two ``"xla"`` products (:func:`vq_matmul_xla` picks one per shape, :data:`LUT_MAX_ROWS`):

* tiled decode: per ``K``-tile, gather the tile's codewords and multiply
  (:mod:`compressjax.formats.tiled`); the dense weight is never formed
  (:func:`vq_matmul_decode`, which forms it, is kept as a reference);
* lookup table, for few rows: for each input group, the products of the activation vectors
  with every codeword, ``x_v . c_e`` (``(rows, K / d, Gn, E)``), then a gather of those sums by
  the codes and a sum over the vectors. No ``(K, N)`` weight is formed.

References:
  van Baalen et al., "GPTVQ: The Blessing of Dimensionality for LLM Quantization",
  arXiv:2402.15319 (the codebook format and its LUT decoding).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats import dispatch
from compressjax.formats import packing
from compressjax.formats import tiled

__all__ = ["LUT_MAX_ROWS", "VQArray", "code_container", "code_storage_bits", "vq_matmul_decode",
           "vq_matmul_lut", "vq_matmul_tiled", "vq_matmul_xla"]

#: Products with at most this many rows of ``x`` use the lookup-table path. Measured on the
#: shared 2-core CPU host (jitted, min of 5), ``(M, 576) x (576, 1536)``, LUT / decode ms:
#: d=2 (16 entries): M=1 0.42 / 1.33, M=2 0.89 / 1.37, M=4 1.75 / 1.37, M=8 4.8 / 1.5;
#: d=4 (256): M=1 0.34 / 1.20, M=2 0.81 / 1.26, M=4 1.43 / 1.20, M=8 2.1 / 1.3;
#: d=8 (256): M=1 0.37 / 0.86, M=2 0.72 / 0.82, M=4 0.89 / 0.94, M=8 2.5 / 1.4;
#: M=32: LUT 66-174 ms vs decode 1.2-1.6 ms. Crossover between 2 and 4 rows. Not measured on GPU.
LUT_MAX_ROWS = 2


def code_container(code_bits: int) -> str:
  """How codes of ``code_bits`` bits are stored: ``"packed"`` (uint32 bitstream, < 8 bits),
  ``"uint8"`` (8) or ``"uint16"`` (9..16)."""
  if code_bits < 8:
    return "packed"
  return "uint8" if code_bits == 8 else "uint16"


def code_storage_bits(num_vectors: int, n: int, code_bits: int) -> int:
  """Bits the codes of a ``(num_vectors, n)`` code matrix occupy in their container."""
  kind = code_container(code_bits)
  if kind == "packed":
    return 8 * packing.packed_nbytes((num_vectors, n), code_bits)
  return num_vectors * n * (8 if kind == "uint8" else 16)


def _has_shape(x) -> bool:
  return isinstance(getattr(x, "shape", None), tuple)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class VQArray(base.CompressedArray):
  """A ``(K, N)`` weight as codes into ``int8`` codebooks of ``dim``-vectors.

  Invariants:

  * ``shape == (K, N)``; ``dim`` in ``(1, 2, 4, 8)`` divides ``group_size``, which divides
    ``K``; ``out_block`` divides ``N``; ``Gk = K / group_size``, ``Gn = N / out_block``;
    ``code_bits`` in ``1..16``, ``E = 2**code_bits`` codewords per codebook.
  * ``codes``: the ``(K / dim, N)`` codes, code ``[v, n]`` naming the codeword for
    ``W[v*dim : (v+1)*dim, n]``, stored by :func:`code_container`: bit-packed along the
    vector axis by :func:`compressjax.formats.packing.pack` into ``uint32``
    ``(packed_length(K / dim, code_bits), N)`` for ``code_bits < 8``, else ``uint8`` / ``uint16``
    ``(K / dim, N)``.
  * ``codebook``: ``int8`` ``(Gk, Gn, E, dim)``; ``scale``: floating ``(Gk, Gn)``.
  * ``materialize()[v*dim + t, n] == codebook[g, h, codes[v, n], t] * scale[g, h]`` with
    ``g = v*dim // group_size``, ``h = n // out_block``, decoded in ``float32`` and cast
    to ``dtype``.

  ``trainable = ("scale",)``: a fine-tune may train the per-codebook float scales; the
  ``int8`` codewords and the codes are discrete and stay fixed (re-fitting codewords is the
  GPTVQ M-step, done before rounding them to ``int8``).

  Examples:
    >>> import jax.numpy as jnp
    >>> cb = jnp.arange(8, dtype=jnp.int8).reshape(1, 1, 4, 2)  # 4 codewords of dim 2
    >>> vq = VQArray.from_codes(jnp.array([[3], [0]]), cb, jnp.ones((1, 1), jnp.float16),
    ...                         dim=2, group_size=4, out_block=1, dtype=jnp.float32)
    >>> vq.materialize()[:, 0].tolist()
    [6.0, 7.0, 0.0, 1.0]
  """

  codes: jax.Array
  codebook: jax.Array
  scale: jax.Array
  dim: int = dataclasses.field(metadata=dict(static=True), kw_only=True)
  code_bits: int = dataclasses.field(metadata=dict(static=True), kw_only=True)
  group_size: int = dataclasses.field(metadata=dict(static=True), kw_only=True)
  out_block: int = dataclasses.field(metadata=dict(static=True), kw_only=True)
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), kw_only=True)
  dtype: Any = dataclasses.field(metadata=dict(static=True), kw_only=True)

  trainable: ClassVar[tuple[str, ...]] = ("scale",)

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    for f in ("dim", "code_bits", "group_size", "out_block"):
      object.__setattr__(self, f, int(getattr(self, f)))
    if len(self.shape) != 2:
      raise ValueError(f"VQArray shape must be 2-D (K, N), got {self.shape}")
    k, n = self.shape
    if self.dim not in (1, 2, 4, 8):
      raise ValueError(f"VQArray dim must be one of (1, 2, 4, 8), got {self.dim}")
    if not 1 <= self.code_bits <= 16:
      raise ValueError(f"VQArray code_bits must be in 1..16, got {self.code_bits}")
    if self.group_size <= 0 or k % self.group_size or self.group_size % self.dim:
      raise ValueError(f"VQArray group_size={self.group_size} must divide K={k} and be a "
                       f"multiple of dim={self.dim}")
    if self.out_block <= 0 or n % self.out_block:
      raise ValueError(f"VQArray out_block={self.out_block} must divide N={n}")
    want = {"codes": self._codes_shape(),
            "codebook": (self.num_groups, self.num_out_blocks, self.entries, self.dim),
            "scale": (self.num_groups, self.num_out_blocks)}
    for name, shp in want.items():
      child = getattr(self, name)
      if _has_shape(child) and tuple(child.shape) != shp:
        raise ValueError(f"VQArray {name} must have shape {shp}, got {tuple(child.shape)}")

  def _codes_shape(self):
    v, n = self.shape[0] // self.dim, self.shape[1]
    if self.container == "packed":
      return (packing.packed_length(v, self.code_bits), n)
    return (v, n)

  @property
  def container(self) -> str:
    return code_container(self.code_bits)

  @property
  def entries(self) -> int:
    return 2**self.code_bits

  @property
  def num_groups(self) -> int:
    return self.shape[0] // self.group_size

  @property
  def num_out_blocks(self) -> int:
    return self.shape[1] // self.out_block

  @classmethod
  def from_codes(cls, codes, codebook, scale, *, dim: int, group_size: int, out_block: int,
                 dtype=jnp.float32, code_bits: int | None = None) -> "VQArray":
    """Builds the format from unpacked ``(K / dim, N)`` integer codes (``code_bits`` defaults
    to ``log2`` of the codebook's entry count)."""
    codebook = jnp.asarray(codebook, jnp.int8)
    e = codebook.shape[-2]
    cb = int(round(np.log2(e))) if code_bits is None else int(code_bits)
    if 2**cb != e:
      raise ValueError(f"VQArray codebook has {e} entries, not 2**code_bits")
    codes = jnp.asarray(codes)
    v, n = codes.shape
    kind = code_container(cb)
    if kind == "packed":
      stored = packing.pack(codes.astype(jnp.uint32), cb, axis=0)
    else:
      stored = codes.astype(jnp.uint8 if kind == "uint8" else jnp.uint16)
    return cls(stored, codebook, jnp.asarray(scale), dim=dim, code_bits=cb,
               group_size=group_size, out_block=out_block, shape=(v * dim, n), dtype=dtype)

  def code_values(self) -> jax.Array:
    """The ``(K / dim, N)`` codes as ``int32``."""
    v = self.shape[0] // self.dim
    if self.container == "packed":
      return packing.unpack(self.codes, self.code_bits, v, axis=0).astype(jnp.int32)
    return self.codes.astype(jnp.int32)

  def centroids(self) -> jax.Array:
    """Decoded codebooks ``(Gk, Gn, E, dim)`` in the accumulation dtype."""
    acc = base.accumulation_dtype(self.dtype)
    return self.codebook.astype(acc) * self.scale.astype(acc)[..., None, None]

  def materialize(self) -> jax.Array:
    Gk, Gn, E, d = self.codebook.shape
    V, N = self.shape[0] // self.dim, self.shape[1]
    c = self.code_values().reshape(Gk, V // Gk, Gn, self.out_block)
    base_idx = (jnp.arange(Gk)[:, None, None, None] * Gn
                + jnp.arange(Gn)[None, None, :, None]) * E
    vals = jnp.take(self.centroids().reshape(Gk * Gn * E, d), base_idx + c, axis=0)
    return vals.transpose(0, 1, 4, 2, 3).reshape(self.shape).astype(self.dtype)

  def __repr__(self):
    return (f"VQArray(shape={self.shape}, dtype={self.dtype.name}, dim={self.dim}, "
            f"code_bits={self.code_bits}, group_size={self.group_size}, "
            f"out_block={self.out_block})")


def vq_matmul_decode(x: jax.Array, w: VQArray) -> jax.Array:
  """``x @ w.materialize()`` (decode the dense weight, then one matmul)."""
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  wd = w.materialize().astype(acc)
  return jnp.matmul(x.astype(acc), wd, preferred_element_type=acc).astype(out_dtype)


def vq_matmul_lut(x: jax.Array, w: VQArray) -> jax.Array:
  """``x @ W`` through a lookup table of activation-codeword products (no dense ``W``).

  ``lut[m, v, h, e] = x[m, v*d : (v+1)*d] . C[g(v), h, e]``; then
  ``y[m, h*ob + o] = sum_v lut[m, v, h, codes[v, h*ob + o]]``.
  """
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  K, N = w.shape
  d, ob = w.dim, w.out_block
  Gk, Gn, E, _ = w.codebook.shape
  lead = x.shape[:-1]
  xm = x.reshape(-1, Gk, K // Gk // d, d).astype(acc)  # (M, Gk, vpg, d)
  lut = jnp.einsum("mgvd,ghed->gvhme", xm, w.centroids())  # (Gk, vpg, Gn, M, E)
  lut = lut.reshape(K // d, Gn, -1, E)
  codes = w.code_values().reshape(K // d, Gn, 1, ob)
  y = jnp.take_along_axis(lut, jnp.broadcast_to(codes, (K // d, Gn, lut.shape[2], ob)),
                          axis=-1)  # (V, Gn, M, ob)
  y = jnp.sum(y, axis=0).transpose(1, 0, 2).reshape(*lead, N)
  return y.astype(out_dtype)


def _prepare_vq_rows(w: VQArray):
  """Tile decoder: the tile's codes index the flattened scaled codebooks."""
  k, n = w.shape
  gk, gn, e, d = w.codebook.shape
  cent = w.centroids().reshape(gk * gn * e, d)

  def decode(start, size, dtype):
    v0, nv = start // d, size // d
    if w.container == "packed":
      codes = packing.unpack_rows(w.codes, w.code_bits, v0, nv).astype(jnp.int32)
    else:
      codes = jax.lax.dynamic_slice_in_dim(w.codes, v0, nv, axis=0).astype(jnp.int32)
    g = (start + d * jnp.arange(nv, dtype=jnp.int32)) // w.group_size
    h = jnp.arange(n, dtype=jnp.int32) // w.out_block
    vals = jnp.take(cent, (g[:, None] * gn + h[None, :]) * e + codes, axis=0)  # (nv, N, d)
    return jnp.swapaxes(vals, 1, 2).reshape(size, n).astype(dtype)

  return decode


def _vq_alignment(w: VQArray) -> int:
  return w.dim * (packing.row_alignment(w.code_bits) if w.container == "packed" else 1)


def vq_matmul_tiled(x: jax.Array, w: VQArray) -> jax.Array:
  """``x @ W`` tiled over ``K`` (:func:`compressjax.formats.tiled.tiled_dot`): each tile of codes
  is decoded through the codebooks and multiplied; no ``(K, N)`` weight is formed."""
  return tiled.tiled_dot(x, w)


def vq_matmul_xla(x: jax.Array, w: VQArray) -> jax.Array:
  """Pure-jnp ``x @ W``: the lookup-table path for at most :data:`LUT_MAX_ROWS` rows, else the
  tiled decode (:func:`vq_matmul_tiled`). Neither builds the dense weight."""
  rows = int(np.prod(x.shape[:-1], dtype=np.int64))
  if rows <= LUT_MAX_ROWS:
    return vq_matmul_lut(x, w)
  return vq_matmul_tiled(x, w)


tiled.register_rows_decoder(VQArray, _prepare_vq_rows, _vq_alignment)


jax.tree_util.register_dataclass(
    VQArray, data_fields=["codes", "codebook", "scale"],
    meta_fields=["dim", "code_bits", "group_size", "out_block", "shape", "dtype"])
dispatch.register_matmul(VQArray, "xla", vq_matmul_xla, priority=dispatch.FALLBACK_PRIORITY)
