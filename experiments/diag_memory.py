"""Where a calibrated run's peak memory goes: peak RSS after compression, then after evaluation.

  python experiments/diag_memory.py --method sparsegpt --model runs/bench_peer/model \
      --windows runs/bench_peer/cal_gptq.npy --num-windows 16

(the model directory and windows are the ones ``experiments/bench_peer.py`` prepares). Prints
the process's peak resident memory after the lazy open, after ``run_sequential`` and after one
evaluation batch of the compressed model; run one method per process.
"""

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compressjax import calibration, evaluate, transforms as T  # pylint: disable=g-import-not-at-top
from compressjax.blocks import LlamaBlocks
from compressjax.io import build_model
from compressjax.io.loading import open_model

RECIPES = {"gptq": lambda: T.gptq(bits=4, group_size=64, act_order=True, static_groups=True),
           "sparsegpt": lambda: T.sparsegpt(0.5)}


def peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--method", choices=sorted(RECIPES), required=True)
  ap.add_argument("--model", required=True, help="reference name, .gguf or HF directory")
  ap.add_argument("--windows", required=True, help=".npy of int calibration windows (n, T)")
  ap.add_argument("--num-windows", type=int, default=16)
  args = ap.parse_args()
  cfg, params, _ = open_model(args.model)
  w = np.load(args.windows, allow_pickle=False)[: args.num_windows]
  print(f"{args.method}: peak {peak_mib():.0f} MiB after the lazy open", flush=True)
  t0 = time.perf_counter()
  q, _ = calibration.run_sequential(LlamaBlocks(cfg, params), w, RECIPES[args.method](),
                                    batch_size=8, progress=False)
  print(f"{args.method}: peak {peak_mib():.0f} MiB after compression "
        f"({time.perf_counter() - t0:.0f} s)", flush=True)
  evaluate.perplexity(build_model(cfg, q), w[:8], batch_size=8, progress=False)
  print(f"{args.method}: peak {peak_mib():.0f} MiB after one evaluation batch", flush=True)


if __name__ == "__main__":
  main()
