"""Pallas kernel: activations times QuIP#'s E8P lattice-coded weights (16 bits per 8 weights).

A code ``c`` of 8 consecutive inputs decodes in registers: table index ``a = c >> 8``; sign of
coordinate ``k = 1..7`` is bit ``8 - k``; coordinate 0's sign makes the number of negative
signs have the parity of ``sum(S[a])`` (xor-folded popcount of bits 1..7 plus a 256-entry
parity table); shift ``+-1/4`` is bit 0. Coordinate ``k`` of every code is one ``(K / 8, N)``
plane: ``|S[a]_k|`` is looked up in the transposed table (8 KiB, on chip), signed,
shifted and multiplied with ``x[:, k::8]``. One scale per layer multiplies the result.

References:
  Tseng, Chee, Sun, Kuleshov, De Sa, "QuIP#", ICML 2024, arXiv:2402.04396 (Sec. 4.2);
  ``Cornell-RelaxML/quip-sharp`` ``quiptools/quiptools_e8p_gemv.cu::decode_matvec_e8p_kernel``
  (sign parity by xor folding, table lookup).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from compressjax.formats import e8p
from compressjax.quantize import e8p_core
from pallas_kernels import _common
from pallas_kernels.e8p_matmul_ref import e8p_matmul_ref

__all__ = ["e8p_matmul", "supports"]

_D = e8p_core.CODESZ
_ABS_T = np.ascontiguousarray(e8p_core.ABS_GRID.T)  # (8, 256) float32
_PARITY = (e8p_core.ABS_GRID.sum(axis=1).astype(np.int64) % 2).astype(np.float32)  # (256,)
#: Magnitudes ``|S[a]_k|`` at ``k * 256 + a``, then the parities of ``sum(S[a])`` at ``2048 + a``.
_TABLE = np.concatenate([_ABS_T.ravel(), _PARITY])


def supports(x: jax.Array, w: e8p.E8PArray) -> bool:
  """Cheap static check that the kernel handles ``x @ w``."""
  return (isinstance(w, e8p.E8PArray) and len(w.codes.shape) == 2
          and jnp.issubdtype(x.dtype, jnp.floating) and x.shape[-1] == w.shape[0])


def decode_coordinate(c: jax.Array, k: int, lookup) -> jax.Array:
  """Coordinate ``k`` of the codewords of ``int32`` codes ``c`` (any shape), in ``float32``.

  ``lookup(i)`` returns entries ``i`` of the flat table ``[ABS_GRID.T.ravel(), parity]``
  (``8 * 256`` magnitudes, then 256 parities of ``sum(S[a])``).
  """
  a = (c >> 8) & 0xFF
  if k == 0:
    v = (c >> 1) & 0x7F  # the 7 explicit sign bits; xor-fold to their parity
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    neg = (v ^ lookup(a + _D * 256).astype(jnp.int32)) & 1
  else:
    neg = (c >> (8 - k)) & 1
  mag = lookup(a + k * 256)
  shift = jnp.where((c & 1) == 1, 0.25, -0.25).astype(jnp.float32)
  return jnp.where(neg == 1, -mag, mag) + shift


def _kernel(xp_ref, codes_ref, tab_ref, scale_ref, o_ref, *, nb, steps, use_dot, cdtype):
  bm, bn = o_ref.shape
  lookup = lambda i: tab_ref[i]  # a gather from the on-chip table (a pointer gather in Triton)

  def step(s, acc):
    start = s * nb
    c = codes_ref[pl.ds(start, nb), :].astype(jnp.int32)
    for k in range(_D):
      wk = decode_coordinate(c, k, lookup)
      acc = acc + _common.mac(xp_ref[k, :, pl.ds(start, nb)], wk.astype(cdtype), use_dot)
    return acc

  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = (acc * scale_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def _forward(x, w, *, interpret, config, target_name=None):
  cfg = _common.config_for(interpret, config)
  if not supports(x, w):
    raise NotImplementedError(f"pallas e8p_matmul needs 2-D codes and floating x; got {w!r}, "
                              f"x.dtype={x.dtype}.")
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  cdtype = _common.compute_dtype(x.dtype, out_dtype)
  k, n = w.shape
  b = k // _D
  batch = x.shape[:-1]
  x2, m, bm = _common.as_rows(x.astype(cdtype), cfg.block_m)
  mp = x2.shape[0]
  nb = math.gcd(b, max(1, cfg.block_k // _D))
  bn = _common.block_cols(n, cfg.block_n)
  xp = _common.plane_major(x2, _D)  # (8, Mp, K/8)
  kernel = functools.partial(_kernel, nb=nb, steps=b // nb, use_dot=cfg.use_dot, cdtype=cdtype)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      grid=(mp // bm, pl.cdiv(n, bn)),
      in_specs=[pl.BlockSpec((_D, bm, b), lambda i, j: (0, i, 0)),
                pl.BlockSpec((b, bn), lambda i, j: (0, j)),
                pl.BlockSpec((_D * 256 + 256,), lambda i, j: (0,)),
                pl.BlockSpec((1, 1), lambda i, j: (0, 0))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=_common.compiler_params(interpret, cfg, target_name),
      name="e8p_matmul",
  )(xp, w.codes, jnp.asarray(_TABLE),
    w.scale.astype(jnp.float32).reshape(1, 1))
  return y[:m].reshape(batch + (n,))


_differentiable = _common.differentiable_factory(_forward, e8p_matmul_ref)


def e8p_matmul(x: jax.Array, w: e8p.E8PArray, *, interpret: bool = False,
               config: _common.KernelConfig | None = None,
                 target: str | None = None) -> jax.Array:
  """``x @ W`` for an :class:`~compressjax.formats.E8PArray`, in one Pallas kernel.

  Args:
    x: ``(..., K)`` floating activations.
    w: the E8P weight.
    interpret: run in the Pallas interpreter (any backend, CPU included).
    config: block sizes; default: ``CONFIGS[target]`` of the current backend.
    target: ``"gpu"`` or ``"tpu"`` to pick the compiler parameters when lowering for a
      platform other than the default backend (lowering checks); default: the backend's.

  Returns:
    ``(..., N)`` in ``result_type(x.dtype, w.dtype)``; gradients (``x``, ``scale``) from
    :func:`e8p_matmul_ref`.

  Raises:
    NotImplementedError: for unsupported inputs or a backend without a kernel target.
  """
  if not supports(x, w):
    raise NotImplementedError(f"pallas e8p_matmul needs 2-D codes and floating x; got {w!r}, "
                              f"x.dtype={x.dtype}.")
  _common.config_for(interpret, config)
  return _differentiable(bool(interpret), config, target)(x, w)
