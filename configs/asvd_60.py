"""ASVD with 60% of the linear parameters kept (see asvd_80)."""

from configs import asvd_80


def get_config():
  c = asvd_80.get_config()
  c.compression.name = "asvd-60%"
  c.compression.kwargs.keep_fraction = 0.6
  c.output_dir = "runs/asvd_60"
  return c
