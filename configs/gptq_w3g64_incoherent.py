"""QuIP#-style incoherence processing, then GPTQ 3-bit g64 (the settings of gptq_w3g64).

Each decoder kernel becomes ``Incoherent(Wt, su, sv)`` (random signs + Hadamard rotations of
its inputs and outputs, 1 bit per sign stored) and GPTQ quantizes the rotated ``Wt`` with the
rotated Hessian; the model multiplies through fast Hadamard transforms of the activations.

act_order stays on, as in configs/gptq_w2g64_incoherent.py (which says why).
"""

from configs import gptq_w2g64_incoherent, gptq_w3g64


def get_config():
  return gptq_w2g64_incoherent.incoherent(gptq_w3g64.get_config(), "incoherent-gptq-w3g64",
                                          "runs/gptq_w3g64_incoherent")
