"""Pallas kernel: activations times packed 2/3/4/8-bit integer weights with grouped scales.

The weight is read as stored by :class:`compressjax.formats.QuantizedArray`: ``uint32`` words,
32 codes per ``bits`` words along ``K``. Each loop step loads word ``w`` of every 32-code block
with a strided load (rows ``w, w + bits, ...`` of the packed ``(K * bits / 32, N)`` column
stripe), so that code plane ``c`` is unpacked from at most two word tiles with a shift and a
mask (:func:`~pallas_kernels.quant_matmul_ref.unpack_plane`) in registers. With
centred codes ``q - 2**(bits-1)`` (exact in bf16) and per-group sums of the activations:

* symmetric: ``y = sum_g s_g * (x_g @ (q_g - c))``;
* asymmetric: ``y = sum_g s_g * (x_g @ (q_g - c)) + sum_g rowsum(x_g) * (z_g + c * s_g)``.

Grid: (row blocks, column blocks); each program loops over K in steps inside one group.
Supported: 2-D weights, ``group_size % 32 == 0`` (other groupings fall back to the XLA path).

References:
  Frantar et al., "GPTQ", arXiv:2210.17323; Frantar et al., "MARLIN: Mixed-Precision
  Auto-Regressive Parallel Inference on Large Language Models", arXiv:2408.11743 (why a
  memory-bound decode matmul must read the packed weight as it is).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from compressjax.formats import base
from compressjax.formats import packing
from compressjax.formats import quantized
from pallas_kernels import _common
from pallas_kernels.quant_matmul_ref import quant_matmul_ref, unpack_plane

__all__ = ["quant_matmul", "supports"]


def supports(x: jax.Array, w: quantized.QuantizedArray) -> bool:
  """Cheap static check that the kernel handles ``x @ w``."""
  # 3-bit codes are packed 10 per uint32 since formats.packing layout 2; this kernel still
  # unpacks the old straddling bitstream, so 3-bit weights fall back to the XLA path
  # (pallas_kernels/NOTE_3bit_layout.md says what to change).
  return (isinstance(w, quantized.QuantizedArray) and len(w.packed.shape) == 2
          and w.bits not in packing.PER_WORD_BITS and w.group_size % 32 == 0 and w.shape[0] % 32 == 0
          and jnp.issubdtype(x.dtype, jnp.floating) and x.shape[-1] == w.shape[0])


def _kernel(*refs, bits, nb, steps, bk, group, symmetric, use_dot, cdtype):
  xp_ref = refs[0]
  words_ref = refs[1]
  scale_ref = refs[2]
  if symmetric:
    (o_ref,) = refs[3:]
  else:
    off_ref, xsum_ref, o_ref = refs[3:]
  center = 2**(bits - 1)
  bm, bn = o_ref.shape

  def step(s, acc):
    start = s * nb
    if nb % 8 == 0:
      start = pl.multiple_of(start, 8)
    words = [words_ref[pl.ds(start * bits + wi, nb, stride=bits), :] for wi in range(bits)]
    part = jnp.zeros((bm, bn), jnp.float32)
    for c in range(32):
      q = unpack_plane(words, c, bits).astype(jnp.int32) - center
      xc = xp_ref[c, :, pl.ds(start, nb)]
      part = part + _common.mac(xc, q.astype(cdtype), use_dot)
    g = (s * bk) // group
    acc = acc + part * scale_ref[pl.ds(g, 1), :].astype(jnp.float32)
    if not symmetric:
      acc = acc + xsum_ref[:, pl.ds(g, 1)] * off_ref[pl.ds(g, 1), :]
    return acc

  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


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
  bk = _common.step_size(gs, cfg.block_k)
  nb, kb = bk // 32, k // 32
  bn = _common.block_cols(n, cfg.block_n)
  xp = _common.plane_major(x2, 32)  # (32, Mp, K/32)
  scale = w.scale_values().astype(jnp.float32)
  g = w.num_groups
  inputs = [xp, w.packed, scale]
  in_specs = [pl.BlockSpec((32, bm, kb), lambda i, j: (0, i, 0))]
  in_specs += [pl.BlockSpec((kb * bits, bn), lambda i, j: (0, j))]
  in_specs += [pl.BlockSpec((g, bn), lambda i, j: (0, j))]
  if not w.symmetric:
    offset = w.zero_values().astype(jnp.float32) + 2.0**(bits - 1) * scale
    xsum = jnp.sum(x2.astype(jnp.float32).reshape(mp, g, gs), axis=-1)
    inputs += [offset, xsum]
    in_specs += [pl.BlockSpec((g, bn), lambda i, j: (0, j)),
                 pl.BlockSpec((bm, g), lambda i, j: (i, 0))]
  kernel = functools.partial(_kernel, bits=bits, nb=nb, steps=k // bk, bk=bk, group=gs,
                             symmetric=w.symmetric, use_dot=cfg.use_dot, cdtype=cdtype)
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
