"""Quality benchmarks on the reference model with the standard protocol.

  python experiments/bench_quality.py --bench bench_rtn     # RTN 8/4/3/2 bits + the baseline
  python experiments/bench_quality.py --bench bench_gptq    # GPTQ 4/3/2 bits
  python experiments/bench_quality.py --bench bench_awq     # AWQ (+RTN) 4/3/2 bits
  python experiments/bench_quality.py --bench bench_spqr    # SpQR near 4 and 3 bits, OWQ 3 bits
  python experiments/bench_quality.py --bench bench_prune   # magnitude/Wanda/SparseGPT 50%, 2:4, 4:8
  python experiments/bench_quality.py --bench bench_structured  # MLP channels removed: 10/20/30%
  python experiments/bench_quality.py --bench bench_lowrank  # SVD/ASVD, EoRA ranks, LQ-LoRA
  python experiments/bench_quality.py --bench bench_extreme  # ~2/3 bits: incoherence, E8P, VQ, AQLM
  python experiments/bench_quality.py --bench bench_rtn --configs rtn_w4g64 --windows 8  # a quick look
  python experiments/bench_quality.py --bench bench_gptq --configs gptq_w4g64 --cal-source wiki

Each configuration is one `compressjax compress` job; with the full protocol (64 windows) each
appends one JSON record to experiments/results/<bench>.jsonl, and a table is printed at the end.
"""

import argparse
import importlib
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see compressjax/cli.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from compressjax import pipeline  # pylint: disable=g-import-not-at-top

BENCHES = {
    "bench_rtn": ("default", "rtn_w8", "rtn_w4g64", "rtn_w3g64", "rtn_w2g64", "rtn_w4g32_asym",
                  "rtn_w4g64_qhead4"),
    "bench_gptq": ("gptq_w3g64", "gptq_w4g64", "gptq_w2g64"),
    "bench_awq": ("awq_w3g64", "awq_w4g64", "awq_w2g64"),
    "bench_spqr": ("spqr_w3g16", "spqr_w2g16", "owq_w3"),
    "bench_prune": ("magnitude_50", "wanda_50", "sparsegpt_50", "sparsegpt_50_w4g64",
                    "magnitude_2of4", "wanda_2of4", "sparsegpt_2of4", "magnitude_4of8",
                    "wanda_4of8", "sparsegpt_4of8", "magnitude_50_lamp"),
    "bench_structured": ("structured_10", "structured_20", "structured_30"),
    "bench_lowrank": ("svd_80", "asvd_80", "svd_60", "asvd_60", "gptq_w3g64_eora16",
                      "gptq_w3g64_eora32", "gptq_w3g64_eora64", "sparsegpt_2of4_eora16",
                      "sparsegpt_2of4_eora32", "sparsegpt_2of4_eora64", "lqlora_w3g64_r16",
                      "lqlora_w3g64_r21", "lqlora_w2g64_r21", "lqlora_w3g64_r32",
                      "gptq_w3g64_eora64_f4"),
    "bench_extreme": ("gptq_w2g64_incoherent", "quip_e8p", "gptvq_d2_w2", "gptvq_d4_w2",
                      "gptvq_d8_w2", "aqlm_2x8_g8", "gptq_w3g64_incoherent", "gptvq_d2_w3",
                      "quip_e8p_3bit", "quip_e8p_4bit", "aqlm_3x8_g8", "aqlm_2x8_g8_incoherent",
                      "aqlm_2x8_g8_ft"),
}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--bench", default="bench_rtn", choices=sorted(BENCHES))
  ap.add_argument("--configs", default=None, help="comma-separated subset of the bench's configs")
  ap.add_argument("--windows", type=int, default=64, help="evaluation windows per corpus")
  ap.add_argument("--cal-source", default=None,
                  help="calibration source other than the config's (wiki, austen, mixed, a path); "
                       "the method name gets a '-cal-<source>' suffix")
  args = ap.parse_args()
  results = os.path.join(ROOT, "experiments", "results", f"{args.bench}.jsonl")
  configs = args.configs.split(",") if args.configs else BENCHES[args.bench]
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  rows = []
  for name in configs:
    cfg = importlib.import_module(f"configs.{name}").get_config()
    if args.cal_source:
      cfg.calibration.source = args.cal_source
      cfg.compression.name += f"-cal-{os.path.basename(args.cal_source.rstrip('/'))}"
    cfg.eval_before = False  # the baseline is its own row (the "default" config)
    cfg.data.num_eval_windows = args.windows
    cfg.results_file = results if args.windows == 64 else ""
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
