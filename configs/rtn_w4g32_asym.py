"""RTN 4-bit asymmetric, groups of 32: the reference GGUF's own Q4_1 grid (a lossless sanity check).

The reference model's linear layers are stored as Q4_1, so this setting must reproduce the
uncompressed perplexity (up to float16 rounding of the scales): it measures nothing about RTN.
"""

from configs import rtn_w4g64


def get_config():
  c = rtn_w4g64.get_config()
  c.compression.name = "rtn-w4g32-asym"
  c.compression.kwargs.group_size = 32
  c.compression.kwargs.symmetric = False
  c.output_dir = "runs/rtn_w4g32_asym"
  return c
