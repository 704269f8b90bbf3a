"""Activation-aware SVD (whitened by the calibration inputs' X^T X), 80% of the parameters kept,
ranks allocated within each block under the same budget."""

from configs import svd_80


def get_config():
  c = svd_80.get_config()
  c.compression.name = "asvd-80%"
  c.compression.method = "asvd"
  c.compression.kwargs.allocate = True
  c.output_dir = "runs/asvd_80"
  return c
