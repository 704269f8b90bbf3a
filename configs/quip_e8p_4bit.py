"""QuIP#'s 4-bit mode (E8P12RVQ4B) with incoherence: configs/quip_e8p.py with a second E8P stage.

Each 8-vector is rounded to E8P, and its residual, magnified 3.45x, to E8P again, jointly inside
BlockLDLQ: 4 bits per weight + two float32 scales per layer + the incoherence signs. Layer scale
RMS(W) / 1.03, the codebook's ``opt_scale`` (some reference scripts pass --scale_override 0.9
for 4 bits; the codebook default is kept here).
"""

from configs import quip_e8p, quip_e8p_3bit


def get_config():
  return quip_e8p_3bit.rvq(quip_e8p.get_config(), 4, "quip-e8p-4bit", "runs/quip_e8p_4bit")
