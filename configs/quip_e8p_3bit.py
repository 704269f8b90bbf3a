"""QuIP#'s 3-bit mode (E8P12RVQ3B) with incoherence: configs/quip_e8p.py with a residual stage.

Each 8-vector is rounded to E8P (2 bits per weight), and its residual, magnified 2.04x, to the
nearest of 256 points of the E8 lattice (E81B: the origin, the 240 roots and 15 of the +-2 e_k;
1 bit per weight), jointly inside BlockLDLQ. 3 bits per weight + two float32 scales per layer +
the incoherence signs (K + N bits). The codebook's own layer scale, RMS(W) / 0.98 (its
``opt_scale``; the reference's 3-bit scripts pass no --scale_override), replaces the 2-bit
setting's 0.9.
"""

from configs import quip_e8p


def rvq(c, bits: int, name: str, output_dir: str):
  """``c`` (configs/quip_e8p.py) with the E8P step at ``bits`` (3 or 4) and its default scales."""
  rotate, lattice = c.compression.steps
  c.compression.name = name
  c.compression.steps = (
      rotate,
      # scale_override and resid_scale left out: the codebook's defaults (e8p_core.RVQ_DEFAULTS).
      {k: v for k, v in dict(lattice).items() if k != "scale_override"} | {"bits": bits},
  )
  c.output_dir = output_dir
  return c


def get_config():
  return rvq(quip_e8p.get_config(), 3, "quip-e8p-3bit", "runs/quip_e8p_3bit")
