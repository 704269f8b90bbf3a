"""AQLM 2x8 g8, then EoRA: a rank-16 correction of each layer's AQLM error in the eigenspace
of its calibration inputs, the factors stored as 4-bit RTN codes (``factor_bits=4``).

Rank 16 with 4-bit factors adds 16 * (K + N) * 4 bits per layer plus the factors' scales:
planned on a 576x1536 layer the sum is 2.40 bits per parameter (AQLM alone: 2.10 there).
"""

from configs import aqlm_2x8_g8


def get_config():
  c = aqlm_2x8_g8.get_config()
  c.compression.name = "aqlm-2x8-g8+eora16-f4"
  c.compression.steps = (
      {"method": "aqlm", **c.compression.kwargs.to_dict()},
      {"method": "eora", "rank": 16, "factor_bits": 4},
  )
  c.output_dir = "runs/aqlm_2x8_g8_eora16"
  return c
