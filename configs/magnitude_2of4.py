"""Magnitude pruning, 2:4 semi-structured (2 kept of every 4 input rows)."""

from configs import magnitude_50


def get_config():
  c = magnitude_50.get_config()
  c.compression.name = "magnitude-2:4"
  c.compression.kwargs.pattern = "2:4"
  c.output_dir = "runs/magnitude_2of4"
  return c
