"""LQ-LoRA-style decomposition at rank 16: RTN-3bit-g64 + a rank-16 float16 pair, ~3.99 bits per
parameter on this model, i.e. fewer bits than plain 4-bit g64 quantization (4.25)."""

from configs import lqlora_w3g64_r32


def get_config():
  c = lqlora_w3g64_r32.get_config()
  c.compression.name = "lqlora-w3g64-r16"
  c.compression.kwargs.rank = 16
  c.output_dir = "runs/lqlora_w3g64_r16"
  return c
