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
  # (tau 0.02 with lr_v 2e-2 was worse than no tuning on the tiny 2-bit model of
  # tests/test_ste_pv.py.)
  c.finetune.tau = 0.005
  # Adam learning rate of the straight-through buffer (weight units). 1e-3: never worse than KD
  # on the reference model (GPTQ 2/3-bit g64, GPTVQ d4 2-bit) and the best on GPTVQ d4; on 2-bit
  # scalar grids (a grid step ~0.33 there) it changes no code in 16 steps, and 5e-3 was the
  # setting that beat KD and STE (README, "Fine-tuning (issue 14)").
  c.finetune.lr_v = 1e-3
  # Units of lr_v: "weight" (the reference's) or "grid" (a fraction of each weight's grid step:
  # the group scale for scalar grids, the codebook's nearest-neighbour spacing for VQ).
  c.finetune.v_units = "weight"
  # Pull of the buffer towards the new decoded weight after each V-step (1: reset).
  c.finetune.delta_decay = 0.0
  # Beam of the AQLM codes' L2 re-encoding (1: coordinate descent over the codebooks).
  c.finetune.beam_size = 1
  return c
