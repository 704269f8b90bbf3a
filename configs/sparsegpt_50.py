"""SparseGPT (OBS mask selection + reconstruction), 50% unstructured; calibration per the
protocol."""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "sparsegpt-50%"
  c.compression.method = "sparsegpt"
  # Fraction of weights pruned (unstructured; per adaptive mask block).
  c.compression.kwargs.sparsity = 0.5
  # None (unstructured) or "n:m" (n kept of every m input rows).
  c.compression.kwargs.pattern = None
  # Rows per adaptive mask block / lazy batch update (the paper's 128).
  c.compression.kwargs.blocksize = 128
  c.output_dir = "runs/sparsegpt_50"
  return c
