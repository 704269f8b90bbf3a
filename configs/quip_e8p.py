"""QuIP#-style 2-bit E8P lattice codebook with BlockLDLQ (2 bits per weight + one scale per
layer).

QuIP# applies E8P to incoherence-processed weights, so the chain starts with the randomized
Hadamard transform (``incoherence``: random signs + Hadamard on both sides, 1 bit per sign
stored, so 2 bits per weight + (K + N) sign bits + 4 bytes per layer) and E8P + BlockLDLQ then
rounds the rotated weight with the rotated Hessian.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "quip-e8p"
  # Steps run in order: the incoherence rotation first (see the module docstring).
  c.compression.steps = (
      {"method": "incoherence", "seed": 0},
      # E8P codebook, BlockLDLQ with 1% damping, RMS/0.9 layer scale (QuIP#'s E8P12 setting);
      # tune_iters: extra coordinate-descent passes (the reference's quip_tune_iters defaults
      # to 10; each pass costs about one more BlockLDLQ sweep).
      {"method": "e8p", "percdamp": 0.01, "blocksize": 128, "scale_override": 0.9,
       "tune_iters": 0},
  )
  c.output_dir = "runs/quip_e8p"
  return c
