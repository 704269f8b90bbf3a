"""GPTQ, 3-bit symmetric, groups of 64 along the input, on every decoder linear layer."""

from configs import rtn_w3g64


def get_config():
  c = rtn_w3g64.get_config()
  c.compression.name = "gptq-w3g64"
  c.compression.method = "gptq"
  c.output_dir = "runs/gptq_w3g64"
  return c
