"""Wanda, 4:8 semi-structured (4 kept of every 8 input rows)."""

from configs import wanda_50


def get_config():
  c = wanda_50.get_config()
  c.compression.name = "wanda-4:8"
  c.compression.kwargs.pattern = "4:8"
  c.output_dir = "runs/wanda_4of8"
  return c
