"""How GPTQ's time grows with layer width, on this CPU (one layer, random weights and Hessian).

  python experiments/bench_gptq_speed.py                 # K in 256..3072, N = 576, 4-bit g64
  python experiments/bench_gptq_speed.py --n 1536 --reps 3

For each input width K, a ``(K, N)`` weight and a Hessian ``2 X^T X / n`` from ``n = 2K`` random
inputs are quantized with the jitted :func:`compressjax.quantize.gptq_quantize` (4-bit, group 64,
blocksize 128). The first call compiles; the median of ``--reps`` timed calls is reported next to
an RTN call on the same weight. GPTQ's work is O(K^3) for the Cholesky factorization plus
O(K^2 N) for the updates, so time should grow between quadratically and cubically in K. One JSON
record per width is appended to ``experiments/results/bench_gptq_speed.jsonl``.

The whole-model GPTQ time (calibration forward passes included) is the ``wall_s`` of the
``bench_gptq`` records.
"""

import argparse
import datetime
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from compressjax import pipeline  # pylint: disable=g-import-not-at-top
from compressjax.quantize import gptq_quantize, quantize_rtn  # pylint: disable=g-import-not-at-top


def timed(fn, reps):
  jax.block_until_ready(fn())  # compile
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--widths", default="256,576,1152,1536,2304,3072")
  ap.add_argument("--n", type=int, default=576)
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  out = os.path.join(ROOT, "experiments", "results", "bench_gptq_speed.jsonl")
  rows = []
  for k in (int(v) for v in args.widths.split(",")):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2 * k, k)).astype(np.float32)
    h = jnp.asarray(2 * x.T @ x / len(x))
    w = jnp.asarray(rng.standard_normal((k, args.n)).astype(np.float32))
    g = jax.jit(lambda w, h: gptq_quantize(w, h, bits=4, group_size=64)[0].packed)
    r = jax.jit(lambda w: quantize_rtn(w, bits=4, group_size=64).packed)
    tg = timed(lambda: g(w, h), args.reps)
    tr = timed(lambda: r(w), args.reps)
    rows.append([k, args.n, tg, tr, tg / tr])
    pipeline.append_record(out, {
        "method": "gptq-layer-time", "settings": {"K": k, "N": args.n, "bits": 4,
                                                  "group_size": 64, "blocksize": 128},
        "bits_per_param": 4.25, "ppl_wiki": None, "ppl_austen": None, "wall_s": tg,
        "rtn_wall_s": tr, "peak_rss_mb": pipeline.peak_rss_mb(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": pipeline.git_commit(), "machine": pipeline.machine_info(),
        "load_avg_1m": os.getloadavg()[0]})
    print(f"K={k} N={args.n}: gptq {tg:.3f} s, rtn {tr:.4f} s", flush=True)
  print()
  print(pipeline.format_table(["K", "N", "gptq s", "rtn s", "gptq/rtn"], rows))
  ks = np.log([r[0] for r in rows])
  ts = np.log([r[2] for r in rows])
  print(f"fitted growth: time ~ K^{np.polyfit(ks, ts, 1)[0]:.2f}")


if __name__ == "__main__":
  main()
