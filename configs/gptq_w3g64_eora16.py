"""GPTQ 3-bit g64, then EoRA: a rank-16 float16 correction of each layer's quantization error
in the eigenspace of its calibration inputs (SumArray of the codes and the factors)."""

from configs import gptq_w3g64


def get_config():
  c = gptq_w3g64.get_config()
  c.compression.name = "gptq-w3g64+eora16"
  c.compression.steps = (
      {"method": "gptq", "bits": 3, "group_size": 64, "symmetric": True,
       "act_order": True, "static_groups": True},
      {"method": "eora", "rank": 16},
  )
  c.output_dir = "runs/gptq_w3g64_eora16"
  return c
