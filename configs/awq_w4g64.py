"""AWQ (activation-aware scaling + clipping search) then RTN, 4-bit symmetric, groups of 64.

``compression.method = "awq"`` builds ``chain(awq(...), select((where, rtn(...))))``: the scales
are folded into the RMSNorm weights and the up projection, then the kernels are quantized.
"""

from configs import rtn_w4g64


def get_config():
  c = rtn_w4g64.get_config()
  c.compression.name = "awq-w4g64"
  c.compression.method = "awq"
  # The quantizer after the AWQ rewrite: "rtn" (the paper) or "gptq".
  c.compression.kwargs.quantizer = "rtn"
  # Grid points of the scale exponent and of the clipping search.
  c.compression.kwargs.n_grid = 20
  # Search per-group clipping ranges (q and k are never clipped).
  c.compression.kwargs.clip = True
  c.output_dir = "runs/awq_w4g64"
  return c
