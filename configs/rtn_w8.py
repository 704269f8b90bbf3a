"""RTN, 8-bit symmetric, per output channel, on every decoder linear layer."""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "rtn-w8"
  c.compression.method = "rtn"
  c.compression.kwargs.bits = 8
  c.compression.kwargs.group_size = None
  c.compression.kwargs.symmetric = True
  c.output_dir = "runs/rtn_w8"
  c.overwrite = True
  return c
