"""Magnitude pruning, 50% unstructured per layer, of every decoder linear layer (data-free).

Kept values are stored as float16 with a 1-bit mask (9 bits per parameter at 50%).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "magnitude-50%"
  c.compression.method = "magnitude"
  # Fraction of weights pruned in each layer.
  c.compression.kwargs.sparsity = 0.5
  # None (unstructured) or "n:m" (n kept of every m input rows).
  c.compression.kwargs.pattern = None
  # "layer" (every kernel at `sparsity`) or "global" (one threshold across kernels).
  c.compression.kwargs.scope = "layer"
  c.output_dir = "runs/magnitude_50"
  return c
