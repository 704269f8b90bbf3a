"""Sparsegpt, 4:8 semi-structured (4 kept of every 8 input rows)."""

from configs import sparsegpt_50


def get_config():
  c = sparsegpt_50.get_config()
  c.compression.name = "sparsegpt-4:8"
  c.compression.kwargs.pattern = "4:8"
  c.output_dir = "runs/sparsegpt_4of8"
  return c
