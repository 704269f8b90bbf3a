"""Bit layouts of llama.cpp block-quantized GGUF tensor types: pure NumPy on arrays.

No files, trees or model names here (those live in :mod:`compressjax.io.gguf`); only functions
that turn integer codes and scales into the bytes of one GGUF tensor and back. A GGUF matrix of
``ggml`` shape ``ne = (K, N)`` is ``N`` rows of ``K`` values; each row is cut into blocks along
``K``. All functions here take and return row-major ``(N, K)`` codes (rows = output channels),
so that a compressjax ``(K, N)`` weight maps onto them by a transpose.

Block layouts (little-endian; ``d``, ``m``, ``dmin`` are IEEE float16):

* ``Q8_0``, 32 values, 34 bytes: ``d``, then 32 ``int8`` ``x``; ``w = d * x``.
* ``Q4_0``, 32 values, 18 bytes: ``d``, then 16 bytes, byte ``j`` holding code ``j`` in its low
  nibble and code ``j + 16`` in its high nibble; ``w = d * (q - 8)``.
* ``Q4_1``, 32 values, 20 bytes: ``d``, ``m``, then the 16 nibble bytes as ``Q4_0``;
  ``w = d * q + m``.
* ``Q4_K``, 256 values (8 sub-blocks of 32), 144 bytes: ``d``, ``dmin``, 12 bytes holding eight
  6-bit scales ``sc`` and eight 6-bit mins ``mn``, then 128 bytes in which sub-blocks ``2c`` and
  ``2c + 1`` share 32 bytes (low / high nibbles); ``w = (d * sc) * q - (dmin * mn)``.
* ``Q2_K``, 256 values (16 sub-blocks of 16), 84 bytes: 16 bytes ``sc | mn << 4`` (4-bit scale
  and min per sub-block), 64 bytes of 2-bit codes (value ``128 c + 32 s + l`` at bits ``2 s`` of
  byte ``32 c + l``), then ``d``, ``dmin``; ``w = (d * sc) * q - (dmin * mn)``.

The compressjax formats these are exact images of (:class:`compressjax.formats.QuantizedArray`):
``Q8_0`` = symmetric 8-bit (``q = x + 128``), ``Q4_0`` = symmetric 4-bit, ``Q4_1`` = asymmetric
4-bit with a float zero (``zero = m``), ``Q4_K`` = asymmetric 4-bit, groups of 32, with
``scale = d * sc`` and ``zero = -(dmin * mn)`` (both exact in float32), ``Q2_K`` the same with
2-bit codes and groups of 16. Decoding in float32 gives
bit-identical weights on both sides because the same operations run in the same order.

References:
  llama.cpp ``ggml/src/ggml-common.h`` (``block_q8_0``, ``block_q4_0``, ``block_q4_1``,
  ``block_q4_K``, ``block_q2_K``) and ``ggml/src/ggml-quants.c`` (``dequantize_row_*``, ``get_scale_min_k4``);
  the ``gguf`` Python package's ``quants.py`` (NumPy dequantizers) against which the tests check.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "BLOCK_BYTES", "TYPE_FORMATS", "encode", "decode", "f16_exact",
           "k_scales", "K_SUPER"]

#: Values per block for each type.
BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256, "Q2_K": 256}
#: Bytes per block for each type.
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144, "Q2_K": 84}
#: Values per super-block of the K-quants.
K_SUPER = 256
#: ``(bits, symmetric, group_size)`` of the compressjax grid each type stores.
TYPE_FORMATS = {"Q8_0": (8, True, 32), "Q4_0": (4, True, 32), "Q4_1": (4, False, 32),
                "Q4_K": (4, False, 32), "Q2_K": (2, False, 16)}


def f16_exact(x: np.ndarray) -> np.ndarray:
  """Elementwise: is ``x`` exactly a float16 value (so storing it as float16 loses nothing)?"""
  x = np.asarray(x, np.float32)
  with np.errstate(over="ignore"):
    return x.astype(np.float16).astype(np.float32) == x


def _nibbles(q: np.ndarray) -> np.ndarray:
  """``(..., 32)`` codes -> ``(..., 16)`` bytes: low nibble code ``j``, high nibble ``j + 16``."""
  q = q.astype(np.uint8)
  return q[..., :16] | (q[..., 16:] << np.uint8(4))


def _unnibble(b: np.ndarray) -> np.ndarray:
  return np.concatenate([b & np.uint8(0x0F), b >> np.uint8(4)], axis=-1)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape, 2)


def k_scales(v: np.ndarray, top: int = 63) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Finds, per row of ``v`` (``(..., S)`` float32, >= 0), a float16 ``d`` and integers
  ``s`` in ``[0, top]`` with ``float32(d * s) == v`` exactly.

  Tries ``s_max = top, top - 1, ..., 1`` for the largest entry (llama.cpp's quantizers give the
  largest sub-block scale ``top``, so a file they wrote is recovered byte for byte).

  Returns:
    ``(d, s, ok)``: ``d`` float16 ``(...)``, ``s`` uint8 ``(..., 8)``, ``ok`` bool ``(...)``
    (False where no such pair exists; ``d``/``s`` are then meaningless).
  """
  v = np.asarray(v, np.float32)
  vmax = v.max(axis=-1)
  d = np.zeros(vmax.shape, np.float16)
  s = np.zeros(v.shape, np.uint8)
  ok = (vmax == 0) & np.all(v == 0, axis=-1)
  todo = ~ok & np.all(v >= 0, axis=-1) & np.all(np.isfinite(v), axis=-1)
  for c in range(top, 0, -1):
    if not todo.any():
      break
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
      dc = (vmax / np.float32(c)).astype(np.float16)
      d32 = dc.astype(np.float32)[..., None]
      sc = np.rint(np.where(d32 > 0, v / d32, -1))
      good = todo & np.all((sc >= 0) & (sc <= top), axis=-1)
      good &= np.all((d32 * np.clip(sc, 0, top).astype(np.float32)) == v, axis=-1)
    d = np.where(good, dc, d)
    s = np.where(good[..., None], np.clip(sc, 0, top).astype(np.uint8), s)
    ok |= good
    todo &= ~good
  return d, s, ok


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
  """Eight 6-bit scales and mins ``(..., 8)`` -> the 12 bytes of ``block_q4_K.scales``."""
  sc = sc.astype(np.uint8)
  mn = mn.astype(np.uint8)
  b0 = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
  b1 = (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6)
  b2 = (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)
  return np.concatenate([b0, b1, b2], axis=-1).astype(np.uint8)


def _unpack_k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  d, m, md = b[..., 0:4], b[..., 4:8], b[..., 8:12]
  sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
  mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
  return sc, mn


def encode(qtype: str, codes: np.ndarray, scale: np.ndarray,
           zero: np.ndarray | None = None) -> np.ndarray:
  """Encodes one ``(N, K)`` tensor as the bytes of GGUF type ``qtype``.

  Args:
    qtype: ``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"`` or ``"Q4_K"``.
    codes: ``(N, K)`` unsigned codes of the compressjax grid (``[0, 256)`` for Q8_0,
      ``[0, 16)`` otherwise); ``K`` a multiple of :data:`BLOCK` ``[qtype]``.
    scale: ``(N, K // g)`` float32 scale of each group (``g`` = 16 for Q2_K, else 32).
    zero: ``(N, K // g)`` float32 zero (weight-domain offset) for the asymmetric types.

  Returns:
    ``(N, K // block * block_bytes)`` uint8.

  Raises:
    ValueError: a scale or zero is not exactly storable in ``qtype`` (message says which and
      how many).
  """
  n, k = codes.shape
  scale = np.asarray(scale, np.float32)
  if qtype in ("Q8_0", "Q4_0", "Q4_1"):
    q = codes.reshape(n, k // 32, 32)
    bad = ~f16_exact(scale)
    if qtype == "Q4_1":
      bad |= ~f16_exact(zero)
    if bad.any():
      raise ValueError(f"{int(bad.sum())} of {bad.size} group scales/zeros are not float16 "
                       f"values, which {qtype} stores")
    parts = [_f16_bytes(scale)]
    if qtype == "Q8_0":
      parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
      if qtype == "Q4_1":
        parts.append(_f16_bytes(np.asarray(zero, np.float32)))
      parts.append(_nibbles(q))
    return np.concatenate(parts, axis=-1).reshape(n, -1)
  if qtype == "Q4_K":
    ns = k // K_SUPER
    s8 = scale.reshape(n, ns, 8)
    m8 = -np.asarray(zero, np.float32).reshape(n, ns, 8)
    d, sc, ok_d = k_scales(s8)
    dmin, mn, ok_m = k_scales(m8)
    bad = ~(ok_d & ok_m)
    if bad.any():
      raise ValueError(f"{int(bad.sum())} of {bad.size} super-blocks of 256 have group scales "
                       f"that are not float16 d times 6-bit integers (or zeros not -(dmin * "
                       f"6-bit integer)), which Q4_K stores")
    qs = codes.reshape(n, ns, 4, 2, 32).astype(np.uint8)
    qs = (qs[:, :, :, 0, :] | (qs[:, :, :, 1, :] << np.uint8(4))).astype(np.uint8)
    blocks = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn),
                             qs.reshape(n, ns, 128)], axis=-1)
    return blocks.reshape(n, -1)
  if qtype == "Q2_K":
    ns = k // K_SUPER
    d, sc, ok_d = k_scales(scale.reshape(n, ns, 16), 15)
    dmin, mn, ok_m = k_scales(-np.asarray(zero, np.float32).reshape(n, ns, 16), 15)
    bad = ~(ok_d & ok_m)
    if bad.any():
      raise ValueError(f"{int(bad.sum())} of {bad.size} super-blocks of 256 have group scales "
                       f"that are not float16 d times 4-bit integers (or zeros not -(dmin * "
                       f"4-bit integer)), which Q2_K stores")
    q = codes.reshape(n, ns, 2, 4, 32).astype(np.uint8)
    qs = q[:, :, :, 0] | (q[:, :, :, 1] << 2) | (q[:, :, :, 2] << 4) | (q[:, :, :, 3] << 6)
    blocks = np.concatenate([(sc | (mn << 4)).astype(np.uint8), qs.reshape(n, ns, 64),
                             _f16_bytes(d), _f16_bytes(dmin)], axis=-1)
    return blocks.reshape(n, -1)
  raise ValueError(f"qtype must be one of {sorted(BLOCK)}, got {qtype!r}")


def decode(qtype: str, data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray,
                                                          np.ndarray | None]:
  """Inverse of :func:`encode`: ``(N, bytes)`` uint8 -> ``(codes (N, K) uint8, scale, zero)``.

  ``scale``/``zero`` are ``(N, K // g)`` (``g`` = 16 for Q2_K, else 32): float16 for the
  32-blocks types (the stored values), float32 for the K-quants (``d * sc`` and
  ``-(dmin * mn)``, exact in float32); ``zero`` is None for the symmetric types.
  """
  data = np.ascontiguousarray(data, np.uint8)
  n = data.shape[0]
  bb = BLOCK_BYTES[qtype]
  nblk = k // BLOCK[qtype]
  blocks = data.reshape(n, nblk, bb)
  f16 = lambda b: np.ascontiguousarray(b).view(np.float16)[..., 0]
  if qtype == "Q8_0":
    x = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    return ((x.astype(np.int16) + 128).astype(np.uint8).reshape(n, k), f16(blocks[..., 0:2]),
            None)
  if qtype == "Q4_0":
    return _unnibble(blocks[..., 2:]).reshape(n, k), f16(blocks[..., 0:2]), None
  if qtype == "Q4_1":
    return (_unnibble(blocks[..., 4:]).reshape(n, k), f16(blocks[..., 0:2]),
            f16(blocks[..., 2:4]))
  if qtype == "Q4_K":
    d = f16(blocks[..., 0:2]).astype(np.float32)
    dmin = f16(blocks[..., 2:4]).astype(np.float32)
    sc, mn = _unpack_k_scales(blocks[..., 4:16])
    scale = (d[..., None] * sc.astype(np.float32)).reshape(n, -1)
    zero = -(dmin[..., None] * mn.astype(np.float32)).reshape(n, -1)
    qs = blocks[..., 16:].reshape(n, nblk, 4, 32)
    codes = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=3).reshape(n, k)
    return codes, scale, zero
  if qtype == "Q2_K":
    sb = blocks[..., 0:16]
    d = f16(blocks[..., 80:82]).astype(np.float32)
    dmin = f16(blocks[..., 82:84]).astype(np.float32)
    scale = (d[..., None] * (sb & 0x0F).astype(np.float32)).reshape(n, -1)
    zero = -(dmin[..., None] * (sb >> 4).astype(np.float32)).reshape(n, -1)
    qs = blocks[..., 16:80].reshape(n, nblk, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
        1, 1, 1, 4, 1)
    return (qs & np.uint8(3)).reshape(n, k), scale, zero
  raise ValueError(f"qtype must be one of {sorted(BLOCK)}, got {qtype!r}")
