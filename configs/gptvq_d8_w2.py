"""GPTVQ, 8-D vectors at 1 bit per dimension (256-entry int8 codebooks), ~1.89 bits/param.

At 8 dimensions a 2-bit-per-dimension codebook has 65536 x 8 bytes, more than a whole layer's
2-bit budget, so this uses 1 bit per dimension and spends the rest on many codebooks: one per
block of 192 input rows x 96 outputs (18432 weights): uint8 codes, 8 bits per 8 weights
= 1 bit/param, codebook 256 x 8 int8 + a float16 scale = 16400 bits per block = 0.890
bits/param; 1.890 stored bits per parameter on every SmolLM2-135M linear layer (the next
possible block, 192 x 64, gives 2.335: block sides must divide 192 for this model's shapes).
"""

from configs import gptvq_d2_w2


def get_config():
  c = gptvq_d2_w2.get_config()
  c.compression.name = "gptvq-d8-w2"
  c.compression.kwargs.dim = 8
  c.compression.kwargs.bits = 1
  c.compression.kwargs.group_size = 192
  c.compression.kwargs.out_block = 96
  c.output_dir = "runs/gptvq_d8_w2"
  return c
