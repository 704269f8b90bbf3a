"""RTN, 8-bit symmetric, one scale per output channel."""

from configs import rtn_w4g64


def get_config():
  c = rtn_w4g64.get_config()
  c.compression.name = "rtn-w8"
  c.compression.kwargs.bits = 8
  c.compression.kwargs.group_size = None
  c.output_dir = "runs/rtn_w8"
  return c
