"""AWQ then RTN, 2-bit symmetric, groups of 64."""

from configs import awq_w4g64


def get_config():
  c = awq_w4g64.get_config()
  c.compression.name = "awq-w2g64"
  c.compression.kwargs.bits = 2
  c.output_dir = "runs/awq_w2g64"
  return c
