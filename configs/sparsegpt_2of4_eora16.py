"""SparseGPT 2:4, then EoRA with rank 16 (float16 factors)."""

from configs import sparsegpt_2of4


def get_config():
  c = sparsegpt_2of4.get_config()
  c.compression.name = "sparsegpt-2:4+eora16"
  c.compression.steps = (
      {"method": "sparsegpt", "pattern": "2:4"},
      {"method": "eora", "rank": 16},
  )
  c.output_dir = "runs/sparsegpt_2of4_eora16"
  return c
