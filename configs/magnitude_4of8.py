"""Magnitude pruning, 4:8 semi-structured (4 kept of every 8 input rows)."""

from configs import magnitude_50


def get_config():
  c = magnitude_50.get_config()
  c.compression.name = "magnitude-4:8"
  c.compression.kwargs.pattern = "4:8"
  c.output_dir = "runs/magnitude_4of8"
  return c
