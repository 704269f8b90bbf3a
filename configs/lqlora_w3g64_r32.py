"""LQ-LoRA-style decomposition: W ~ RTN-3bit-g64(W - A B) + A B with rank 32 (float16 factors),
alternated 5 times, output-error weighted. Compare with GPTQ/RTN at the same bits per parameter
(3.25 + 16 * 32 * (K + N) / (K N) bits: ~3.83 for the MLP, ~4.8 for q/o)."""

from configs import default


def get_config():
  c = default.get_config()
  c.compression.name = "lqlora-w3g64-r32"
  c.compression.method = "lq_lora"
  c.compression.kwargs.bits = 3
  c.compression.kwargs.group_size = 64
  c.compression.kwargs.rank = 32
  c.compression.kwargs.iters = 5
  c.output_dir = "runs/lqlora_w3g64_r32"
  return c
