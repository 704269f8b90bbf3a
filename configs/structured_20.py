"""Structured pruning that shrinks the matrices: ~20% of every block's linear parameters removed
as whole MLP channels, chosen by calibrated output energy, with a least-squares refit of
down_proj.

SmolLM2-135M blocks: attention 0.88M + MLP 2.65M linear parameters; 20% is ~410 of the 1536 MLP
channels, rounded to a multiple of 32 (416 removed: 20.3% of the linear parameters).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "structured-20%"
  c.compression.method = "structured"
  # Fraction of each block's linear parameters to remove.
  c.compression.kwargs.fraction = 0.2
  # Also remove one query head per KV group (its share is taken first).
  c.compression.kwargs.prune_heads = False
  # Refit the kept rows of down_proj / o_proj by least squares on the calibration inputs.
  c.compression.kwargs.compensate = True
  # Kept MLP width is a multiple of this.
  c.compression.kwargs.multiple_of = 32
  c.output_dir = "runs/structured_20"
  return c
