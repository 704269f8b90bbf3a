"""Group-wise integer quantization with bit-packed codes (:class:`QuantizedArray`)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats import packing
from compressjax.formats import tiled

__all__ = ["QUANTIZED_BITS", "QuantizedArray", "dequantize", "valid_group_sizes"]

#: Code widths a :class:`QuantizedArray` may use.
QUANTIZED_BITS = (2, 3, 4, 8)


def _check_bits(bits: Any) -> None:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or (
      int(bits) not in QUANTIZED_BITS):
    raise ValueError(f"bits must be one of {QUANTIZED_BITS}, got bits={bits!r}.")


def valid_group_sizes(k: int) -> list[int]:
  """Returns the group sizes that divide ``k`` (the valid ``group_size`` values).

  Examples:
    >>> valid_group_sizes(96)
    [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96]
  """
  small = [d for d in range(1, int(k**0.5) + 1) if k % d == 0]
  return sorted(set(small + [k // d for d in small]))


def _check_group_size(group_size: Any, k: int) -> None:
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or (
      group_size <= 0 or k % group_size):
    raise ValueError(
        f"group_size must be a positive divisor of K={k}, got group_size={group_size!r}; "
        f"valid group sizes are {valid_group_sizes(k)} (group_size=K={k} is per-channel).")


def dequantize(codes: jax.Array, scale: jax.Array, zero: jax.Array | None, *, bits: int,
               symmetric: bool) -> jax.Array:
  """Maps integer codes to weights, in ``float32`` (or wider if the inputs are wider).

  ``codes``, ``scale`` and ``zero`` must broadcast together (e.g. grouped codes
  ``(G, gs, N)`` with ``scale[:, None, :]``).

  * symmetric: ``w = scale * (q - 2**(bits-1))``;
  * asymmetric: ``w = scale * q + zero``.

  Examples:
    >>> import jax.numpy as jnp
    >>> dequantize(jnp.array([0, 8, 15]), jnp.array(0.5), None, bits=4, symmetric=True).tolist()
    [-4.0, 0.0, 3.5]
    >>> dequantize(jnp.array([0, 15]), jnp.array(0.5), jnp.array(-1.0), bits=4,
    ...            symmetric=False).tolist()
    [-1.0, 6.5]
  """
  ctype = base.accumulation_dtype(scale.dtype, *(() if zero is None else (zero.dtype,)))
  q = codes.astype(ctype)
  s = scale.astype(ctype)
  if symmetric:
    return s * (q - 2.0**(bits - 1))
  return s * q + zero.astype(ctype)


def _dense(x: Any) -> jax.Array:
  return x.materialize() if isinstance(x, base.CompressedArray) else x


def _has_shape(x: Any) -> bool:
  return isinstance(getattr(x, "shape", None), tuple) and hasattr(x, "dtype")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class QuantizedArray(base.CompressedArray):
  """A ``(K, N)`` weight stored as group-wise integer codes packed into ``uint32``.

  Groups of ``group_size`` consecutive rows along ``K`` (the input dimension)
  share one scale (and one zero for the asymmetric form) per output column.
  Codes ``q`` are unsigned integers in ``[0, 2**bits)`` and decode as

  * symmetric: ``w[k, n] = scale[k // group_size, n] * (q[k, n] - 2**(bits-1))``;
  * asymmetric: ``w[k, n] = scale[k // group_size, n] * q[k, n] + zero[k // group_size, n]``
    (``zero`` is a float offset in the weight domain, as llama.cpp ``Q4_1``/HQQ,
    so ``Q4_1`` tensors are represented exactly).

  Invariants (``K, N = shape``, ``G = K // group_size``):

  * ``bits in (2, 3, 4, 8)``; ``len(shape) == 2``; ``group_size`` divides
    ``K`` (per-channel is ``group_size == K``).
  * ``packed``: ``uint32``, shape ``(packing.packed_length(K, bits), N)``: the codes packed
    along ``K`` by :func:`compressjax.formats.packing.pack`, LSB first, ``32 // bits`` codes
    per word (3-bit codes: 10 per word, bits 30-31 unused, ``ceil(K / 10)`` words, i.e. 3.2
    bits per code; other widths: ``ceil(K / 32) * bits`` words); padding codes are 0. 3-bit
    checkpoints of :data:`compressjax.formats.packing.LAYOUT_VERSION` 1 (a straddling
    bitstream) are converted when restored.
  * ``scale``: floating, shape ``(G, N)``: an array, or itself a compressed leaf of that
    logical shape (SpQR's bilevel statistics: a :class:`~compressjax.formats.Transposed`
    ``QuantizedArray``); :meth:`scale_values` decodes it.
  * ``zero``: ``None`` iff ``symmetric``; otherwise floating, shape ``(G, N)`` (array or
    compressed leaf, as ``scale``).
  * ``dtype`` is the dtype :meth:`materialize` returns; decoding itself runs
    in ``float32``.

  Children (``packed``, ``scale``, ``zero``) are pytree leaves; ``bits``,
  ``group_size``, ``shape``, ``symmetric`` and ``dtype`` are static metadata.
  Construct with :meth:`from_codes` (which validates everything) or a quantizer
  such as :func:`compressjax.quantize.quantize_rtn`. The constructor checks the
  static metadata and the trailing two dimensions of children that have a shape;
  it does not check children that are placeholders (``None``, ``object()``),
  which JAX uses when it unflattens trees, nor leading (stacked/batched) dims.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> codes = jnp.full((64, 3), 9, jnp.uint8)
    >>> scale = jnp.full((2, 3), 0.5, jnp.float16)
    >>> qa = QuantizedArray.from_codes(codes, scale, None, bits=4, group_size=32,
    ...                                symmetric=True, dtype=jnp.float32)
    >>> qa
    QuantizedArray(shape=(64, 3), dtype=float32, bits=4, group_size=32, symmetric=True)
    >>> qa.packed.shape, qa.nbytes, qa.bits_per_param
    ((8, 3), 108, 4.5)
    >>> qa.materialize()[0].tolist()
    [0.5, 0.5, 0.5]
    >>> leaves, treedef = jax.tree_util.tree_flatten(qa)
    >>> [leaf.shape for leaf in leaves]
    [(8, 3), (2, 3)]

  References:
    Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers", ICLR 2023, arXiv:2210.17323 (grouped symmetric
    codes). llama.cpp ``ggml-quants.c`` (``block_q4_1``: ``w = d * q + m``).
  """

  # The grid (scale, zero) may be tuned; codes stay fixed. A compressed scale declares its own.
  trainable: ClassVar[tuple[str, ...]] = ("scale", "zero")

  packed: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  bits: int = dataclasses.field(metadata=dict(static=True), kw_only=True)
  group_size: int = dataclasses.field(metadata=dict(static=True), kw_only=True)
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), kw_only=True)
  symmetric: bool = dataclasses.field(metadata=dict(static=True), kw_only=True)
  dtype: Any = dataclasses.field(metadata=dict(static=True), kw_only=True)

  def __post_init__(self):
    # Normalize static metadata so that equal metadata hashes equally.
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    if not isinstance(self.symmetric, (bool, np.bool_)):
      raise ValueError(f"symmetric must be a bool, got symmetric={self.symmetric!r}.")
    object.__setattr__(self, "symmetric", bool(self.symmetric))
    _check_bits(self.bits)
    object.__setattr__(self, "bits", int(self.bits))
    if len(self.shape) != 2:
      raise ValueError(f"shape must be 2-D (K, N), got shape={self.shape}.")
    k, n = self.shape
    _check_group_size(self.group_size, k)
    object.__setattr__(self, "group_size", int(self.group_size))
    # Children: only check real arrays / tracers / ShapeDtypeStructs, and only
    # their trailing two dims (leading dims may come from stacking or vmap).
    expected = {
        "packed": (packing.packed_length(k, self.bits), n),
        "scale": (self.num_groups, n),
        "zero": (self.num_groups, n),
    }
    for name, want in expected.items():
      child = getattr(self, name)
      if _has_shape(child) and len(child.shape) >= 2 and child.shape[-2:] != want:
        raise ValueError(
            f"{name} must have shape {want} for shape={self.shape}, bits={self.bits}, "
            f"group_size={self.group_size}; got {name}.shape={child.shape}.")

  def __repr__(self) -> str:
    return (f"QuantizedArray(shape={self.shape}, dtype={self.dtype.name}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric})")

  @property
  def num_groups(self) -> int:
    """Number of groups along ``K``: ``K // group_size``."""
    return self.shape[0] // self.group_size

  @classmethod
  def from_codes(cls, codes: jax.Array, scale: jax.Array, zero: jax.Array | None, *, bits: int,
                 group_size: int, symmetric: bool,
                 dtype: Any = jnp.float32) -> "QuantizedArray":
    """Packs unpacked codes and builds a validated :class:`QuantizedArray`.

    Args:
      codes: integer codes of shape ``(K, N)`` with values in ``[0, 2**bits)``
        (the range is not checked; see :func:`~compressjax.formats.packing.pack`).
      scale: floating scales of shape ``(K // group_size, N)``.
      zero: ``None`` if ``symmetric``, else floating offsets shaped like ``scale``.
      bits: code width, one of ``(2, 3, 4, 8)``.
      group_size: rows per group along ``K``; must divide ``K``.
      symmetric: which decoding formula applies (see the class docstring).
      dtype: logical dense dtype returned by :meth:`materialize`.

    Returns:
      The packed :class:`QuantizedArray`.

    Raises:
      ValueError: naming the offending parameter and what was expected.
    """
    _check_bits(bits)
    if not _has_shape(codes) or len(codes.shape) != 2:
      raise ValueError(f"codes must be a 2-D (K, N) array, got shape "
                       f"{getattr(codes, 'shape', None)}.")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
      raise ValueError(f"codes must have an integer dtype, got {codes.dtype}.")
    k, n = codes.shape
    _check_group_size(group_size, k)
    want = (k // group_size, n)
    if not _has_shape(scale) or tuple(scale.shape) != want:
      raise ValueError(f"scale must have shape (K // group_size, N) = {want}, got "
                       f"{getattr(scale, 'shape', None)}.")
    if not jnp.issubdtype(scale.dtype, jnp.floating):
      raise ValueError(f"scale must have a floating dtype, got {scale.dtype}.")
    if symmetric:
      if zero is not None:
        raise ValueError("zero must be None when symmetric=True.")
    else:
      if zero is None:
        raise ValueError(f"zero is required when symmetric=False: expected an array of "
                         f"shape {want}, got None.")
      if not _has_shape(zero) or tuple(zero.shape) != want:
        raise ValueError(f"zero must have shape (K // group_size, N) = {want}, got "
                         f"{getattr(zero, 'shape', None)}.")
      if not jnp.issubdtype(zero.dtype, jnp.floating):
        raise ValueError(f"zero must have a floating dtype, got {zero.dtype}.")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"dtype must be a floating dtype, got dtype={dtype!r}.")
    return cls(packing.pack(codes, bits, axis=0), scale, zero, bits=bits, group_size=group_size,
               shape=(k, n), symmetric=symmetric, dtype=dtype)

  def codes(self) -> jax.Array:
    """Returns the unpacked ``(K, N)`` ``uint8`` codes."""
    return packing.unpack(self.packed, self.bits, self.shape[0], axis=0)

  def grouped_codes(self) -> jax.Array:
    """Returns the codes reshaped to ``(K // group_size, group_size, N)``."""
    k, n = self.shape
    return self.codes().reshape(self.num_groups, self.group_size, n)

  def scale_values(self) -> jax.Array:
    """The ``(G, N)`` scales as an array (decoded when they are themselves compressed)."""
    return _dense(self.scale)

  def zero_values(self) -> jax.Array | None:
    """The ``(G, N)`` zeros as an array (``None`` when symmetric)."""
    return None if self.zero is None else _dense(self.zero)

  def materialize(self) -> jax.Array:
    """Returns the dense ``(K, N)`` weight in ``dtype`` (decoded in ``float32``)."""
    zero = None if self.zero is None else self.zero_values()[:, None, :]
    w = dequantize(self.grouped_codes(), self.scale_values()[:, None, :], zero, bits=self.bits,
                   symmetric=self.symmetric)
    return w.reshape(self.shape).astype(self.dtype)


def _prepare_rows(w: QuantizedArray):
  """Tile decoder: unpacks only the words of the tile and its groups' statistics."""
  scale = w.scale_values()
  zero = w.zero_values()

  def decode(start, size, dtype):
    codes = packing.unpack_rows(w.packed, w.bits, start, size)
    s = tiled.group_rows(scale, start, size, w.group_size)
    z = None if zero is None else tiled.group_rows(zero, start, size, w.group_size)
    return dequantize(codes, s, z, bits=w.bits, symmetric=w.symmetric).astype(dtype)

  return decode


tiled.register_rows_decoder(QuantizedArray, _prepare_rows,
                            lambda w: packing.row_alignment(w.bits))

jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["packed", "scale", "zero"],
    meta_fields=["bits", "group_size", "shape", "symmetric", "dtype"],
)
