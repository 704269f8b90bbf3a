"""GPTQ 3-bit g64, then EoRA rank 64 with its factors stored as 4-bit RTN codes (groups of 64):
~4.03 bits per parameter on this model, i.e. no more than plain 4-bit g64 quantization (4.25)."""

from configs import gptq_w3g64


def get_config():
  c = gptq_w3g64.get_config()
  c.compression.name = "gptq-w3g64+eora64-f4"
  c.compression.steps = (
      {"method": "gptq", "bits": 3, "group_size": 64, "symmetric": True,
       "act_order": True, "static_groups": True},
      {"method": "eora", "rank": 64, "factor_bits": 4, "factor_group_size": 64},
  )
  c.output_dir = "runs/gptq_w3g64_eora64_f4"
  return c
