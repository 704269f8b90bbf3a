"""GPTQ 2-bit g64 followed by block-wise fine-tuning of scales and norms (AQLM's recipe)."""

from configs import gptq_w2g64


def get_config():
  c = gptq_w2g64.get_config()
  c.compression.name = "gptq-w2g64-ft"
  c.compression.block_finetune.steps = 100
  c.compression.block_finetune.lr = 1e-4
  c.compression.block_finetune.train_norms = True
  c.output_dir = "runs/gptq_w2g64_ft"
  return c
