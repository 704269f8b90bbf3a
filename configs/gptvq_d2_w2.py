"""GPTVQ, 2-D vectors at 2 bits per dimension (16-entry int8 codebooks), ~2.13 bits/param.

One codebook per block of 32 input rows x 64 outputs (2048 weights): codes 4 bits per 2 weights
(bit-packed) = 2 bits/param, codebook 16 x 2 int8 + a float16 scale = 272 bits per block
= 0.133 bits/param; 2.133 stored bits per parameter on every SmolLM2-135M linear layer
(``gptvq_core.bits_per_param``). Calibration as in ``configs/default.py``.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "gptvq-d2-w2"
  c.compression.method = "gptvq"
  # Vector dimension: consecutive input rows quantized jointly.
  c.compression.kwargs.dim = 2
  # Bits per dimension (codebook entries = 2**(dim * bits)).
  c.compression.kwargs.bits = 2
  # Input rows per codebook.
  c.compression.kwargs.group_size = 32
  # Outputs per codebook.
  c.compression.kwargs.out_block = 64
  # Hessian-weighted k-means (EM) iterations per codebook.
  c.compression.kwargs.kmeans_iters = 10
  c.output_dir = "runs/gptvq_d2_w2"
  return c
