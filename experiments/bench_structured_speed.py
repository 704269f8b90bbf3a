"""Forward speed of structured-pruned models (smaller matrices, no special kernel) vs the dense one.

  python experiments/bench_structured_speed.py        # runs/structured_{10,20,30} vs dense
  python experiments/bench_structured_speed.py --checkpoints runs/structured_20 --batch 4

The checkpoints are the ones `python experiments/bench_quality.py --bench bench_structured`
saves. Each (model, batch) is timed in a fresh subprocess (jitted float32 forward of the full
logits on random tokens, ``--warmup`` untimed calls, median of ``--reps``), like
``bench_throughput.py``; one record per measurement goes to
``experiments/results/bench_structured_speed.jsonl``.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from bench_throughput import _peak_rss_mb, _time_calls  # pylint: disable=g-import-not-at-top,wrong-import-position


def worker(args):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from compressjax import accounting, checkpoint  # pylint: disable=g-import-not-at-top
  from compressjax.io import build_model, load_model, model_params  # pylint: disable=g-import-not-at-top
  from compressjax.model import LlamaConfig  # pylint: disable=g-import-not-at-top

  if args.worker == "dense":
    model, _ = load_model("smollm2-135m-instruct")
  else:
    params, meta = checkpoint.restore(args.worker)
    model = build_model(LlamaConfig(**meta["model_config"]), params)
  size = accounting.size_report(model_params(model))
  tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (args.batch, args.seq_len))
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  x = jax.numpy.asarray(tokens, jax.numpy.int32)
  warmup_s, times = _time_calls(lambda: fwd(state, x).block_until_ready(), args.warmup, args.reps)
  med = statistics.median(times)
  print(json.dumps({"times_s": times, "median_s": med, "warmup_s": warmup_s,
                    "tokens_per_s": tokens.size / med, "peak_rss_mb": _peak_rss_mb(),
                    "linear_params": size["linear_params"], "total_params": size["total_params"]}))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoints", nargs="+",
                  default=[os.path.join(ROOT, "runs", f"structured_{f}") for f in (10, 20, 30)])
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  ap.add_argument("--seq-len", type=int, default=512)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--results", default=os.path.join(ROOT, "experiments/results/"
                                                    "bench_structured_speed.jsonl"))
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    args.batch = args.batch[0]
    worker(args)
    return
  from compressjax import pipeline  # pylint: disable=g-import-not-at-top

  machine, commit = pipeline.machine_info(), pipeline.git_commit()
  rows, dense = [], {}
  for batch in args.batch:
    for model in ["dense"] + [os.path.abspath(c) for c in args.checkpoints]:
      if model != "dense" and not os.path.isdir(model):
        print(f"skipping {model}: no checkpoint (run bench_quality.py --bench bench_structured)")
        continue
      cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, "--batch", str(batch),
             "--seq-len", str(args.seq_len), "--reps", str(args.reps), "--warmup", str(args.warmup)]
      load_before = os.getloadavg()[0]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"{model} batch={batch} failed")
      res = json.loads(proc.stdout.strip().splitlines()[-1])
      name = "dense" if model == "dense" else os.path.basename(model)
      if model == "dense":
        dense[batch] = res
      base = dense.get(batch)
      removed = 1 - res["linear_params"] / base["linear_params"] if base else None
      speedup = base["median_s"] / res["median_s"] if base else None
      record = {
          "benchmark": "bench_structured_speed", "method": name,
          "settings": {"batch": batch, "seq_len": args.seq_len, "dtype": "float32",
                       "checkpoint": None if model == "dense" else model},
          "bits_per_param": 32, "ppl_wiki": None, "ppl_austen": None,
          "linear_params": res["linear_params"], "linear_params_removed": removed,
          "tokens_per_s": res["tokens_per_s"], "speedup_vs_dense": speedup,
          "wall_s": res["median_s"], "times_s": res["times_s"], "warmup_s": res["warmup_s"],
          "load_avg_1m": [load_before, os.getloadavg()[0]], "peak_rss_mb": res["peak_rss_mb"],
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "commit": commit, "machine": machine,
      }
      if args.results:
        pipeline.append_record(args.results, record)
      rows.append([name, batch, res["linear_params"], removed, res["tokens_per_s"], speedup])
      print(f"{name:16s} batch={batch}: {res['tokens_per_s']:.0f} tokens/s", flush=True)
  print()
  print(pipeline.format_table(["model", "batch", "linear params", "removed", "tokens/s",
                               "speedup"], rows))


if __name__ == "__main__":
  main()
