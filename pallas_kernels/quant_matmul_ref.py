"""Pure-jnp reference of :mod:`pallas_kernels.quant_matmul` (packed-integer ``x @ W``).

The code planes are unpacked with the kernel's own :func:`unpack_plane` (bitstream widths 2, 4,
8) or :func:`unpack_word_plane` (3-bit codes, 10 per word) (so the reference checks
the kernel's arithmetic, and the tests check both against ``x @ w.materialize()``, which uses
:func:`compressjax.formats.unpack`).

References:
  Frantar et al., "GPTQ", arXiv:2210.17323 (grouped codes); the bitstream and per-word
  layouts of :mod:`compressjax.formats.packing`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats import packing
from compressjax.formats import quantized

__all__ = ["quant_matmul_ref", "unpack_plane", "unpack_word_plane"]


def unpack_plane(words: list[jax.Array], c: int, bits: int) -> jax.Array:
  """Code ``c`` (``0 <= c < 32``) of every 32-code block, from the block's ``bits`` words.

  ``words[w]`` holds word ``w`` of each block (any shape, ``uint32``); the result has that shape.
  This is the only place that knows the bitstream layout of :mod:`compressjax.formats.packing`
  (widths 2, 4, 8; 3-bit codes are packed per word, see :func:`unpack_word_plane`):
  code ``c`` starts at stream bit ``c * bits``, i.e. bit ``(c * bits) % 32`` of word
  ``(c * bits) // 32``, and continues into the next word when it crosses bit 31.
  """
  start = c * bits
  first, off = divmod(start, 32)
  v = words[first] >> np.uint32(off)
  if off + bits > 32:
    v = v | (words[first + 1] << np.uint32(32 - off))
  return v & np.uint32((1 << bits) - 1)


def unpack_word_plane(words: jax.Array, c: int, bits: int) -> jax.Array:
  """Code slot ``c`` (``0 <= c < 32 // bits``) of every word of the per-word layout.

  The per-word layout of :mod:`compressjax.formats.packing` (3-bit codes since layout 2) holds
  code ``10 * i + c`` of a column in bits ``3c .. 3c + 2`` of word ``i`` (bits 30-31 zero), so
  plane ``c`` is one shift and one mask of the word tile (any shape, ``uint32``), never a
  second word.
  """
  return (words >> np.uint32(c * bits)) & np.uint32((1 << bits) - 1)


def decode_planes(w: quantized.QuantizedArray) -> jax.Array:
  """The ``(K, N)`` codes rebuilt plane by plane with :func:`unpack_plane` (``int32``); 3-bit
  codes (per-word layout) with :func:`unpack_word_plane`, plane ``c`` giving rows ``10i + c``."""
  k, n = w.shape
  if w.bits in packing.PER_WORD_BITS:
    planes = [unpack_word_plane(w.packed, c, w.bits)
              for c in range(packing.codes_per_word(w.bits))]
    return jnp.stack(planes, axis=1).reshape(-1, n)[:k].astype(jnp.int32)
  blocks = w.packed.reshape(-1, w.bits, n)
  planes = [unpack_plane([blocks[:, i] for i in range(w.bits)], c, w.bits) for c in range(32)]
  codes = jnp.stack(planes, axis=1).reshape(-1, n)[:k]  # row 32 b + c
  return codes.astype(jnp.int32)


def quant_matmul_ref(x: jax.Array, w: quantized.QuantizedArray) -> jax.Array:
  """``x @ W`` for a :class:`~compressjax.formats.QuantizedArray`, decoding the whole weight.

  Accumulates in ``float32`` (or wider); returns ``result_type(x.dtype, w.dtype)``.
  Differentiable in ``x``, ``w.scale`` and ``w.zero``.
  """
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  k, n = w.shape
  codes = decode_planes(w).reshape(w.num_groups, w.group_size, n)
  zero = w.zero_values()
  wd = quantized.dequantize(codes, w.scale_values()[:, None, :],
                            None if zero is None else zero[:, None, :], bits=w.bits,
                            symmetric=w.symmetric).reshape(k, n)
  y = jnp.matmul(x.astype(acc), wd.astype(acc), preferred_element_type=acc)
  return y.astype(out_dtype)


assert packing.BLOCK == 32  # unpack_plane assumes 32-code blocks
