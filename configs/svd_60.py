"""SVD with 60% of the linear parameters kept (see svd_80)."""

from configs import svd_80


def get_config():
  c = svd_80.get_config()
  c.compression.name = "svd-60%"
  c.compression.kwargs.keep_fraction = 0.6
  c.output_dir = "runs/svd_60"
  return c
