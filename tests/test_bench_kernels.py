"""Smoke test of experiments/bench_kernels.py on a tiny shape (a few seconds)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def test_bench_kernels_records_every_implementation(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import bench_kernels  # pylint: disable=g-import-not-at-top
  import render_results  # pylint: disable=g-import-not-at-top
  from compressjax import formats  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "k.jsonl")
  recs = bench_kernels.run(["64x32"], [1, 3], 1e10, out, reps=1, with_interpret=True)
  names = {(r["method"], r["settings"]["implementation"]) for r in recs}
  for method, w in bench_kernels.make_leaves(64, 32).items():
    for impl in formats.implementations(type(w)):
      if impl.name == "pallas" and jax.default_backend() == "cpu":
        continue  # compiled Pallas kernels need a GPU/TPU; the interpreter ran instead
      if impl.name == "pallas_mgpu" and jax.default_backend() != "gpu":
        continue  # Mosaic GPU (Hopper) only; its can_use refuses elsewhere (printed as a skip)
      if impl.name.startswith("pallas") and getattr(w, "bits", None) == 3:
        continue  # no kernel for the 3-bit per-word layout yet (pallas_kernels/NOTE_3bit_layout.md)
      assert (method, impl.name) in names
  fields = {"method", "settings", "shape", "rows", "time_s", "dense_time_s", "speedup",
            "bytes_per_s", "bw_fraction", "device", "date", "commit", "machine"}
  assert all(fields <= set(r) for r in recs)
  assert len(open(out).read().splitlines()) == len(recs)
  assert "## kernels" in render_results.render_kernels("bench_kernels", recs)


@pytest.mark.slow  # ~27 s; decode itself: test_decode_loop, test_qhead
def test_bench_kernels_decode_on_a_tiny_model(tmp_path):
  import bench_kernels  # pylint: disable=g-import-not-at-top
  import tiny  # pylint: disable=g-import-not-at-top
  from compressjax.io import model_params  # pylint: disable=g-import-not-at-top
  cfg = tiny.tiny_config(hidden_size=64, intermediate_size=128)
  params = model_params(tiny.tiny_model(seed=0))
  out = str(tmp_path / "d.jsonl")
  recs = bench_kernels.run_decode(cfg, params, new_tokens=4, prompt_len=3, reps=1, out_path=out,
                                  model_name="tiny")
  assert [r["method"] for r in recs] == [f"decode_{m}" for m in bench_kernels.DECODE_METHODS]
  assert all(r["tokens_per_s"] > 0 and r["rows"] == 1 for r in recs)
  nbytes = {r["method"]: r["settings"]["params_nbytes"] for r in recs}
  assert nbytes["decode_rtn2_g64"] < nbytes["decode_rtn4_g64"] < nbytes["decode_dense_f32"]
  assert recs[0]["speedup"] == 1.0
  assert len(open(out).read().splitlines()) == len(bench_kernels.DECODE_METHODS)
  impl = {r["method"]: r["settings"]["matmul_implementation"] for r in recs}
  assert impl["decode_rtn4_g64"] == "xla" and impl["decode_rtn4_g64_cpukernel"] == "cpu"
  import render_results  # pylint: disable=g-import-not-at-top
  assert "decode_rtn4_g64" in render_results.render_kernels("bench_kernels", recs)
