"""PV-tuning of a compressed checkpoint (``compressjax.finetune.pv``): each step a P-step
(Adam on scales/zeros and norms, codes fixed) and a V-step (Adam step of a straight-through
buffer in weight space, then at most ``tau`` of each weight's codes re-encoded). Same steps,
windows and tokens as ``configs/finetune_kd.py``.

  compressjax finetune --config configs/finetune_pv.py --config.checkpoint=runs/gptq_w2g64
"""

import ml_collections

from configs import finetune_kd


def get_config() -> ml_collections.ConfigDict:
  c = finetune_kd.get_config()
  c.name = "pv"
  c.finetune.mode = "pv"
  # Largest fraction of each weight's codes one V-step may change (the paper's subspace size).
  # (0.005 and lr_v 5e-3: the setting that beat KD on the tiny 2-bit model of tests/test_ste_pv.py;
  # tau 0.02 with lr_v 2e-2 was worse than no tuning there.)
  c.finetune.tau = 0.005
  # Adam learning rate of the straight-through buffer (weight units).
  c.finetune.lr_v = 5e-3
  # Pull of the buffer towards the new decoded weight after each V-step (1: reset).
  c.finetune.delta_decay = 0.0
  # Beam of the AQLM codes' L2 re-encoding (1: coordinate descent over the codebooks).
  c.finetune.beam_size = 1
  return c
