"""Pallas kernels for compressed weights, each beside its pure-jnp reference.

* :mod:`pallas_kernels.quant_matmul` (+ ``quant_matmul_ref``): packed 2/3/4/8-bit integers
  with grouped scales and optional zeros (:class:`compressjax.formats.QuantizedArray`);
* :mod:`pallas_kernels.aqlm_matmul` (+ ``aqlm_matmul_ref``): AQLM 2x8 / 1x16 codebooks
  (:class:`compressjax.formats.AdditiveCodebookArray`);
* :mod:`pallas_kernels.e8p_matmul` (+ ``e8p_matmul_ref``): QuIP#'s E8P
  (:class:`compressjax.formats.E8PArray`).

Importing this package (``compressjax.formats`` does) registers two implementations per format
with :func:`compressjax.formats.register_matmul`:

* ``"pallas"`` (priority 0, tried before ``"xla"``): used automatically when the default
  backend is a GPU or TPU and the kernel supports the shapes and dtypes; otherwise
  :func:`compressjax.formats.dot` falls back to ``"xla"``.
* ``"pallas_interpret"`` (priority below ``"xla"``, so never chosen automatically): the same
  kernel in the Pallas interpreter, on any backend, for tests and debugging; request it with
  ``formats.dot(x, w, implementation="pallas_interpret")`` or a model's
  ``LlamaConfig(matmul_implementation=...)``.

Both are differentiable: a ``jax.custom_vjp`` whose backward pass is the reference's.
"""

from __future__ import annotations

import functools

import jax

from compressjax.formats import additive
from compressjax.formats import dispatch
from compressjax.formats import e8p
from compressjax.formats import quantized
from pallas_kernels._common import CONFIGS
from pallas_kernels._common import KernelConfig
from pallas_kernels.aqlm_matmul import aqlm_matmul
from pallas_kernels.aqlm_matmul_ref import aqlm_matmul_ref
from pallas_kernels.e8p_matmul import e8p_matmul
from pallas_kernels.e8p_matmul_ref import e8p_matmul_ref
from pallas_kernels.quant_matmul import quant_matmul
from pallas_kernels.quant_matmul_ref import quant_matmul_ref
from pallas_kernels import quant_matmul_mgpu  # pylint: disable=g-bad-import-order

__all__ = [
    "CONFIGS",
    "INTERPRET_PRIORITY",
    "KernelConfig",
    "aqlm_matmul",
    "aqlm_matmul_ref",
    "e8p_matmul",
    "e8p_matmul_ref",
    "quant_matmul",
    "quant_matmul_mgpu",
    "quant_matmul_ref",
    "register",
]

#: Priority of ``"pallas_interpret"``: below ``"xla"``, so only an explicit request uses it.
INTERPRET_PRIORITY = dispatch.FALLBACK_PRIORITY - 100

_KERNELS = (
    (quantized.QuantizedArray, quant_matmul, "quant_matmul"),
    (additive.AdditiveCodebookArray, aqlm_matmul, "aqlm_matmul"),
    (e8p.E8PArray, e8p_matmul, "e8p_matmul"),
)


def _on_accelerator() -> bool:
  return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def register() -> None:
  """Registers ``"pallas"`` and ``"pallas_interpret"`` for every kernel's format (idempotent)."""
  for fmt, fn, module in _KERNELS:
    supports = __import__(f"pallas_kernels.{module}", fromlist=["supports"]).supports
    dispatch.register_matmul(
        fmt, "pallas", functools.partial(fn, interpret=False),
        can_use=lambda x, w, s=supports: _on_accelerator() and s(x, w), priority=0)
    dispatch.register_matmul(
        fmt, "pallas_interpret", functools.partial(fn, interpret=True),
        can_use=supports, priority=INTERPRET_PRIORITY)
  # Mosaic GPU (Hopper) 2/3/4/8-bit kernel: only on request (below "xla", so never chosen
  # automatically: lowers, not yet run on a GPU), e.g. formats.dot(x, w, prefer="pallas_mgpu")
  # or implementation="pallas_mgpu"; its predicate asks for a Hopper GPU backend and a plan
  # (quant_matmul_mgpu.can_use), so prefer= falls back to "xla" elsewhere.
  dispatch.register_matmul(
      quantized.QuantizedArray, "pallas_mgpu", quant_matmul_mgpu.quant_matmul_mgpu,
      can_use=quant_matmul_mgpu.can_use, priority=INTERPRET_PRIORITY)


register()
