"""SpQR near 3 bits per parameter: 2-bit weights in groups of 16 with 3-bit statistics and
outliers. Compare with GPTQ at 3 bits, group 64 (3.25 bits per parameter)."""

from configs import spqr_w3g16


def get_config():
  c = spqr_w3g16.get_config()
  c.compression.name = "spqr-w2g16"
  c.compression.kwargs.bits = 2
  c.output_dir = "runs/spqr_w2g16"
  return c
