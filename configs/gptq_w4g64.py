"""GPTQ, 4-bit symmetric, groups of 64 along the input, on every decoder linear layer.

Calibration follows the standard protocol (``calibration`` block of ``configs/default.py``).
Rows are processed in activation order with static groups (the reference's ``--act-order
--static-groups``, and what llm-compressor's GPTQ runs by default): without it this model's
4-bit g64 GPTQ is worse than RTN.
"""

from configs import rtn_w4g64


def get_config():
  c = rtn_w4g64.get_config()
  c.compression.name = "gptq-w4g64"
  c.compression.method = "gptq"
  c.compression.kwargs.act_order = True
  c.compression.kwargs.static_groups = True
  c.output_dir = "runs/gptq_w4g64"
  return c
