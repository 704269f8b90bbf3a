"""RTN, 2-bit symmetric, groups of 64 along the input (the 4-bit recipe with fewer bits)."""

from configs import rtn_w4g64


def get_config():
  c = rtn_w4g64.get_config()
  c.compression.name = "rtn-w2g64"
  c.compression.kwargs.bits = 2
  c.output_dir = "runs/rtn_w2g64"
  return c
