"""Pallas kernel: activations times packed 2/3/4/8-bit integer weights with grouped scales.

The weight is read as stored by :class:`compressjax.formats.QuantizedArray`, in one of the two
layouts of :mod:`compressjax.formats.packing`:

* **Bitstream** (2, 4 and 8 bits): ``uint32`` words, 32 codes per ``bits`` words along ``K``.
  Each loop step loads word ``w`` of every 32-code block with a strided load (rows
  ``w, w + bits, ...`` of the packed ``(K * bits / 32, N)`` column stripe), so that code plane
  ``c`` (``0 <= c < 32``) is unpacked from one word tile with a shift and a mask
  (:func:`~pallas_kernels.quant_matmul_ref.unpack_plane`) in registers; the activations are
  permuted to ``(32, M, K / 32)`` to match.
* **Per word** (3 bits, packing layout 2): 10 codes per word, code ``10 i + c`` in bits
  ``3c .. 3c + 2`` of word ``i`` (bits 30-31 zero). Plane ``c`` (``0 <= c < 10``) of a word tile
  is ``(words >> 3c) & 7`` (:func:`~pallas_kernels.quant_matmul_ref.unpack_word_plane`), one
  shift and one mask, never a second word; the activations are zero-padded to ``10 * ceil(K /
  10)`` columns and permuted to ``(10, M, ceil(K / 10))``. Words do not line up with scale
  groups (``group_size % 32 == 0`` and ``gcd(32, 10) = 2``), so a step of ``S`` codes inside
  one group loads the ``P`` words (a power of 2, as Triton tiles must be) that hold them,
  starting at word ``floor(s S / 10)``, and zeroes the activations of the codes outside the
  step (a mask on the small activation tile, not on the weight): see :func:`word_step`.
  ``P = 4, 8, 16, 32, 64`` words for ``S = 32 .. 512`` codes, i.e. 1.25x the step's codes are
  unpacked and multiplied (the extra words of a window are the neighbours' and are in cache;
  every word is read from memory once per column block). The alternative of a step of
  ``lcm(10, group)`` codes (whole words *and* whole groups, e.g. 640 codes for g128) holds 5
  groups, so its scales would need a per-row select or 5 masked products per plane (5x the
  multiply-adds); the padded window costs 1.25x.

With centred codes ``q - 2**(bits-1)`` (exact in bf16) and per-group sums of the activations:

* symmetric: ``y = sum_g s_g * (x_g @ (q_g - c))``;
* asymmetric: ``y = sum_g s_g * (x_g @ (q_g - c)) + sum_g rowsum(x_g) * (z_g + c * s_g)``.

Grid: (row blocks, column blocks); each program loops over K in steps inside one group.
Supported: 2-D weights, ``group_size % 32 == 0`` (other groupings fall back to the XLA path).

References:
  Frantar et al., "GPTQ", arXiv:2210.17323; Frantar et al., "MARLIN: Mixed-Precision
  Auto-Regressive Parallel Inference on Large Language Models", arXiv:2408.11743 (why a
  memory-bound decode matmul must read the packed weight as it is); the per-word layout of
  :mod:`compressjax.formats.packing` (``LAYOUT_VERSION`` 2, ``pallas_kernels/NOTE_3bit_layout.md``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from compressjax.formats import base
from compressjax.formats import packing
from compressjax.formats import quantized
from pallas_kernels import _common
from pallas_kernels.quant_matmul_ref import quant_matmul_ref, unpack_plane, unpack_word_plane

__all__ = ["quant_matmul", "supports", "word_step"]


def supports(x: jax.Array, w: quantized.QuantizedArray) -> bool:
  """Cheap static check that the kernel handles ``x @ w``."""
  # 3-bit codes (10 per word, packing layout 2) go through _kernel_words.
  return (isinstance(w, quantized.QuantizedArray) and len(w.packed.shape) == 2
          and w.group_size % 32 == 0 and w.shape[0] % 32 == 0
          and jnp.issubdtype(x.dtype, jnp.floating) and x.shape[-1] == w.shape[0])


def _kernel(*refs, bits, steps, step, group, symmetric, layout, use_dot, cdtype):
  """One program: ``acc = sum over steps of scale_g * part (+ rowsum(x_g) * offset_g)``, where
  ``part`` is the step's product with centred codes, from :func:`_stream_part` or
  :func:`_word_part` (``layout`` holds that function's static arguments)."""
  xp_ref, words_ref, scale_ref = refs[:3]
  if symmetric:
    (o_ref,) = refs[3:]
  else:
    off_ref, xsum_ref, o_ref = refs[3:]
  part_fn, part_args = layout
  bm, bn = o_ref.shape

  def body(s, acc):
    part = part_fn(xp_ref, words_ref, s * step, bits=bits, step=step, use_dot=use_dot,
                   cdtype=cdtype, shape=(bm, bn), **dict(part_args))
    g = (s * step) // group
    acc = acc + part * scale_ref[pl.ds(g, 1), :].astype(jnp.float32)
    if not symmetric:  # the offset term once per group, in the group's first step
      off = xsum_ref[:, pl.ds(g, 1)] * off_ref[pl.ds(g, 1), :]
      acc = acc + jnp.where(jax.lax.rem(s * step, group) == 0, off, jnp.zeros_like(off))
    return acc

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _stream_part(xp_ref, words_ref, lo, *, bits, step, use_dot, cdtype, shape):
  """Bitstream layout: codes ``lo .. lo + step`` from the ``bits`` strided word tiles."""
  nb = step // 32
  start = lo // 32
  if nb % 8 == 0:
    start = pl.multiple_of(start, 8)
  words = [words_ref[pl.ds(start * bits + wi, nb, stride=bits), :] for wi in range(bits)]
  center = 2**(bits - 1)
  part = jnp.zeros(shape, jnp.float32)
  for c in range(32):
    q = unpack_plane(words, c, bits).astype(jnp.int32) - center
    xc = xp_ref[c, :, pl.ds(start, nb)]
    part = part + _common.mac(xc, q.astype(cdtype), use_dot)
  return part


def _word_part(xp_ref, words_ref, lo, *, bits, step, use_dot, cdtype, shape, window, n_words):
  """Per-word layout: codes ``lo .. lo + step`` from the ``window`` words holding them
  (:func:`word_step`); activations of the window's other codes are zeroed."""
  per_word = packing.codes_per_word(bits)
  first = jnp.minimum(lo // per_word, n_words - window)  # the last window stays in the array
  words = words_ref[pl.ds(first, window), :]
  row = (first + jax.lax.broadcasted_iota(jnp.int32, (shape[0], window), 1)) * per_word
  center = 2**(bits - 1)
  part = jnp.zeros(shape, jnp.float32)
  for c in range(per_word):
    q = unpack_word_plane(words, c, bits).astype(jnp.int32) - center
    xc = xp_ref[c, :, pl.ds(first, window)]
    inside = (row + c >= lo) & (row + c < lo + step)
    xc = jnp.where(inside, xc, jnp.zeros_like(xc))
    part = part + _common.mac(xc, q.astype(cdtype), use_dot)
  return part


def word_step(group: int, block_k: int, n_words: int, per_word: int = 10) -> tuple[int, int]:
  """K tiling of the per-word layout: ``(S, P)`` = codes per loop step, words loaded per step.

  A step covers the ``S`` codes ``s*S .. (s+1)*S - 1`` (``S``: the largest power of 2 that
  divides ``group`` and is at most ``block_k``, so a step never crosses a scale group). Word
  boundaries (every ``per_word`` codes) do not fall on group boundaries (``gcd(32, 10) = 2``),
  so a step loads the ``P`` words from ``floor(s*S / per_word)`` on, ``P`` the power of 2
  covering the worst offset ``s*S mod per_word`` (at most ``per_word - gcd(S, per_word)``) plus
  ``S`` codes, and masks the codes of neighbouring steps to zero on the activation side. For
  ``S`` = 32 .. 512 that is ``P`` = 4, 8, 16, 32, 64 words, 1.25x the codes of the step
  (unpacked from words already in cache; each word is read from memory once). ``S`` is halved
  (down to 32) until ``P <= n_words``, so the last step's window stays inside the array.
  """
  s = _common.step_size(group, block_k)

  def window(s):
    worst = per_word - math.gcd(s, per_word)
    return 1 << max(0, -(-(s + worst) // per_word) - 1).bit_length()
  while window(s) > n_words and s > 32:
    s //= 2
  return s, window(s)



def _forward(x, w, *, interpret, config, target_name=None):
  cfg = _common.config_for(interpret, config)
  if not supports(x, w):
    raise NotImplementedError(
        f"pallas quant_matmul supports 2-D weights with group_size % 32 == 0 and K % 32 == 0 "
        f"and floating x; got {w!r}, x.dtype={x.dtype}.")
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  cdtype = _common.compute_dtype(x.dtype, out_dtype)
  k, n = w.shape
  bits, gs = w.bits, w.group_size
  batch = x.shape[:-1]
  x2, m, bm = _common.as_rows(x.astype(cdtype), cfg.block_m)
  mp = x2.shape[0]
  if bits in packing.PER_WORD_BITS:
    per_word = packing.codes_per_word(bits)
    n_words = w.packed.shape[0]
    step, window = word_step(gs, cfg.block_k, n_words, per_word)
    xw = x2 if n_words * per_word == k else jnp.pad(x2, ((0, 0), (0, n_words * per_word - k)))
    xp = _common.plane_major(xw, per_word)  # (10, Mp, ceil(K/10))
    layout = (_word_part, (("window", window), ("n_words", n_words)))
    x_block, w_block = (per_word, bm, n_words), (n_words, None)
  else:
    step = _common.step_size(gs, cfg.block_k)
    xp = _common.plane_major(x2, 32)  # (32, Mp, K/32)
    layout = (_stream_part, ())
    x_block, w_block = (32, bm, k // 32), (k // 32 * bits, None)
  bn = _common.block_cols(n, cfg.block_n)
  w_block = (w_block[0], bn)
  scale = w.scale_values().astype(jnp.float32)
  g = w.num_groups
  inputs = [xp, w.packed, scale]
  in_specs = [pl.BlockSpec(x_block, lambda i, j: (0, i, 0)),
              pl.BlockSpec(w_block, lambda i, j: (0, j)),
              pl.BlockSpec((g, bn), lambda i, j: (0, j))]
  if not w.symmetric:
    offset = w.zero_values().astype(jnp.float32) + 2.0**(bits - 1) * scale
    xsum = jnp.sum(x2.astype(jnp.float32).reshape(mp, g, gs), axis=-1)
    inputs += [offset, xsum]
    in_specs += [pl.BlockSpec((g, bn), lambda i, j: (0, j)),
                 pl.BlockSpec((bm, g), lambda i, j: (i, 0))]
  kernel = functools.partial(_kernel, bits=bits, steps=k // step, step=step, group=gs,
                             symmetric=w.symmetric, layout=layout, use_dot=cfg.use_dot,
                             cdtype=cdtype)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      grid=(mp // bm, pl.cdiv(n, bn)),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=_common.compiler_params(interpret, cfg, target_name),
      name=f"quant_matmul_{bits}b_g{gs}",
  )(*inputs)
  return y[:m].reshape(batch + (n,))


_differentiable = _common.differentiable_factory(_forward, quant_matmul_ref)


def quant_matmul(x: jax.Array, w: quantized.QuantizedArray, *, interpret: bool = False,
                 config: _common.KernelConfig | None = None,
                 target: str | None = None) -> jax.Array:
  """``x @ W`` for a packed :class:`~compressjax.formats.QuantizedArray`, in one Pallas kernel.

  Args:
    x: ``(..., K)`` floating activations.
    w: the packed weight (``group_size % 32 == 0``).
    interpret: run in the Pallas interpreter (any backend, CPU included).
    config: block sizes; default: ``CONFIGS[target]`` of the current backend.
    target: ``"gpu"`` or ``"tpu"`` to pick the compiler parameters when lowering for a
      platform other than the default backend (lowering checks); default: the backend's.

  Returns:
    ``(..., N)`` in ``result_type(x.dtype, w.dtype)``, accumulated in ``float32``. Gradients
    (``x``, ``scale``, ``zero``) come from :func:`quant_matmul_ref`.

  Raises:
    NotImplementedError: for unsupported shapes or a backend without a kernel target.
  """
  if not supports(x, w):
    raise NotImplementedError(
        f"pallas quant_matmul supports 2-D weights with group_size % 32 == 0 and K % 32 == 0 "
        f"and floating x; got {w!r}, x.dtype={x.dtype}.")
  _common.config_for(interpret, config)  # raises on CPU without interpret
  return _differentiable(bool(interpret), config, target)(x, w)
