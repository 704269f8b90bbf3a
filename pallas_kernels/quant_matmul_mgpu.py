"""Pallas Mosaic GPU (Hopper) kernel: activations times packed 4-bit weights, grouped scales.

Dequantize-then-``wgmma``, in the style of JAX's
``pallas/ops/gpu/hopper_mixed_type_matmul_mgpu.py``, computing ``y^T = W^T x^T`` so that the
weight is the 64-row ``A`` operand and the activations (zero-padded to a multiple of 8 rows,
the ``wgmma`` minimum of its ``N`` dimension) are the ``B`` operand:

* the stored ``(K / 8, N)`` ``uint32`` words of :class:`~compressjax.formats.QuantizedArray`
  (bitstream layout of :mod:`compressjax.formats.packing`: for 4 bits, nibble ``p`` of word
  ``r`` is code ``8 r + p``) are copied to shared memory ``(kw, 64)`` per step (``kw = tk /
  8`` words), and loaded into registers *through a transposed view*
  (``WGMMA_TRANSPOSED`` layout, then a cheap ``layout_cast`` to ``WGMMA``): the register tile
  is ``(64 outputs, kw words)``, i.e. already ``W^T``'s orientation, without moving the
  weight in memory;
* plane ``p`` (``(words >> 4p) & 15``, centred by 8) times the step's scales is the ``A``
  tile ``(64, kw)`` in ``bfloat16`` (``float16`` for ``float16`` activations), multiplied by
  ``wgmma`` with the matching plane of the activations, permuted outside the kernel to
  ``(8, M, K / 8)`` (:func:`pallas_kernels._common.plane_major`, cheap: ``x`` is small) and
  read from shared memory through a transposed view;
* scales: a ``(64,)`` row vector per group (``WGMMA_ROW`` layout) broadcast over the tile's
  columns; a step holding several groups (``tk > group``) builds the ``(64, kw)`` scale tile
  from one 0/1 column mask per group (a tiny constant input);
* asymmetric weights: the kernel multiplies the centred codes; the zero-point term
  ``sum_g rowsum(x_g) (z_g + 8 s_g)`` is a small ``(M, G) @ (G, N)`` product outside it.

A ragged last K step (``K`` not a multiple of ``tk``, e.g. ``K = 576`` with ``tk = 128``)
reads past the end of the words and scales; Mosaic GPU's TMA copies fill such reads with
zeros (``OOBFillMode.ZEROS``, the default) and the activations are zero-padded here, so
those positions add nothing.

Verified without a GPU (jax 0.10.2): lowering for ``cuda`` (``tests/test_pallas_mgpu_lowering
.py``). Not verified: compiling to SASS and running on a Hopper GPU (correctness and speed are
checked by ``tests/test_pallas_gpu.py`` / ``experiments/gpu_kernels.sh`` when one is lent).

References:
  Frantar et al., "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on Large
  Language Models", arXiv:2408.11743 (dequantize in registers, feed tensor cores);
  JAX ``pallas/ops/gpu/hopper_mixed_type_matmul_mgpu.py`` (dequantize, then ``wgmma``);
  NVIDIA PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate" (``wgmma`` shapes:
  ``M = 64``, ``N`` a multiple of 8 up to 256, ``K = 16`` for 16-bit inputs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from compressjax.formats import quantized
from pallas_kernels import _common
from pallas_kernels.quant_matmul_ref import quant_matmul_ref

__all__ = ["CONFIG", "MgpuConfig", "quant_matmul_mgpu", "step_codes", "supports"]


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
  """Tile sizes of the Mosaic GPU kernel.

  Attributes:
    block_n: outputs per program (the ``wgmma`` ``M``: 64, one warpgroup).
    block_m: most activation rows per program (the ``wgmma`` ``N``: a multiple of 8, <= 256);
      more rows run as several row blocks.
    block_k: most codes (inputs) per pipeline step, a power of 2 >= 128 (each plane then has
      ``block_k / 8 >= 16`` columns, the 16-bit ``wgmma`` ``K``).
    x_stage_bytes: most bytes of one step's activation tile (shared memory; ``block_k`` is
      halved until it fits).
    max_concurrent_steps: pipeline depth (steps whose copies are in flight).
  """

  block_n: int = 64
  block_m: int = 128
  block_k: int = 512
  x_stage_bytes: int = 65536
  max_concurrent_steps: int = 2


#: The Hopper configuration.
CONFIG = MgpuConfig()


def step_codes(m_block: int, k: int, group: int, config: MgpuConfig = CONFIG) -> int:
  """Codes per pipeline step ``tk``: a power of 2 in ``[128, block_k]`` whose activation tile
  ``(m_block, tk)`` fits ``x_stage_bytes``, not much above ``K``, and either a multiple or a
  divisor of ``group`` (so a step holds whole groups or lies inside one)."""
  tk = config.block_k
  while tk > 128 and (m_block * tk * 2 > config.x_stage_bytes
                      or tk >= 2 * _common.pow2_at_least(k)
                      or (group % tk and tk % group)):
    tk //= 2
  return tk


def supports(x: jax.Array, w: quantized.QuantizedArray, config: MgpuConfig = CONFIG) -> bool:
  """Cheap static check: 4-bit 2-D weight, ``N % block_n == 0``, ``group % 8 == 0`` and
  ``group`` a divisor or multiple of a 128..``block_k`` step, floating ``x``."""
  if not (isinstance(w, quantized.QuantizedArray) and w.bits == 4 and len(w.packed.shape) == 2
          and jnp.issubdtype(x.dtype, jnp.floating) and x.shape[-1] == w.shape[0]):
    return False
  k, n = w.shape
  g = w.group_size
  if n % config.block_n or g % 8 or k % 8:
    return False
  tk = step_codes(8, k, g, config)
  return g % tk == 0 or tk % g == 0


def _kernel(xp_gmem, w_gmem, s_gmem, *rest, tk, group, steps, bm, cdtype, config):
  """One program: outputs ``j*64 .. j*64+63`` of rows ``i*bm ..``; a pipeline over K steps."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  if len(rest) == 2:
    m_gmem, o_ref = rest
  else:
    (o_ref,), m_gmem = rest, None
  bn = config.block_n
  kw = tk // 8
  gs = max(1, tk // group)  # groups per step
  j = pl.program_id(0)
  i = pl.program_id(1)
  swizzle = min(128, kw * 2)  # bytes of one activation plane row of the step
  x_transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))
  w_transforms = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
  row = plgpu.Layout.WGMMA.reduce(1)  # (64,) along the tile's rows (outputs)
  col = plgpu.Layout.WGMMA.reduce(0)  # (kw,) along its columns (words)

  def scoped(acc_ref):
    def body(_, x_smem, w_smem, s_smem, *m_smem):
      words = plgpu.load(plgpu.transpose_ref(w_smem, (1, 0)), (),
                         layout=plgpu.Layout.WGMMA_TRANSPOSED)
      words = plgpu.layout_cast(words, plgpu.Layout.WGMMA)  # (64, kw) = W^T's words
      scale = None
      for gi in range(gs):
        srow = jax.lax.broadcast_in_dim(plgpu.load(s_smem, (gi,), layout=row), (bn, kw), (0,))
        if gs == 1:
          scale = srow
        else:
          mcol = plgpu.load(m_smem[0], (gi,), layout=col)
          term = srow * jax.lax.broadcast_in_dim(mcol, (bn, kw), (1,))
          scale = term if scale is None else scale + term
      for p in range(8):
        q = ((words >> np.uint32(4 * p)) & np.uint32(15)).astype(jnp.int32) - 8
        a = (q.astype(jnp.float32) * scale).astype(cdtype)
        plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(x_smem.at[p], (1, 0)))
      plgpu.wgmma_wait(0)

    if group >= tk:
      s_spec = plgpu.BlockSpec((1, bn), lambda s: ((s * tk) // group, j))
    else:
      s_spec = plgpu.BlockSpec((gs, bn), lambda s: (s, j))
    in_specs = [plgpu.BlockSpec((8, bm, kw), lambda s: (0, i, s), transforms=x_transforms),
                plgpu.BlockSpec((kw, bn), lambda s: (s, j), transforms=w_transforms), s_spec]
    operands = [xp_gmem, w_gmem, s_gmem]
    if m_gmem is not None:
      in_specs.append(plgpu.BlockSpec((gs, kw), lambda s: (0, 0)))
      operands.append(m_gmem)
    plgpu.emit_pipeline(body, grid=(steps,), in_specs=in_specs,
                        max_concurrent_steps=config.max_concurrent_steps)(*operands)
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)

  pl.run_scoped(scoped, plgpu.ACC((bn, bm), jnp.float32))


def _forward(x, w, *, interpret=False, config=None, target_name=None):
  del target_name
  if interpret:  # jax 0.10.2's Mosaic GPU interpreter needs trivial BlockSpec windows
    raise NotImplementedError("quant_matmul_mgpu has no interpret mode (jax 0.10.2's Mosaic GPU "
                              "interpreter rejects its output BlockSpec); use quant_matmul_ref.")
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  config = config or CONFIG
  if not supports(x, w, config):
    raise NotImplementedError(_unsupported(x, w, config))
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  cdtype = jnp.float16 if x.dtype == jnp.float16 else jnp.bfloat16
  k, n = w.shape
  g = w.group_size
  batch = x.shape[:-1]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  bm = min(config.block_m, _common.round_up(max(m, 1), 8))
  mp = _common.round_up(max(m, 1), bm)
  tk = step_codes(bm, k, g, config)
  steps = pl.cdiv(k, tk)
  kp = steps * tk
  xc = jnp.pad(x2.astype(cdtype), ((0, mp - m), (0, kp - k)))
  xp = _common.plane_major(xc, 8)  # (8, Mp, Kp/8): xp[p, m, r] = x[m, 8r + p]
  scale = w.scale_values().astype(jnp.float32)
  operands = [xp, w.packed, scale]
  gs = tk // g
  if gs > 1:  # column r of a step's plane belongs to group (8 r) // g of the step
    mask = (np.arange(tk // 8)[None, :] * 8 // g == np.arange(gs)[:, None])
    operands.append(jnp.asarray(mask, jnp.float32))
  kernel = functools.partial(_kernel, tk=tk, group=g, steps=steps, bm=bm, cdtype=cdtype,
                             config=config)
  yt = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n, mp), out_dtype),
      grid=(n // config.block_n, mp // bm),
      in_specs=[pl.BlockSpec(memory_space=plgpu.GMEM)] * len(operands),
      out_specs=plgpu.BlockSpec((config.block_n, bm), lambda j, i: (j, i)),
      name=f"quant_matmul_mgpu_4b_g{g}",
  )(*operands)
  y = yt[:, :m].T
  if not w.symmetric:  # sum_g rowsum(x_g) * (z_g + 8 s_g), a (M, G) @ (G, N) product
    offset = w.zero_values().astype(jnp.float32) + 8.0 * scale
    xsum = jnp.sum(x2.astype(jnp.float32).reshape(m, k // g, g), axis=-1)
    y = (y.astype(jnp.float32) + xsum @ offset).astype(out_dtype)
  return y.reshape(batch + (n,))


def _unsupported(x, w, config):
  return (f"pallas quant_matmul_mgpu supports 4-bit 2-D QuantizedArray weights with "
          f"N % {config.block_n} == 0 and group_size % 8 == 0 (a divisor or multiple of the "
          f"K step) and floating x; got {w!r}, x.dtype={x.dtype}.")


_differentiable = _common.differentiable_factory(_forward, quant_matmul_ref)


def quant_matmul_mgpu(x: jax.Array, w: quantized.QuantizedArray, *,
                      config: MgpuConfig | None = None) -> jax.Array:
  """``x @ W`` for a 4-bit :class:`~compressjax.formats.QuantizedArray`, Mosaic GPU (Hopper).

  Args:
    x: ``(..., K)`` floating activations (multiplied in ``bfloat16``, or ``float16`` when
      ``x`` is ``float16``).
    w: the packed 4-bit weight, symmetric or asymmetric.
    config: tile sizes; default :data:`CONFIG`.

  Returns:
    ``(..., N)`` in ``result_type(x.dtype, w.dtype)``, accumulated in ``float32``; each
    dequantized weight ``s (q - 8)`` is rounded to the 16-bit compute dtype before the tensor
    cores multiply it. Gradients come from :func:`quant_matmul_ref`.

  Raises:
    NotImplementedError: for unsupported shapes (see :func:`supports`).
  """
  config = config or CONFIG
  if not supports(x, w, config):
    raise NotImplementedError(_unsupported(x, w, config))
  return _differentiable(False, config, None)(x, w)
