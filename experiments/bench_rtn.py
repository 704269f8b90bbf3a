"""RTN at 8, 4, 3 and 2 bits on the reference model with the standard protocol.

  python experiments/bench_rtn.py                    # all configurations, full protocol
  python experiments/bench_rtn.py --configs rtn_w4g64 --windows 8   # a quick look

Each configuration is one `compressjax compress` job (the uncompressed baseline first); each
appends one JSON record to experiments/results/bench_rtn.jsonl, and a table is printed at the end.
"""

import argparse
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from compressjax import pipeline  # pylint: disable=g-import-not-at-top

CONFIGS = ("default", "rtn_w8", "rtn_w4g64", "rtn_w3g64", "rtn_w2g64", "rtn_w4g32_asym")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", default=",".join(CONFIGS))
  ap.add_argument("--windows", type=int, default=64, help="evaluation windows per corpus")
  ap.add_argument("--results", default=os.path.join(ROOT, "experiments/results/bench_rtn.jsonl"))
  args = ap.parse_args()
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  rows = []
  for name in args.configs.split(","):
    cfg = importlib.import_module(f"configs.{name}").get_config()
    cfg.eval_before = False  # the baseline is its own row (the "default" config)
    cfg.data.num_eval_windows = args.windows
    cfg.results_file = args.results if args.windows == 64 else ""
    cfg.output_dir = os.path.join(ROOT, "runs", name)
    cfg.overwrite = True
    r = pipeline.run_compress(cfg)
    rows.append([r["method"], r["bits_per_param"], r["ppl_wiki"], r["ppl_austen"],
                 r["model_bytes"] / 2**20, r["wall_s"], r["peak_rss_mb"]])
  print()
  print(pipeline.format_table(["method", "bits/param", "ppl wiki", "ppl austen", "model MiB",
                               "compress s", "peak RSS MiB"], rows))


if __name__ == "__main__":
  main()
