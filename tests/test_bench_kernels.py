"""Smoke test of experiments/bench_kernels.py on a tiny shape (a few seconds)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def test_bench_kernels_records_every_implementation(tmp_path):
  import bench_kernels  # pylint: disable=g-import-not-at-top
  import render_results  # pylint: disable=g-import-not-at-top
  from compressjax import formats  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "k.jsonl")
  recs = bench_kernels.run(["64x32"], [1, 3], 1e10, out, reps=1)
  names = {(r["method"], r["settings"]["implementation"]) for r in recs}
  for method, w in bench_kernels.make_leaves(64, 32).items():
    for impl in formats.implementations(type(w)):
      assert (method, impl.name) in names
  fields = {"method", "settings", "shape", "rows", "time_s", "dense_time_s", "speedup",
            "bytes_per_s", "bw_fraction", "device", "date", "commit", "machine"}
  assert all(fields <= set(r) for r in recs)
  assert len(open(out).read().splitlines()) == len(recs)
  assert "## kernels" in render_results.render_kernels("bench_kernels", recs)
