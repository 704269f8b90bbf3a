"""Pure-jnp reference of :mod:`pallas_kernels.e8p_matmul` (QuIP# E8P ``x @ W``).

References:
  Tseng et al., "QuIP#", ICML 2024, arXiv:2402.04396 (Sec. 4.2, E8P).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from compressjax.formats import base
from compressjax.formats import e8p
from compressjax.quantize import e8p_core

__all__ = ["e8p_matmul_ref"]


def e8p_matmul_ref(x: jax.Array, w: e8p.E8PArray) -> jax.Array:
  """``x @ W``: decodes every code with :func:`compressjax.quantize.e8p_core.decode`.

  Differentiable in ``x`` and ``w.scale``.
  """
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  b, n = w.codes.shape
  wd = jnp.swapaxes(e8p_core.decode(w.codes, acc), 1, 2).reshape(b * e8p_core.CODESZ, n)
  y = jnp.matmul(x.astype(acc), wd, preferred_element_type=acc) * w.scale.astype(acc)
  return y.astype(out_dtype)
