"""OWQ: 3-bit per-channel GPTQ with the 1% most sensitive input features kept in float16."""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "owq-w3"
  c.compression.method = "owq"
  c.compression.kwargs.bits = 3
  # Per-channel grid (the paper's setting); groups need static grids with OWQ.
  c.compression.kwargs.group_size = None
  # Fraction of input features (rows of our (in, out) kernels) kept in float16.
  c.compression.kwargs.keep_fraction = 0.01
  c.output_dir = "runs/owq_w3"
  return c
