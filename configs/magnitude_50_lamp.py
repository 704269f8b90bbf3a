"""Magnitude pruning at 50% overall with layer-adaptive (LAMP) budgets: one global threshold on
LAMP scores, so layers get different sparsities."""

from configs import magnitude_50


def get_config():
  c = magnitude_50.get_config()
  c.compression.name = "magnitude-50%-lamp"
  c.compression.kwargs.scope = "global"
  c.compression.kwargs.budget = "lamp"
  c.output_dir = "runs/magnitude_50_lamp"
  return c
