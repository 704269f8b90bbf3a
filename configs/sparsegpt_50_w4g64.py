"""SparseGPT 50% then GPTQ 4-bit g64 with the mask fixed: SparseGPT's joint sparse + quantized
mode as one chain (mask bits + 4-bit codes of the kept half + group scales)."""

from configs import sparsegpt_50


def get_config():
  c = sparsegpt_50.get_config()
  c.compression.name = "sparsegpt-50%+gptq-w4g64"
  c.compression.steps = (
      {"method": "sparsegpt", "sparsity": 0.5},
      {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True,
       "act_order": True, "static_groups": True},
  )
  c.output_dir = "runs/sparsegpt_50_w4g64"
  return c
