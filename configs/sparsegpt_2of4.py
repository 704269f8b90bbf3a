"""Sparsegpt, 2:4 semi-structured (2 kept of every 4 input rows)."""

from configs import sparsegpt_50


def get_config():
  c = sparsegpt_50.get_config()
  c.compression.name = "sparsegpt-2:4"
  c.compression.kwargs.pattern = "2:4"
  c.output_dir = "runs/sparsegpt_2of4"
  return c
