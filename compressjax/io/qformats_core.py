"""Exact maps between :class:`QuantizedArray` and public packed-integer layouts: pure numpy.

No files, configs or trees here (those live in :mod:`compressjax.io.export`); only functions
of one ``(K, N)`` quantized weight (ours: ``(in, out)``; Hugging Face's: ``(out, in)``).

Both public layouts decode a weight as ``w = scale * (q - z)`` with an **integer** zero point
``z`` in the unsigned code domain ``[0, 2**bits)``:

* ours, symmetric: ``w = scale * (q - 2**(bits-1))``, so ``z = 2**(bits-1)`` exactly;
* ours, asymmetric: ``w = scale * q + zero`` with a float ``zero``; this is the public form
  exactly when ``zero == -scale * z`` for an integer ``z`` (checked bit for bit in
  ``float32``, see :func:`integer_zero_points`). RTN/GPTQ/AWQ here store ``zero = min`` (the
  llama.cpp ``Q4_1`` form), which generally is *not* on that grid;
  :func:`snap_zero_points` moves it there (lossy, by at most ``scale / 2`` per weight).

compressed-tensors ``pack-quantized`` (``PackedQuantizationCompressor``): ``weight_packed``
``int32 (N, ceil(K / (32 // bits)))``: signed codes ``q - 2**(bits-1)`` offset back to unsigned
and packed little-endian, ``32 // bits`` consecutive codes per word, along the input dim -- the
same words as :mod:`compressjax.formats.packing` (whose 3-bit layout is also 10 codes per
word), along the other axis; ``weight_scale`` ``(N, G)``; asymmetric ``weight_zero_point``
``int32 (ceil(N / (32 // bits)), G)``: signed zero points offset to unsigned (which is our ``z``) packed
along the output dim; ``weight_shape`` ``int64 [N, K]``.

GPTQ (AutoGPTQ / GPTQModel ``qweight``/``qzeros``/``scales``/``g_idx``): ``qweight`` ``int32
(K * bits / 32, N)`` = our packed words (same bitstream, same axis; 2, 4 and 8 bits only); ``qzeros`` ``int32 (G, N * bits / 32)``: ``z`` packed along ``N``;
``scales`` ``(G, N)``; ``g_idx`` ``int32 (K,)`` = ``k // group_size``. On disk the
``checkpoint_format`` ``"gptq"`` (v1, what transformers/optimum/GPTQModel read by default)
stores ``qzeros`` minus one in every field, computed -- as GPTQModel's
``convert_gptq_v2_to_v1_format`` does -- as one ``int32`` subtraction of the constant word
``0x11111111`` (4-bit; ``0x55555555`` 2-bit, ``0x01010101`` 8-bit), which GPTQModel's loader
undoes by adding it back, so the round trip is exact even for ``z = 0`` (whose field borrows
from its neighbour). Readers that instead add one per unpacked field (old AutoGPTQ kernels)
misread ``z = 0``: the historical v1 zero-point bug. ``"gptq_v2"`` stores ``z`` as is.

References:
  compressed-tensors 0.20.0, ``compressors/pack_quantized/{base,helpers}.py``
  (``pack_to_int32``, ``unpack_from_int32``) and ``quantization/lifecycle/forward.py``
  (``dequantize``: ``(x_q - zero_point) * scale``).
  GPTQModel 7.7.0, ``nn_modules/qlinear/__init__.py`` (``dequantize_weight``:
  ``scales[g_idx] * (weight - zeros[g_idx])``) and ``utils/model.py``
  (``convert_gptq_v1_to_v2_format_module``, ``convert_gptq_v2_to_v1_format_module``).
  Frantar et al., "GPTQ", ICLR 2023, arXiv:2210.17323.
"""

from __future__ import annotations


import numpy as np

from compressjax.formats import packing
from compressjax.formats.quantized import QuantizedArray

__all__ = [
    "GPTQ_V1_OFFSET",
    "ct_pack",
    "ct_unpack",
    "from_codes_and_zero_points",
    "gptq_pack",
    "gptq_unpack",
    "integer_zero_points",
    "snap_zero_points",
]

#: The per-word constant GPTQ v1 subtracts from packed ``qzeros`` (``bits -> word``).
GPTQ_V1_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


def _pack_u32(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """:func:`compressjax.formats.packing.pack` in plain numpy (no compilation per shape).

  Widths in :data:`~compressjax.formats.packing.PER_WORD_BITS` (3) hold ``32 // bits`` codes
  per word (the layout of compressed-tensors' ``pack_to_int32``); the others a bitstream.
  """
  c = np.moveaxis(np.asarray(codes, np.uint64), axis, 0)
  length = c.shape[0]
  if bits in packing.PER_WORD_BITS:
    per = packing.codes_per_word(bits)
    n = -(-length // per)
    c = np.concatenate([c, np.zeros((n * per - length,) + c.shape[1:], np.uint64)])
    c = c.reshape((n, per) + c.shape[1:])
    words = np.zeros((n,) + c.shape[2:], np.uint64)
    for i in range(per):
      words |= c[:, i] << np.uint64(i * bits)
    return np.moveaxis(words.astype(np.uint32), 0, axis)
  padded = packing.packed_length(length, bits) * 32 // bits
  c = np.concatenate([c, np.zeros((padded - length,) + c.shape[1:], np.uint64)])
  c = c.reshape((padded // 32, 32) + c.shape[1:])
  words = np.zeros((padded // 32, bits) + c.shape[2:], np.uint64)
  for i in range(32):
    start = i * bits
    w, off = divmod(start, 32)
    words[:, w] |= (c[:, i] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
    if off + bits > 32:
      words[:, w + 1] |= c[:, i] >> np.uint64(32 - off)
  words = words.reshape((padded // 32 * bits,) + c.shape[2:]).astype(np.uint32)
  return np.moveaxis(words, 0, axis)


def _unpack_u8(words: np.ndarray, bits: int, length: int, axis: int) -> np.ndarray:
  """:func:`compressjax.formats.packing.unpack` in plain numpy."""
  w = np.moveaxis(np.asarray(words, np.uint64), axis, 0)
  if bits in packing.PER_WORD_BITS:
    per = packing.codes_per_word(bits)
    mask = np.uint64(2**bits - 1)
    out = np.stack([(w >> np.uint64(i * bits)) & mask for i in range(per)], axis=1)
    out = out.reshape((w.shape[0] * per,) + w.shape[1:])[:length].astype(np.uint8)
    return np.moveaxis(out, 0, axis)
  blocks = w.shape[0] // bits
  w = w.reshape((blocks, bits) + w.shape[1:])
  mask = np.uint64(2**bits - 1)
  out = np.zeros((blocks, 32) + w.shape[2:], np.uint8)
  for i in range(32):
    start = i * bits
    j, off = divmod(start, 32)
    v = w[:, j] >> np.uint64(off)
    if off + bits > 32:
      v |= w[:, j + 1] << np.uint64(32 - off)
    out[:, i] = (v & mask).astype(np.uint8)
  out = out.reshape((blocks * 32,) + w.shape[2:])[:length]
  return np.moveaxis(out, 0, axis)


def _ct_words(length: int, bits: int) -> int:
  """int32 words of ``length`` codes in compressed-tensors' ``pack_to_int32``: ``32 // bits``
  codes per word (``ceil(length * bits / 32)`` for 2, 4 and 8 bits; ``ceil(length / 10)`` for 3)."""
  return -(-int(length) // (32 // int(bits)))


def _pad_words(words: np.ndarray, want: int, axis: int) -> np.ndarray:
  pad = want - words.shape[axis]
  if pad < 0:
    raise ValueError(f"packed words: {words.shape[axis]} along axis {axis}, expected <= {want}")
  widths = [(0, 0)] * words.ndim
  widths[axis] = (0, pad)
  return np.pad(words, widths)


def integer_zero_points(qa: QuantizedArray, where: str = "weight") -> np.ndarray:
  """The integer zero points ``z`` (``(G, N)`` ``uint8``) with ``w = scale * (q - z)``.

  Symmetric arrays give ``2**(bits-1)``. Asymmetric arrays must satisfy, bit for bit in
  ``float32``, ``zero == -(scale * z)`` with ``0 <= z < 2**bits`` (groups with ``scale == 0``
  need ``zero == 0``, and get ``z = 0``).

  Raises:
    ValueError: naming ``where``, when ``zero`` is not on that integer grid (e.g. RTN's
      ``zero = min``; see :func:`snap_zero_points`) or ``scale`` is itself compressed.
  """
  g, n = qa.num_groups, qa.shape[1]
  if qa.symmetric:
    return np.full((g, n), 2**(qa.bits - 1), np.uint8)
  if not hasattr(qa.scale, "dtype") or not hasattr(qa.zero, "dtype") or hasattr(
      qa.scale, "materialize") or hasattr(qa.zero, "materialize"):
    raise ValueError(f"{where}: scale/zero are compressed leaves (bilevel statistics, as SpQR's); "
                     "public integer formats store plain scales")
  s = np.asarray(qa.scale, np.float32)
  zero = np.asarray(qa.zero, np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    z = np.where(s != 0, np.rint(-zero / np.where(s != 0, s, 1)), 0.0)
  ok = (z >= 0) & (z < 2**qa.bits) & (np.float32(-1) * (s * z.astype(np.float32)) == zero)
  ok |= (s == 0) & (zero == 0)
  if not ok.all():
    bad = np.argwhere(~ok)[0]
    raise ValueError(
        f"{where}: asymmetric zero is not an integer zero point: group {tuple(bad)} has "
        f"zero={zero[tuple(bad)]!r}, scale={s[tuple(bad)]!r} (zero / -scale = "
        f"{-zero[tuple(bad)] / s[tuple(bad)] if s[tuple(bad)] else float('nan')!r}); "
        "compressed-tensors and GPTQ store w = scale * (q - z) with an integer z. Quantize "
        "symmetrically, or convert with compressjax.io.export.snap_zero_points (moves each "
        "group's offset by at most scale/2), or export to GGUF Q4_1 / dense save_hf, which keep "
        "a float offset")
  return z.astype(np.uint8)


def snap_zero_points(qa: QuantizedArray) -> QuantizedArray:
  """Moves an asymmetric ``zero`` onto the integer grid ``zero = -scale * round(-zero/scale)``.

  Codes and scales are unchanged; each group's decoded weights shift by the same amount, at
  most ``scale / 2``. The new ``zero`` is ``float32`` (``-scale * z`` is exact there for
  ``float16``/``bfloat16`` scales). Symmetric arrays are returned unchanged.

  Raises:
    ValueError: a constant group (``scale == 0``, ``zero != 0``), or ``-zero/scale`` outside
      ``[0, 2**bits - 1]`` by more than a half step.
  """
  if qa.symmetric:
    return qa
  s = np.asarray(qa.scale, np.float32)
  zero = np.asarray(qa.zero, np.float32)
  if np.any((s == 0) & (zero != 0)):
    raise ValueError("snap_zero_points: a group has scale == 0 and zero != 0 (a constant group), "
                     "which w = scale * (q - z) cannot represent")
  with np.errstate(divide="ignore", invalid="ignore"):
    zf = np.where(s != 0, -zero / np.where(s != 0, s, 1), 0.0)
  z = np.rint(zf)
  top = 2**qa.bits - 1
  if np.any(z < 0) or np.any(z > top):
    raise ValueError(f"snap_zero_points: -zero/scale outside [0, {top}] (min {zf.min()}, "
                     f"max {zf.max()}): zero is not inside the grid's range")
  new_zero = np.float32(-1) * (s * z.astype(np.float32))
  return QuantizedArray(qa.packed, qa.scale, np.asarray(new_zero, np.float32), bits=qa.bits,
                        group_size=qa.group_size, shape=qa.shape, symmetric=False, dtype=qa.dtype)


def from_codes_and_zero_points(packed: np.ndarray, scale: np.ndarray, z: np.ndarray | None, *,
                               bits: int, group_size: int, shape: tuple[int, int],
                               dtype) -> QuantizedArray:
  """Builds the :class:`QuantizedArray` decoding ``scale * (q - z)`` exactly.

  ``packed`` holds the codes ``q`` in our layout (``uint32``, packed along ``K``).

  ``z is None`` gives the symmetric array (``z = 2**(bits-1)``); otherwise ``zero = -(scale * z)`` in ``float32`` (exact for ``float16``/``bfloat16``
  scales and ``z < 256``).
  """
  if not np.issubdtype(np.asarray(scale).dtype, np.floating):
    raise ValueError(f"scale must be floating, got {np.asarray(scale).dtype}")
  kw = dict(bits=bits, group_size=group_size, shape=shape, dtype=dtype)
  packed = np.ascontiguousarray(packed, np.uint32)
  if z is None:
    return QuantizedArray(packed, scale, None, symmetric=True, **kw)
  zero = np.float32(-1) * (np.asarray(scale, np.float32) * np.asarray(z, np.float32))
  return QuantizedArray(packed, scale, np.asarray(zero, np.float32), symmetric=False, **kw)


# --------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized
# --------------------------------------------------------------------------------------------


def ct_pack(qa: QuantizedArray, where: str = "weight") -> dict[str, np.ndarray]:
  """``{weight_packed, weight_scale, weight_zero_point?, weight_shape}`` of ``qa`` (HF layout).

  ``weight_zero_point`` is present only for asymmetric arrays. ``weight_scale`` keeps
  ``qa.scale``'s dtype.
  """
  k, n = qa.shape
  z = integer_zero_points(qa, where)
  # Same bitstream per output column as ours: the words are our packed words, transposed.
  words = np.asarray(qa.packed, np.uint32).T[:, :_ct_words(k, qa.bits)]
  out = {"weight_packed": np.ascontiguousarray(words).view(np.int32),
         "weight_scale": np.ascontiguousarray(np.asarray(qa.scale).T)}
  if not qa.symmetric:
    zw = _pack_u32(np.ascontiguousarray(z.T), qa.bits, axis=0)[:_ct_words(n, qa.bits)]
    out["weight_zero_point"] = np.ascontiguousarray(zw).view(np.int32)
  out["weight_shape"] = np.asarray([n, k], np.int64)
  return out


def ct_unpack(tensors: dict[str, np.ndarray], *, bits: int, group_size: int | None,
              symmetric: bool, dtype, where: str = "weight") -> QuantizedArray:
  """Inverse of :func:`ct_pack`: a ``QuantizedArray`` decoding exactly what the files hold.

  Args:
    tensors: ``weight_packed``, ``weight_scale``, ``weight_shape`` and, if not ``symmetric``,
      ``weight_zero_point`` (numpy arrays as read from safetensors).
    bits: ``num_bits``.
    group_size: the group size, ``None`` for the ``channel`` strategy.
    symmetric: the scheme's ``symmetric``.
    dtype: logical dtype of the result.
    where: quoted in errors.
  """
  for name in ("weight_packed", "weight_scale", "weight_shape") + (
      () if symmetric else ("weight_zero_point",)):
    if name not in tensors:
      raise ValueError(f"{where}: tensor {name!r} missing for a "
                       f"{'symmetric' if symmetric else 'asymmetric'} pack-quantized module")
  n, k = (int(v) for v in np.asarray(tensors["weight_shape"]).reshape(-1))
  gs = k if group_size is None else int(group_size)
  if k % gs:
    raise ValueError(f"{where}: group_size {gs} does not divide in_features {k}")
  g = k // gs
  packed = np.asarray(tensors["weight_packed"])
  want_p = (n, _ct_words(k, bits))
  scale = np.asarray(tensors["weight_scale"])
  if packed.dtype != np.int32 or packed.shape != want_p:
    raise ValueError(f"{where}: weight_packed is {packed.dtype}{packed.shape}, expected "
                     f"int32{want_p} for weight_shape [{n}, {k}], num_bits={bits}")
  if scale.shape != (n, g):
    raise ValueError(f"{where}: weight_scale has shape {scale.shape}, expected {(n, g)}")
  words = _pad_words(packed.view(np.uint32), packing.packed_length(k, bits), axis=1)
  if np.any(_unpack_u8(words[:, -bits:], bits, 32, axis=1)[:, (k - 1) % 32 + 1:]):
    raise ValueError(f"{where}: weight_packed has nonzero bits past in_features={k}")
  z = None
  if not symmetric:
    zp = np.asarray(tensors["weight_zero_point"])
    want_z = (_ct_words(n, bits), g)
    if zp.dtype != np.int32 or zp.shape != want_z:
      raise ValueError(f"{where}: weight_zero_point is {zp.dtype}{zp.shape}, expected "
                       f"int32{want_z} (packed along the output dim)")
    zw = _pad_words(zp.view(np.uint32), packing.packed_length(n, bits), axis=0)
    z = _unpack_u8(zw, bits, n, axis=0).T  # (G, N)
  return from_codes_and_zero_points(words.T, np.ascontiguousarray(scale.T), z, bits=bits,
                                    group_size=gs, shape=(k, n), dtype=dtype)


# --------------------------------------------------------------------------------------------
# GPTQ qweight / qzeros / scales / g_idx
# --------------------------------------------------------------------------------------------


def _check_gptq_shape(k: int, n: int, bits: int, where: str) -> None:
  if bits not in GPTQ_V1_OFFSET:
    raise ValueError(f"{where}: bits={bits}: GPTQ export supports bits 2, 4, 8 (3-bit GPTQ "
                     "v1 zero points use a per-field correction not implemented here); "
                     "compressed-tensors pack-quantized stores 3-bit exactly")
  if (k * bits) % 32 or (n * bits) % 32:
    raise ValueError(f"{where}: GPTQ packs 32 // bits values per int32 along both dims; "
                     f"in={k}, out={n} with bits={bits} do not fill whole words")


def gptq_pack(qa: QuantizedArray, *, checkpoint_format: str = "gptq",
              where: str = "weight") -> dict[str, np.ndarray]:
  """``{qweight, qzeros, scales, g_idx}`` of ``qa`` (see the module docstring)."""
  k, n = qa.shape
  _check_gptq_shape(k, n, qa.bits, where)
  z = integer_zero_points(qa, where)  # (G, N)
  qweight = np.asarray(qa.packed, np.uint32)[:k * qa.bits // 32]
  qzeros = _pack_u32(z, qa.bits, axis=1)[:, :n * qa.bits // 32]
  if checkpoint_format == "gptq":
    qzeros = (qzeros.astype(np.uint64) - GPTQ_V1_OFFSET[qa.bits]) % 2**32
  elif checkpoint_format != "gptq_v2":
    raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
  return {"qweight": np.ascontiguousarray(qweight).view(np.int32),
          "qzeros": np.ascontiguousarray(qzeros.astype(np.uint32)).view(np.int32),
          "scales": np.ascontiguousarray(np.asarray(qa.scale)),
          "g_idx": (np.arange(k) // qa.group_size).astype(np.int32)}


def gptq_unpack(tensors: dict[str, np.ndarray], *, bits: int, sym: bool, in_features: int,
                out_features: int, checkpoint_format: str = "gptq", dtype=np.float32,
                where: str = "weight") -> QuantizedArray:
  """Inverse of :func:`gptq_pack` for contiguous groups (``g_idx[k] == k // group_size``).

  Raises:
    ValueError: a missing tensor, a wrong shape, or an act-order ``g_idx`` whose groups are not
      contiguous ranges of input rows (a :class:`QuantizedArray` stores contiguous groups), or
      a symmetric checkpoint whose zero points are not ``2**(bits-1)``.
  """
  k, n = in_features, out_features
  _check_gptq_shape(k, n, bits, where)
  for name in ("qweight", "qzeros", "scales"):
    if name not in tensors:
      raise ValueError(f"{where}: GPTQ tensor {name!r} missing")
  scales = np.asarray(tensors["scales"])
  g = scales.shape[0]
  if scales.ndim != 2 or scales.shape[1] != n or k % g:
    raise ValueError(f"{where}: scales has shape {scales.shape}, expected (G, {n}) with G "
                     f"dividing in_features={k}")
  gs = k // g
  g_idx = tensors.get("g_idx")
  if g_idx is not None and not np.array_equal(np.asarray(g_idx), np.arange(k) // gs):
    raise ValueError(f"{where}: g_idx is not k // group_size ({gs}): an act-order (desc_act) "
                     "checkpoint with non-contiguous groups, which QuantizedArray cannot hold "
                     "without a permutation")
  qweight = np.asarray(tensors["qweight"])
  qzeros = np.asarray(tensors["qzeros"])
  if qweight.dtype != np.int32 or qweight.shape != (k * bits // 32, n):
    raise ValueError(f"{where}: qweight is {qweight.dtype}{qweight.shape}, expected "
                     f"int32{(k * bits // 32, n)}")
  if qzeros.dtype != np.int32 or qzeros.shape != (g, n * bits // 32):
    raise ValueError(f"{where}: qzeros is {qzeros.dtype}{qzeros.shape}, expected "
                     f"int32{(g, n * bits // 32)}")
  zw = qzeros.view(np.uint32)
  if checkpoint_format == "gptq":
    zw = ((zw.astype(np.uint64) + GPTQ_V1_OFFSET[bits]) % 2**32).astype(np.uint32)
  elif checkpoint_format != "gptq_v2":
    raise ValueError(f"{where}: checkpoint_format must be 'gptq' or 'gptq_v2', got "
                     f"{checkpoint_format!r}")
  z = _unpack_u8(_pad_words(zw, packing.packed_length(n, bits), axis=1), bits, n, axis=1)
  words = _pad_words(qweight.view(np.uint32), packing.packed_length(k, bits), 0)
  if sym:
    if not np.all(z == 2**(bits - 1)):
      raise ValueError(f"{where}: sym=true but zero points are not {2**(bits - 1)}")
    z = None
  return from_codes_and_zero_points(words, scales, z, bits=bits, group_size=gs, shape=(k, n),
                                    dtype=dtype)
