"""RTN, 3-bit symmetric, groups of 64 along the input (the 4-bit recipe with fewer bits)."""

from configs import rtn_w4g64


def get_config():
  c = rtn_w4g64.get_config()
  c.compression.name = "rtn-w3g64"
  c.compression.kwargs.bits = 3
  c.output_dir = "runs/rtn_w3g64"
  return c
