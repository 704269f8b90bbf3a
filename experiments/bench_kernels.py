"""Times every registered matmul implementation of packed formats against the dense matmul.

For each format (RTN-style 4-bit g64, 3-bit g64, 2-bit g64 codes, AQLM 2x8, E8P; random weights),
each implementation registered for it (``formats.dispatch.implementations``: ``"xla"`` and any
kernel registered later, e.g. ``"pallas"``), each shape and row count: the median time of a
jitted ``formats.dot`` against the dense ``bfloat16`` and ``float32`` matmul in the same run, the
achieved bytes/s of the weight read (``nbytes / time``) and its fraction of ``--bandwidth``
(default: measured by a large copy-like ``jnp`` op). One JSON line per measurement in
``experiments/results/bench_kernels.jsonl``.

Usage: ``python experiments/bench_kernels.py --shapes 576x1536,1536x576 --rows 1,8``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from compressjax import formats  # pylint: disable=g-import-not-at-top

SHAPES = ("576x576", "576x192", "576x1536", "1536x576", "4096x4096", "4096x11008", "11008x4096",
          "8192x28672")


def _median_time(fn, *args, reps=7):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def measure_bandwidth(nbytes=1 << 28):
  """Bytes/s of ``y = x + 1`` over a ``nbytes`` float32 array (reads and writes ``nbytes``)."""
  x = jnp.zeros((nbytes // 4,), jnp.float32)
  t = _median_time(jax.jit(lambda x: x + 1), x, reps=5)
  return 2 * nbytes / t


def make_leaves(k, n, seed=0):
  rng = np.random.default_rng(seed)
  f16 = lambda *s: jnp.asarray(rng.random(s).astype(np.float16) + 0.5)
  q = lambda bits: formats.QuantizedArray.from_codes(
      jnp.asarray(rng.integers(0, 2**bits, (k, n)).astype(np.uint8)), f16(k // 64, n), None,
      bits=bits, group_size=64, symmetric=True, dtype=jnp.bfloat16)
  out = {"rtn4_g64": q(4), "rtn3_g64": q(3), "rtn2_g64": q(2)}
  if k % 8 == 0:
    out["aqlm_2x8"] = formats.AdditiveCodebookArray.from_codes(
        jnp.asarray(rng.integers(0, 256, (k // 8, n, 2)).astype(np.uint8)),
        jnp.asarray(rng.standard_normal((2, 256, 8)).astype(np.float16)), f16(n), nbits=8,
        dtype=jnp.bfloat16)
    out["e8p"] = formats.E8PArray(
        jnp.asarray(rng.integers(0, 2**16, (k // 8, n)).astype(np.uint16)),
        jnp.asarray(0.5, jnp.float32), dtype=jnp.bfloat16)
  return out


def git_commit():
  try:
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def run(shapes, rows_list, bandwidth, out_path, reps=7):
  device = str(jax.devices()[0].device_kind)
  machine = f"{platform.node()}; {platform.processor() or platform.machine()}; jax {jax.__version__}"
  commit, date = git_commit(), datetime.datetime.now(datetime.timezone.utc).isoformat()
  records = []
  for shape in shapes:
    k, n = (int(d) for d in shape.split("x"))
    rng = np.random.default_rng(1)
    wd = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
    leaves = make_leaves(k, n)
    for rows in rows_list:
      x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32)).astype(jnp.bfloat16)
      mm = jax.jit(jnp.matmul)
      dense_bf16 = _median_time(mm, x, wd.astype(jnp.bfloat16), reps=reps)
      dense_f32 = _median_time(mm, x.astype(jnp.float32), wd, reps=reps)
      for name, w in leaves.items():
        for impl in formats.implementations(type(w)):
          fn = jax.jit(lambda x, w, _n=impl.name: formats.dot(x, w, implementation=_n))
          try:
            t = _median_time(fn, x, w, reps=reps)
          except NotImplementedError as e:
            print(f"skip {name} {impl.name} {shape} rows={rows}: {e}")
            continue
          rec = dict(method=name, settings={"implementation": impl.name, "dtype": "bfloat16",
                                            "weight_nbytes": int(w.nbytes),
                                            "dense_f32_time_s": dense_f32},
                     shape=shape, rows=rows, time_s=t, dense_time_s=dense_bf16,
                     speedup=dense_bf16 / t, bytes_per_s=w.nbytes / t,
                     bw_fraction=w.nbytes / t / bandwidth, device=device, date=date,
                     commit=commit, machine=machine)
          records.append(rec)
          print(f"{name:10s} {impl.name:7s} {shape:>11s} rows={rows:4d} {t * 1e3:8.3f} ms  "
                f"bf16 {dense_bf16 * 1e3:8.3f} ms  f32 {dense_f32 * 1e3:8.3f} ms  "
                f"x{rec['speedup']:.2f}  {rec['bw_fraction']:.1%} of bw", flush=True)
  if out_path:
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  return records


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated KxN list")
  p.add_argument("--rows", default="1,8,32,128")
  p.add_argument("--bandwidth", type=float, default=None,
                 help="device memory bandwidth in bytes/s (default: measured)")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--out", default=os.path.join(ROOT, "experiments/results/bench_kernels.jsonl"),
                 help="JSON-lines file to append to ('' to not write)")
  a = p.parse_args(argv)
  bw = a.bandwidth or measure_bandwidth()
  print(f"bandwidth {bw / 1e9:.1f} GB/s ({'given' if a.bandwidth else 'measured'})")
  run(a.shapes.split(","), [int(r) for r in a.rows.split(",")], bw, a.out, reps=a.reps)


if __name__ == "__main__":
  main()
