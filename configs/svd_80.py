"""Plain truncated SVD of every decoder linear layer, keeping 80% of its parameters in the
factors (rank r with r (K + N) <= 0.8 K N); factors stored in float16."""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "svd-80%"
  c.compression.method = "svd"
  # Fraction of each kernel's parameters the factors may hold (or set `rank` instead).
  c.compression.kwargs.keep_fraction = 0.8
  # Allocate ranks across layers under the same total budget instead of uniformly.
  c.compression.kwargs.allocate = False
  c.compression.kwargs.factor_dtype = "float16"
  c.output_dir = "runs/svd_80"
  return c
