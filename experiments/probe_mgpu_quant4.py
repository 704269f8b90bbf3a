"""Probe: can a 4-bit packed-weight matmul be written in Pallas Mosaic GPU and lowered for cuda
without the GPU (jax 0.10.2, CPU)? It lowers the most direct port of ``quant_matmul``'s
body (unpack plane ``c`` of a word tile with a shift and a mask, multiply with the activations'
plane, sum over K) and prints what Mosaic GPU says.

Recorded (commit of branch pallas3, 2-core CPU, lowering only):

* ``--rows 8`` (activation tile ``(8, TK/8)`` broadcast against the ``(TK/8, BN)`` plane):
  ``NotImplementedError: Unsupported layout: WGStridedFragLayout(shape=(8, 32), vec_size=2)``
  in ``_broadcast_in_dim_lowering_rule``.
* ``--rows 1 --tk 256`` (activation vector ``(TK/8,)``): ``ValueError: memref<32xbf16 ...>
  must have a number of elements that is a multiple of 128 (got 32)`` (``load_strided``).
* ``--rows 1 --tk 1024``: ``NotImplementedError: Unsupported layout:
  WGStridedFragLayout(shape=(128,), vec_size=1)`` (broadcast again).
* ``--semantics warpgroup``: lowering did not finish within 300 s here.

I.e. Mosaic GPU's register layouts do not broadcast strided vectors; its products go through
``plgpu.wgmma`` (64-row tiles) with the operands laid out as ``ops/gpu/
hopper_mixed_type_matmul_mgpu.py`` does, so a Mosaic GPU ``quant_matmul`` means a
dequantize-to-SMEM + wgmma kernel (weights as the 64-row A operand, ``y^T = W^T x^T``), not a
port of the Triton body.

Later (branch mgpu): the dequantize + wgmma kernel lowers, ``pallas_kernels/quant_matmul_mgpu.py``.
What made it lower: load the ``(kw, 64)`` word tile (SMEM, tiled ``(8, 32)``, swizzle 128)
through ``plgpu.transpose_ref`` with ``Layout.WGMMA_TRANSPOSED`` and ``layout_cast`` it to
``WGMMA`` (an untransformed tile stops at ``TransferPlanDerivationError: Failed to synthesize
a transfer pattern that avoids bank conflicts``); broadcast the scales with
``jax.lax.broadcast_in_dim`` from ``Layout.WGMMA.reduce(1)`` / ``.reduce(0)`` vectors (``v[:,
None]`` is a reshape to ``(64, 1)`` and fails: ``Tiling ... does not apply to shape (64, 1)``);
copies of fewer than 128 bytes are refused (``Only copies transferring a number of bytes
divisible by the warpgroup size``); ``(256, 512)`` bf16 activation tiles exceed shared memory
(626704 > 232448 bytes), hence ``MgpuConfig.x_stage_bytes``. Not verified: running on a GPU.
jax 0.10.2's Mosaic GPU interpreter rejects the kernel (non-trivial BlockSpec windows), and
``pl.pallas_call`` for Mosaic GPU is deprecated in favour of ``plgpu.kernel`` (a warning).

Usage: ``python experiments/probe_mgpu_quant4.py --rows 1 --tk 1024``.
"""

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def build(m, k, n, bn, tk, semantics):
  def kernel(xp_ref, w_ref, o_ref):
    j = pl.program_id(0)

    def scoped(acc_ref):
      acc_ref[...] = jnp.zeros((m, bn), jnp.float32)

      def body(idx, xs, ws):
        words = ws[...]  # (tk/8, bn) uint32
        acc = acc_ref[...]
        for c in range(8):
          q = ((words >> np.uint32(4 * c)) & np.uint32(15)).astype(jnp.float32) - 8.0
          if m == 1:
            acc = acc + jnp.sum(xs[c, 0].astype(jnp.float32)[:, None] * q, axis=0)[None, :]
          else:
            acc = acc + jnp.sum(xs[c].astype(jnp.float32)[:, :, None] * q[None], axis=1)
        acc_ref[...] = acc

      plgpu.emit_pipeline(
          body, grid=(k // tk,),
          in_specs=[plgpu.BlockSpec((8, m, tk // 8), lambda s: (0, 0, s)),
                    plgpu.BlockSpec((tk // 8, bn), lambda s: (s, j))],
          max_concurrent_steps=2)(xp_ref, w_ref)
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)

    pl.run_scoped(scoped, plgpu.SMEM((m, bn), jnp.float32))

  params = plgpu.CompilerParams(lowering_semantics=(
      plgpu.LoweringSemantics.Warpgroup if semantics == "warpgroup"
      else plgpu.LoweringSemantics.Lane))
  return lambda xp, w: pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32), grid=(n // bn,),
      in_specs=[pl.BlockSpec(memory_space=plgpu.GMEM), pl.BlockSpec(memory_space=plgpu.GMEM)],
      out_specs=plgpu.BlockSpec((m, bn), lambda j: (0, j)), compiler_params=params)(xp, w)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=1)
  p.add_argument("--tk", type=int, default=1024)
  p.add_argument("--semantics", default="lane", choices=["lane", "warpgroup"])
  a = p.parse_args()
  k, n, bn = 2 * a.tk, 256, 128
  xp = jnp.ones((8, a.rows, k // 8), jnp.bfloat16)
  w = jnp.ones((k // 8, n), jnp.uint32)
  try:
    f = build(a.rows, k, n, bn, a.tk, a.semantics)
    text = jax.jit(f).trace(xp, w).lower(lowering_platforms=("cuda",)).as_text()
    print("lowered:", "mosaic_gpu" in text)
  except Exception as e:  # pylint: disable=broad-except
    print("\n".join(traceback.format_exc().splitlines()[-4:]))
    print(f"blocked: {type(e).__name__}: {str(e)[:500]}")


if __name__ == "__main__":
  main()
