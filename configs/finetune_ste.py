"""Straight-through (QAT) fine-tune of a compressed checkpoint: latent full-precision weights,
codes recomputed from them at every step (``compressjax.finetune.ste``). Same steps, windows and
tokens as ``configs/finetune_kd.py``, so the modes compare at equal steps and tokens seen.

  compressjax finetune --config configs/finetune_ste.py --config.checkpoint=runs/gptq_w2g64
"""

import ml_collections

from configs import finetune_kd


def get_config() -> ml_collections.ConfigDict:
  c = finetune_kd.get_config()
  c.name = "ste"
  c.finetune.mode = "ste"
  # Beam of the AQLM codes' L2 re-encoding (1: coordinate descent over the codebooks).
  c.finetune.beam_size = 1
  return c
