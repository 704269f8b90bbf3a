"""LQ-LoRA-style decomposition at rank 21: RTN-3bit-g64 + a rank-21 float16 pair, ~4.22 bits per
parameter on this model, i.e. no more than plain 4-bit g64 quantization (4.25): the equal-bits
comparison of issue 5."""

from configs import lqlora_w3g64_r32


def get_config():
  c = lqlora_w3g64_r32.get_config()
  c.compression.name = "lqlora-w3g64-r21"
  c.compression.kwargs.rank = 21
  c.output_dir = "runs/lqlora_w3g64_r21"
  return c
