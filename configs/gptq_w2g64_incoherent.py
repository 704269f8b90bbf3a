"""QuIP#-style incoherence processing, then GPTQ 2-bit g64 (the settings of gptq_w2g64).

Each decoder kernel becomes ``Incoherent(Wt, su, sv)`` (random signs + Hadamard rotations of
its inputs and outputs, 1 bit per sign stored) and GPTQ quantizes the rotated ``Wt`` with the
rotated Hessian; the model multiplies through fast Hadamard transforms of the activations.

act_order stays on (with static groups), unlike QuIP#, which quantizes in natural order: after
the rotation the Hessian's diagonal is nearly flat, so the order matters less, but with static
groups it costs nothing at inference, and on 4 synthetic heavy-tailed layers (K=192, N=256,
correlated inputs with outlier channels) it lowered the Hessian-weighted output error of
incoherence + GPTQ every time: 2 bits 44.5-51.5 vs 55.1-65.0, 3 bits 7.9-9.2 vs 8.3-9.7.
"""

from configs import gptq_w2g64


def incoherent(c, name: str, output_dir: str):
  """``c``'s GPTQ settings as a chain behind the incoherence rotation."""
  c.compression.name = name
  # A chain: rotate every selected kernel (signs from seed + path), then GPTQ on the rotated one.
  c.compression.steps = (
      {"method": "incoherence", "seed": 0},
      {"method": "gptq", **c.compression.kwargs.to_dict()},
  )
  c.output_dir = output_dir
  return c


def get_config():
  return incoherent(gptq_w2g64.get_config(), "incoherent-gptq-w2g64",
                    "runs/gptq_w2g64_incoherent")
