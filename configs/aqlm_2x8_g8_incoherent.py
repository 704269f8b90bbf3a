"""QuIP#-style incoherence processing, then AQLM 2x8 over groups of 8 (the settings of
``aqlm_2x8_g8``).

Each decoder kernel becomes ``Incoherent(AQLM codes, su, sv)``: random signs + Hadamard
rotations of its inputs and outputs (1 bit per sign stored, ``K + N`` bits per layer, +0.005
bits per parameter), and AQLM codes the rotated weight against the exactly rotated Hessian. The
model multiplies through fast Hadamard transforms of the activations.
"""

from configs import aqlm_2x8_g8


def get_config():
  c = aqlm_2x8_g8.get_config()
  c.compression.name = "incoherent-aqlm-2x8-g8"
  c.compression.steps = (
      {"method": "incoherence", "seed": 0},
      {"method": "aqlm", **c.compression.kwargs.to_dict()},
  )
  c.output_dir = "runs/aqlm_2x8_g8_incoherent"
  return c
