"""``x @ W`` for packed :class:`~compressjax.formats.QuantizedArray` weights with the C++ CPU kernel.

:func:`quant_gemv` calls the XLA FFI custom call built from ``quant_gemv.cc`` (see
:mod:`compressjax.kernels.cpu.builder`): the packed codes are read as stored and decoded in
registers next to the multiply (AVX2/FMA, 8 columns per register; a portable scalar loop on
other CPUs), accumulated in float32 per scale group, and each group's scale is folded once:
``y += s_g * sum_k x_k (q_k - c)`` (plus ``(z_g + c s_g) * sum_k x_k`` when asymmetric). Output
columns are split over XLA's intra-op thread pool (``threads``; ``0``, the pool, by default).

It applies to float32 activations with at most :data:`MAX_ROWS` rows (decode shapes) and plain
array scales/zeros in float32, float16 or bfloat16; :func:`can_use` is the dispatch predicate.
Gradients: a ``custom_vjp`` whose backward pass is the XLA reference
(:func:`compressjax.formats.quantized_matmul_xla`). Under :func:`jax.vmap` over the activations
the batch is folded into the rows (the reference takes over above :data:`MAX_ROWS` rows, or when
the weight itself is batched).

References:
  llama.cpp ``ggml-quants.c`` (``ggml_vec_dot_q4_0_q8_0``: nibbles decoded in SIMD registers,
  one scale per block); Frantar et al., "GPTQ", arXiv:2210.17323 (grouped codes).
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.formats import base
from compressjax.formats import dispatch
from compressjax.formats import quantized
from compressjax.kernels.cpu import builder as _build

__all__ = ["DEFAULT_THREADS", "MAX_ROWS", "can_use", "cpu_matmul", "default_threads", "quant_gemv",
           "supports"]

#: Largest number of activation rows (product of the leading dims) the kernel takes; above it
#: dispatch uses the XLA path (tiled decode + XLA's GEMM, better at prefill sizes).
MAX_ROWS = 16

#: Default ``threads``: 0 (XLA's intra-op pool). In one-layer loops (2-core host, load ~2.5,
#: medians of 15, ms, 4-bit g64, one thread / pool) one thread was faster on the reference
#: model's shapes (576x576 1 row 0.028 / 0.051; 576x1536 0.063 / 0.065; 1536x576 0.064 / 0.087),
#: but in the whole decode step the pool wins (reference model, batch 1: 29.8 -> 38.2 tokens/s at
#: 4 bits, 39.3 -> 48.5 at 2 bits; `bench_kernels --decode`, 2026-12-07) and on Llama-7B shapes
#: it reads at 60-72% of the copy bandwidth against 34-41% for one thread.
DEFAULT_THREADS = 0


def default_threads() -> int:
  """``threads`` of the automatic ``"cpu"`` dispatch: ``$COMPRESSJAX_CPU_KERNEL_THREADS`` (read at
  trace time; ``0``: XLA's intra-op pool) or :data:`DEFAULT_THREADS`."""
  v = os.environ.get("COMPRESSJAX_CPU_KERNEL_THREADS", "").strip()
  if not v:
    return DEFAULT_THREADS
  if not v.isdigit():
    raise ValueError(f"COMPRESSJAX_CPU_KERNEL_THREADS={v!r}: expected an integer >= 0 "
                     "(0: XLA's intra-op thread pool)")
  return int(v)

_STAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(jnp.bfloat16))


def _plain_stat(a) -> bool:
  return (a is not None and not isinstance(a, base.CompressedArray) and hasattr(a, "shape")
          and len(a.shape) == 2 and np.dtype(a.dtype) in _STAT_DTYPES)


def supports(x: jax.Array, w) -> bool:
  """Static check that the kernel computes ``x @ w`` (format, layout, dtypes, rows)."""
  if not isinstance(w, quantized.QuantizedArray):
    return False
  rows = math.prod(x.shape[:-1])
  return (w.bits in (2, 3, 4, 8) and len(w.packed.shape) == 2
          and np.dtype(w.packed.dtype) == np.uint32 and _plain_stat(w.scale)
          and (w.symmetric or _plain_stat(w.zero)) and x.ndim >= 1
          and np.dtype(x.dtype) == np.float32
          and np.dtype(jnp.result_type(x.dtype, w.dtype)) == np.float32
          and x.shape[-1] == w.shape[0] and rows <= MAX_ROWS)


def can_use(x: jax.Array, w) -> bool:
  """Dispatch predicate: enabled (``COMPRESSJAX_CPU_KERNEL``), CPU backend and :func:`supports`."""
  return _build.enabled() and jax.default_backend() == "cpu" and supports(x, w)


def _ffi(x2, packed, scale, zero, *, bits, group_size, threads, variant):
  lib = _build.load(variant=variant)
  m, n = x2.shape[0], packed.shape[1]
  target = lib.targets["sym" if zero is None else "asym"]
  args = (x2, packed, scale) if zero is None else (x2, packed, scale, zero)
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32))(
      *args, bits=np.int64(bits), group_size=np.int64(group_size), threads=np.int64(threads))


def _reference_2d(x2, packed, scale, zero, meta):
  w = quantized.QuantizedArray(packed, scale, zero, **meta)
  return dispatch.quantized_matmul_xla(x2, w).astype(jnp.float32)


def _batched_call(meta, threads, variant):
  """The kernel on ``(M, K)`` activations, with a vmap rule that folds a batch into the rows."""
  kw = dict(bits=meta["bits"], group_size=meta["group_size"], threads=threads, variant=variant)

  @jax.custom_batching.custom_vmap
  def call(x2, packed, scale, zero):
    return _ffi(x2, packed, scale, zero, **kw)

  @call.def_vmap
  def rule(axis_size, in_batched, x2, packed, scale, zero):
    xb, pb, sb = in_batched[:3]
    zb = in_batched[3] if zero is not None else False
    if pb or sb or zb or not xb:
      axes = (0 if xb else None, 0 if pb else None, 0 if sb else None,
              None if zero is None else (0 if zb else None))
      ref = functools.partial(_reference_2d, meta=meta)
      return jax.vmap(ref, in_axes=axes)(x2, packed, scale, zero), True
    b, m, k = x2.shape
    flat = x2.reshape(b * m, k)
    if b * m <= MAX_ROWS:
      y = _ffi(flat, packed, scale, zero, **kw)
    else:
      y = _reference_2d(flat, packed, scale, zero, meta)
    return y.reshape(b, m, -1), True

  return call


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gemv(x2, w, threads, variant):
  meta = dict(bits=w.bits, group_size=w.group_size, shape=w.shape, symmetric=w.symmetric,
              dtype=w.dtype)
  return _batched_call(meta, threads, variant)(x2, w.packed, w.scale, w.zero)


def _gemv_fwd(x2, w, threads, variant):
  return _gemv(x2, w, threads, variant), (x2, w)


def _gemv_bwd(threads, variant, res, g):
  del threads, variant
  x2, w = res
  _, vjp = jax.vjp(lambda x, w: dispatch.quantized_matmul_xla(x, w).astype(jnp.float32), x2, w)
  return vjp(g)


_gemv.defvjp(_gemv_fwd, _gemv_bwd)


def quant_gemv(x: jax.Array, w: quantized.QuantizedArray, *, threads: int = DEFAULT_THREADS,
               variant: str = "native") -> jax.Array:
  """``x @ w`` with the C++ CPU kernel.

  Args:
    x: float32 activations ``(..., K)`` with at most :data:`MAX_ROWS` rows in all.
    w: a ``(K, N)`` :class:`~compressjax.formats.QuantizedArray` (2, 3, 4 or 8 bits, plain
      float32/float16/bfloat16 scales and zeros).
    threads: threads to split the output columns over (:data:`DEFAULT_THREADS`); ``0``: as
      many as XLA's intra-op pool has (the calling thread works too).
    variant: ``"native"`` or ``"scalar"`` (the portable loop; see :func:`builder.load`).

  Returns:
    ``(..., N)`` float32, equal to ``formats.dot(x, w, implementation="xla")`` up to float32
    summation order.

  Raises:
    NotImplementedError: if :func:`supports` is false for ``x`` and ``w``.
    CpuKernelBuildError: if the library cannot be built or loaded.
  """
  if not supports(x, w):
    raise NotImplementedError(
        f"the CPU kernel needs float32 x with at most {MAX_ROWS} rows and a 2-D QuantizedArray "
        f"with plain float32/float16/bfloat16 scales; got x.shape={x.shape}, "
        f"x.dtype={x.dtype}, w={w!r}.")
  k, n = w.shape
  batch = x.shape[:-1]
  y = _gemv(x.reshape(math.prod(batch), k), w, int(threads), variant)
  return y.reshape(batch + (n,))


_WARNED = [False]


def cpu_matmul(x: jax.Array, w: quantized.QuantizedArray) -> jax.Array:
  """The ``"cpu"`` implementation registered with :func:`compressjax.formats.register_matmul`.

  A failed build warns once and raises :class:`NotImplementedError` (with the compiler's
  message), so automatic dispatch falls back to ``"xla"``; forcing ``implementation="cpu"``
  surfaces that error.
  """
  try:
    _build.load()
  except _build.CpuKernelBuildError as e:
    if not _WARNED[0]:
      _WARNED[0] = True
      warnings.warn(f"compressjax CPU kernel unavailable, using the XLA path: {e}",
                    RuntimeWarning, stacklevel=2)
    raise NotImplementedError(str(e)) from e
  return quant_gemv(x, w, threads=default_threads())


def register() -> None:
  """Registers ``"cpu"`` for :class:`~compressjax.formats.QuantizedArray` (priority 0: tried
  before ``"xla"`` when :func:`can_use` holds). Idempotent."""
  dispatch.register_matmul(quantized.QuantizedArray, "cpu", cpu_matmul, can_use=can_use,
                           priority=0)
