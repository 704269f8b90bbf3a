"""Pallas kernel: activations times AQLM additive-codebook weights (2x8 and 1x16, groups of g).

``W[i*g + a, n] = scales[n] * sum_m codebooks[m, codes[i, n, m], a]``. Coordinate ``a`` of every
group is one *plane* ``(K / g, N)``: the kernel loads a tile of codes per codebook, looks up
coordinate ``a`` of the chosen codewords in the (tiny) transposed codebooks, flattened
``(M * g * 2**B,)``,
sums over codebooks, and multiplies with ``x[:, a::g]``; the scales are applied once per column
at the end. The dense weight is never formed.

Supported: 2-D weights whose codes are stored as ``uint8`` (``B = 8``) or ``uint16``
(``B = 16``): the 2x8 and 1x16 schemes (and any ``M``); bit-packed ``B < 8`` codes fall back to
the XLA path.

References:
  Egiazarian et al., AQLM, arXiv:2401.06118; ``Vahe1994/AQLM``
  ``inference_lib/src/aqlm/inference_kernels/triton_kernel.py::_aqlm_gemv_simple`` and
  ``cuda_kernel.cu`` (``Code1x16MatVec``, ``Code2x8MatVec``: the codebooks stay on chip).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from compressjax.formats import additive
from pallas_kernels import _common
from pallas_kernels.aqlm_matmul_ref import aqlm_matmul_ref

__all__ = ["aqlm_matmul", "supports"]


def supports(x: jax.Array, w: additive.AdditiveCodebookArray) -> bool:
  """Cheap static check that the kernel handles ``x @ w``."""
  return (isinstance(w, additive.AdditiveCodebookArray) and w.nbits in (8, 16)
          and len(w.codes.shape) == 3 and jnp.issubdtype(x.dtype, jnp.floating)
          and x.shape[-1] == w.shape[0])


def _kernel(xp_ref, *refs, num_codebooks, g, ni, steps, use_dot, cdtype, table):
  code_refs = refs[:num_codebooks]
  cbt_ref, scale_ref, o_ref = refs[num_codebooks:]
  bm, bn = o_ref.shape

  def step(s, acc):
    start = s * ni
    idx = [r[pl.ds(start, ni), :].astype(jnp.int32) for r in code_refs]
    for a in range(g):
      wa = jnp.zeros((ni, bn), jnp.float32)
      for mi in range(num_codebooks):
        # A gather from the on-chip table (a pointer gather in Triton).
        wa = wa + cbt_ref[idx[mi] + (mi * g + a) * table].astype(jnp.float32)
      xa = xp_ref[a, :, pl.ds(start, ni)]
      acc = acc + _common.mac(xa, wa.astype(cdtype), use_dot)
    return acc

  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = (acc * scale_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def _forward(x, w, *, interpret, config, target_name=None):
  cfg = _common.config_for(interpret, config)
  if not supports(x, w):
    raise NotImplementedError(f"pallas aqlm_matmul supports uint8/uint16 codes (nbits 8 or 16) "
                              f"and floating x; got {w!r}, x.dtype={x.dtype}.")
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  cdtype = _common.compute_dtype(x.dtype, out_dtype)
  k, n = w.shape
  g, nm = w.in_group_size, w.num_codebooks
  i_total = k // g
  batch = x.shape[:-1]
  x2, m, bm = _common.as_rows(x.astype(cdtype), cfg.block_m)
  mp = x2.shape[0]
  ni = math.gcd(i_total, max(1, cfg.block_k // g))
  bn = _common.block_cols(n, cfg.block_n)
  xp = _common.plane_major(x2, g)  # (g, Mp, I)
  table = 2**w.nbits
  cbt = jnp.swapaxes(w.codebooks.astype(jnp.float32), 1, 2).reshape(-1)  # (M * g * 2**B,)
  scales = w.scales.astype(jnp.float32).reshape(1, n)
  in_specs = [pl.BlockSpec((g, bm, i_total), lambda i, j: (0, i, 0))]
  in_specs += [pl.BlockSpec((i_total, bn, None), functools.partial(lambda mi, i, j: (0, j, mi), mi))
               for mi in range(nm)]
  in_specs += [pl.BlockSpec(cbt.shape, lambda i, j: (0,)),
               pl.BlockSpec((1, bn), lambda i, j: (0, j))]
  kernel = functools.partial(_kernel, num_codebooks=nm, g=g, ni=ni, steps=i_total // ni,
                             use_dot=cfg.use_dot, cdtype=cdtype, table=table)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      grid=(mp // bm, pl.cdiv(n, bn)),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=_common.compiler_params(interpret, cfg, target_name),
      name=f"aqlm_matmul_{nm}x{w.nbits}_g{g}",
  )(xp, *([w.codes] * nm), cbt, scales)
  return y[:m].reshape(batch + (n,))


_differentiable = _common.differentiable_factory(_forward, aqlm_matmul_ref)


def aqlm_matmul(x: jax.Array, w: additive.AdditiveCodebookArray, *, interpret: bool = False,
                config: _common.KernelConfig | None = None,
                 target: str | None = None) -> jax.Array:
  """``x @ W`` for an :class:`~compressjax.formats.AdditiveCodebookArray`, in one Pallas kernel.

  Args:
    x: ``(..., K)`` floating activations.
    w: the AQLM weight, ``nbits`` 8 or 16.
    interpret: run in the Pallas interpreter (any backend, CPU included).
    config: block sizes; default: ``CONFIGS[target]`` of the current backend.
    target: ``"gpu"`` or ``"tpu"`` to pick the compiler parameters when lowering for a
      platform other than the default backend (lowering checks); default: the backend's.

  Returns:
    ``(..., N)`` in ``result_type(x.dtype, w.dtype)``; gradients (``x``, codebooks, scales)
    from :func:`aqlm_matmul_ref`.

  Raises:
    NotImplementedError: for unsupported codes or a backend without a kernel target.
  """
  if not supports(x, w):
    raise NotImplementedError(f"pallas aqlm_matmul supports uint8/uint16 codes (nbits 8 or 16) "
                              f"and floating x; got {w!r}, x.dtype={x.dtype}.")
  _common.config_for(interpret, config)
  return _differentiable(bool(interpret), config, target)(x, w)
