"""LQ-LoRA-style decomposition on a 2-bit base: RTN-2bit-g64 + a rank-21 float16 pair, ~3.22 bits
per parameter on this model, i.e. no more than plain 3-bit g64 quantization (3.25)."""

from configs import lqlora_w3g64_r32


def get_config():
  c = lqlora_w3g64_r32.get_config()
  c.compression.name = "lqlora-w2g64-r21"
  c.compression.kwargs.bits = 2
  c.compression.kwargs.rank = 21
  c.output_dir = "runs/lqlora_w2g64_r21"
  return c
