"""Entry point: fine-tune a compressed checkpoint by distillation (same as `compressjax finetune`).

  python experiments/finetune.py --config configs/finetune_kd.py --config.checkpoint=runs/gptq_w2g64
"""

import sys

from compressjax import cli

if __name__ == "__main__":
  sys.exit(cli.finetune_main(sys.argv))
