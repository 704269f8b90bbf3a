"""Wanda (|W| * ||X||, compared per output), 50% unstructured; calibration per the protocol."""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "wanda-50%"
  c.compression.method = "wanda"
  # Fraction of weights pruned in each output.
  c.compression.kwargs.sparsity = 0.5
  # None (unstructured) or "n:m" (n kept of every m input rows).
  c.compression.kwargs.pattern = None
  c.output_dir = "runs/wanda_50"
  return c
