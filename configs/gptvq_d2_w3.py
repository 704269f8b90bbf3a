"""GPTVQ, 2-D vectors at 3 bits per dimension (64-entry int8 codebooks), ~3.17 bits/param.

One codebook per block of 64 input rows x 96 outputs (6144 weights): codes 6 bits per 2 weights
(bit-packed) = 3 bits/param, codebook 64 x 2 int8 + a float16 scale = 1040 bits per block
= 0.169 bits/param; 3.169 stored bits per parameter on every SmolLM2-135M linear layer.
"""

from configs import gptvq_d2_w2


def get_config():
  c = gptvq_d2_w2.get_config()
  c.compression.name = "gptvq-d2-w3"
  c.compression.kwargs.bits = 3
  c.compression.kwargs.group_size = 64
  c.compression.kwargs.out_block = 96
  c.output_dir = "runs/gptvq_d2_w3"
  return c
