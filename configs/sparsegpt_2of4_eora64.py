"""SparseGPT 2:4, then EoRA with rank 64 (float16 factors)."""

from configs import sparsegpt_2of4


def get_config():
  c = sparsegpt_2of4.get_config()
  c.compression.name = "sparsegpt-2:4+eora64"
  c.compression.steps = (
      {"method": "sparsegpt", "pattern": "2:4"},
      {"method": "eora", "rank": 64},
  )
  c.output_dir = "runs/sparsegpt_2of4_eora64"
  return c
