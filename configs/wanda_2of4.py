"""Wanda, 2:4 semi-structured (2 kept of every 4 input rows)."""

from configs import wanda_50


def get_config():
  c = wanda_50.get_config()
  c.compression.name = "wanda-2:4"
  c.compression.kwargs.pattern = "2:4"
  c.output_dir = "runs/wanda_2of4"
  return c
