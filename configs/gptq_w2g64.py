"""GPTQ, 2-bit symmetric, groups of 64 (the 4-bit GPTQ recipe with fewer bits)."""

from configs import gptq_w4g64


def get_config():
  c = gptq_w4g64.get_config()
  c.compression.name = "gptq-w2g64"
  c.compression.kwargs.bits = 2
  c.output_dir = "runs/gptq_w2g64"
  return c
