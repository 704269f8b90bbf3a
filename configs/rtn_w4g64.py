"""RTN, 4-bit symmetric, groups of 64 along the input, on every decoder linear layer."""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "rtn-w4g64"
  c.compression.method = "rtn"
  c.compression.kwargs.bits = 4
  c.compression.kwargs.group_size = 64
  c.compression.kwargs.symmetric = True
  c.output_dir = "runs/rtn_w4g64"
  return c
