"""Pure-jnp reference of :mod:`pallas_kernels.aqlm_matmul` (AQLM additive-codebook ``x @ W``).

References:
  Egiazarian et al., "Extreme Compression of Large Language Models via Additive Quantization"
  (AQLM), arXiv:2401.06118; ``Vahe1994/AQLM`` ``src/utils.py::_dequantize_weight``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from compressjax.formats import additive
from compressjax.formats import base

__all__ = ["aqlm_matmul_ref"]


def aqlm_matmul_ref(x: jax.Array, w: additive.AdditiveCodebookArray) -> jax.Array:
  """``x @ W``: decodes the whole weight (codeword gathers summed, times scales) in ``float32``.

  Differentiable in ``x``, ``w.codebooks`` and ``w.scales``.
  """
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = base.accumulation_dtype(out_dtype)
  wd = additive.decode(w.code_values(), w.codebooks.astype(acc), w.scales.astype(acc))
  return jnp.matmul(x.astype(acc), wd, preferred_element_type=acc).astype(out_dtype)
