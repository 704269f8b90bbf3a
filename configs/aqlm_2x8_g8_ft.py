"""AQLM 2x8 g8 followed by its block-wise fine-tune (AQLM's own recipe, Sec. 3.4).

After each block is coded, its codebooks, scales and norms are tuned with Adam to the
uncompressed block's outputs on the calibration windows (codes fixed). 16 steps of 4 windows
at lr 3e-4: the settings of the block-wise rows of GPTQ 2/3-bit and GPTVQ d4 in
``experiments/RESULTS.md`` ("Fine-tuning compressed models"), so the rows compare.
"""

from configs import aqlm_2x8_g8


def get_config():
  c = aqlm_2x8_g8.get_config()
  c.compression.name = "aqlm-2x8-g8-ft"
  c.compression.block_finetune.steps = 16
  c.compression.block_finetune.batch_size = 4
  c.compression.block_finetune.lr = 3e-4
  c.compression.block_finetune.train_norms = True
  c.output_dir = "runs/aqlm_2x8_g8_ft"
  return c
