"""GPTVQ, 4-D vectors at 2 bits per dimension (256-entry int8 codebooks), ~2.22 bits/param.

One codebook per block of 192 input rows x 192 outputs (36864 weights): uint8 codes, 8 bits per
4 weights = 2 bits/param, codebook 256 x 4 int8 + a float16 scale = 8208 bits per block
= 0.223 bits/param; 2.223 stored bits per parameter on every SmolLM2-135M linear layer.
"""

from configs import gptvq_d2_w2


def get_config():
  c = gptvq_d2_w2.get_config()
  c.compression.name = "gptvq-d4-w2"
  c.compression.kwargs.dim = 4
  c.compression.kwargs.group_size = 192
  c.compression.kwargs.out_block = 192
  c.output_dir = "runs/gptvq_d4_w2"
  return c
