"""Structured pruning, ~30% of every block's linear parameters removed as MLP channels (see
structured_20; the kept width is rounded to a multiple of 32)."""

from configs import structured_20


def get_config():
  c = structured_20.get_config()
  c.compression.name = "structured-30%"
  c.compression.kwargs.fraction = 0.3
  c.output_dir = "runs/structured_30"
  return c
