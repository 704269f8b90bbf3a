"""GPTQ, 4-bit symmetric, groups of 64 along the input, on every decoder linear layer.

Calibration follows the standard protocol (``calibration`` block of ``configs/default.py``).
"""

from configs import rtn_w4g64


def get_config():
  c = rtn_w4g64.get_config()
  c.compression.name = "gptq-w4g64"
  c.compression.method = "gptq"
  c.output_dir = "runs/gptq_w4g64"
  return c
