"""Quantization algorithms (pure math in ``*_core`` modules)."""

from compressjax.quantize.gptq_core import gptq_quantize, gptq_quantize_fused
from compressjax.quantize.gptq_core import gptq_reference
from compressjax.quantize.rtn_core import RTN_BITS
from compressjax.quantize.spqr_core import owq_quantize
from compressjax.quantize.spqr_core import owq_sensitivity
from compressjax.quantize.spqr_core import spqr_quantize
from compressjax.quantize.rtn_core import quantize_codes
from compressjax.quantize.rtn_core import quantize_rtn
from compressjax.quantize.rtn_core import rtn_codes
from compressjax.quantize.rtn_core import rtn_params
from compressjax.quantize.gptvq_core import gptvq_quantize

__all__ = [
    "RTN_BITS",
    "gptq_quantize",
    "gptq_quantize_fused",
    "gptq_reference",
    "owq_quantize",
    "owq_sensitivity",
    "spqr_quantize",
    "quantize_codes",
    "quantize_rtn",
    "rtn_codes",
    "rtn_params",
    "gptvq_quantize",
]
