"""AWQ then RTN, 3-bit symmetric, groups of 64 (the 4-bit AWQ recipe with fewer bits)."""

from configs import awq_w4g64


def get_config():
  c = awq_w4g64.get_config()
  c.compression.name = "awq-w3g64"
  c.compression.kwargs.bits = 3
  c.output_dir = "runs/awq_w3g64"
  return c
