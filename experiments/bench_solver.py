"""Per-layer solve time of GPTQ and SparseGPT on the reference model's linear shapes.

  python experiments/bench_solver.py                       # both methods, 5 reps
  python experiments/bench_solver.py --method gptq --reps 9
  python experiments/bench_solver.py --tiny                # seconds, for the test

The reference model (SmolLM2-135M: hidden 576, 3 KV heads of 64, MLP 1536, 30 blocks) has seven
linear kernels per block, ``(K, N) = (in, out)``: q ``576x576``, k/v ``576x192``, o ``576x576``,
gate/up ``576x1536``, down ``1536x576``. For each shape a random weight and a correlated
Hessian ``H = 2 X^T X / n`` (``X`` ``4096 x K`` random tokens mixed by a random matrix, with
per-feature scales so activation order matters) are solved by the jitted solver the transforms
call: GPTQ w4g64 with ``act_order=True, static_groups=True`` (``gptq_quantize``), SparseGPT
50% unstructured (``sparsegpt_prune``), both ``blocksize=128, percdamp=0.01``. The first call
compiles (its time is recorded separately); the median of ``--reps`` calls is the time, with the
min and max as the noise, and the median process CPU seconds (all threads; less sensitive than
wall time to other jobs on a shared machine). ``--fused`` also times the shared-input groups (q/k/v, gate/up) solved
as one call (:func:`compressjax.quantize.gptq_quantize_fused`) where the code has it.

Per block = the sum over the seven layers; model = 30 x that. One JSON line is appended to
``experiments/results/bench_solver.jsonl`` (method, settings, per-shape seconds, totals, commit,
date, machine). ``BENCH_CODE_ROOT=/path`` times another checkout's ``compressjax`` (a before/after
comparison in one session, e.g. ``git archive main compressjax | tar -x -C /tmp/base``).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.environ.get("BENCH_CODE_ROOT", ROOT)
sys.path.insert(0, CODE)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from compressjax.prune import sparsegpt_core  # pylint: disable=g-import-not-at-top
from compressjax.quantize import gptq_core  # pylint: disable=g-import-not-at-top

#: (name, K, N) of one reference-model block, in the engine's order.
SHAPES = (("q", 576, 576), ("k", 576, 192), ("v", 576, 192), ("o", 576, 576),
          ("gate", 576, 1536), ("up", 576, 1536), ("down", 1536, 576))
TINY_SHAPES = (("q", 64, 64), ("k", 64, 32), ("v", 64, 32), ("o", 64, 64), ("gate", 64, 96),
               ("up", 64, 96), ("down", 96, 64))
#: Linears that read the same input (same Hessian).
GROUPS = (("q", "k", "v"), ("gate", "up"))
N_BLOCKS = 30
GPTQ_KW = dict(bits=4, group_size=64, act_order=True, static_groups=True, blocksize=128,
               percdamp=0.01)
SPARSEGPT_KW = dict(sparsity=0.5, blocksize=128, percdamp=0.01)


def problem(k: int, n: int, seed: int, tokens: int):
  """A random ``(K, N)`` weight and a correlated Hessian from ``tokens x K`` random inputs."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((tokens, k)).astype(np.float32)
  mix = np.eye(k, dtype=np.float32) + rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
  x = (z @ mix) * np.exp(rng.standard_normal(k)).astype(np.float32)
  h = 2 * x.T @ x / tokens
  w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
  return jnp.asarray(w), jnp.asarray(h)


def solvers(group_size: int):
  gkw = dict(GPTQ_KW, group_size=group_size)
  gptq = jax.jit(lambda w, h: gptq_core.gptq_quantize(w, h, **gkw)[0].packed)
  # sparsegpt_prune is the (unjitted) wrapper the transform calls; its solver is jitted inside.
  sgpt = lambda w, h: sparsegpt_core.sparsegpt_prune(w, h, **SPARSEGPT_KW)[:2]
  fused = None
  if hasattr(gptq_core, "gptq_quantize_fused"):
    fused = jax.jit(lambda ws, h: [q.packed for q in
                                   gptq_core.gptq_quantize_fused(ws, h, **gkw)[0]])
  return {"gptq": gptq, "sparsegpt": sgpt}, fused


def timed(fn, args, reps):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  ts, cs = [], []
  for _ in range(reps):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
    cs.append(time.process_time() - c0)
  return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
          "cpu_median_s": statistics.median(cs), "first_call_s": first}


def commit_of(path: str) -> str:
  try:
    return subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--method", choices=("gptq", "sparsegpt", "both"), default="both")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--fused", action="store_true", help="also time the fused shared-input solves")
  ap.add_argument("--tiny", action="store_true", help="tiny shapes, 1 rep (for the test)")
  ap.add_argument("--label", default="", help="free text stored with the record (e.g. 'before')")
  ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results",
                                                "bench_solver.jsonl"))
  args = ap.parse_args()
  shapes = TINY_SHAPES if args.tiny else SHAPES
  reps = 1 if args.tiny else args.reps
  tokens = 256 if args.tiny else args.tokens
  group_size = 32 if args.tiny else 64
  fns, fused = solvers(group_size)
  methods = ("gptq", "sparsegpt") if args.method == "both" else (args.method,)
  probs = {name: problem(k, n, seed, tokens) for seed, (name, k, n) in enumerate(shapes)}
  # Linears sharing an input share its Hessian (as in the engine).
  for grp in GROUPS:
    for name in grp[1:]:
      probs[name] = (probs[name][0], probs[grp[0]][1])
  records = []
  for method in methods:
    per_shape = {}
    for name, k, n in shapes:
      r = timed(fns[method], probs[name], reps)
      per_shape[name] = dict(r, K=k, N=n)
      print(f"{method:9s} {name:5s} {k}x{n}: {r['median_s']*1e3:8.1f} ms "
            f"(min {r['min_s']*1e3:.1f}, max {r['max_s']*1e3:.1f}, cpu "
            f"{r['cpu_median_s']*1e3:.1f}; first call "
            f"{r['first_call_s']:.2f} s)", flush=True)
    block = sum(v["median_s"] for v in per_shape.values())
    rec = {"method": method, "settings": GPTQ_KW if method == "gptq" else SPARSEGPT_KW,
           "tokens": tokens, "reps": reps, "tiny": args.tiny, "per_shape": per_shape,
           "block_s": block, "model_s": block * N_BLOCKS,
           "block_min_s": sum(v["min_s"] for v in per_shape.values()),
           "block_max_s": sum(v["max_s"] for v in per_shape.values()),
           "block_cpu_s": sum(v["cpu_median_s"] for v in per_shape.values()),
           "compile_block_s": sum(v["first_call_s"] - v["median_s"] for v in per_shape.values())}
    if method == "gptq":
      rec["settings"] = dict(GPTQ_KW, group_size=group_size)
    if method == "gptq" and args.fused and fused is not None:
      fz, fz_block = {}, 0.0
      solo = {name: v["median_s"] for name, v in per_shape.items()}
      for grp in GROUPS:
        ws = [probs[name][0] for name in grp]
        r = timed(fused, (ws, probs[grp[0]][1]), reps)
        fz["+".join(grp)] = r
        fz_block += r["median_s"]
        print(f"{method:9s} fused {'+'.join(grp)}: {r['median_s']*1e3:8.1f} ms (min "
              f"{r['min_s']*1e3:.1f}, max {r['max_s']*1e3:.1f}; per-layer sum "
              f"{sum(solo[x] for x in grp)*1e3:.1f} ms)", flush=True)
      fz_block += sum(s for name, s in solo.items() if not any(name in g for g in GROUPS))
      rec["fused"] = fz
      rec["fused_block_s"] = fz_block
      rec["fused_model_s"] = fz_block * N_BLOCKS
    rec.update(label=args.label, commit=commit_of(CODE), code_root=CODE,
               date=datetime.datetime.now().isoformat(timespec="seconds"),
               machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
               backend=jax.default_backend(), jax=jax.__version__)
    print(f"{method}: block {block:.3f} s (min-sum {rec['block_min_s']:.3f}, max-sum "
          f"{rec['block_max_s']:.3f}, cpu {rec['block_cpu_s']:.3f}), model x{N_BLOCKS} {rec['model_s']:.1f} s"
          + (f"; fused block {rec['fused_block_s']:.3f} s" if "fused_block_s" in rec else ""),
          flush=True)
    records.append(rec)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "a", encoding="utf-8") as f:
    for rec in records:
      f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
  main()
