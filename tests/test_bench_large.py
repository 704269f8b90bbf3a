"""experiments/bench_large.py end to end on a tiny random Llama: written shard by shard, a GPTQ
compression SIGKILLed after half the blocks and resumed, equal to an uninterrupted run."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO, require_reference_model

sys.path.insert(0, os.path.join(REPO, "experiments"))


@pytest.mark.slow  # a killed and resumed bench_large run (~30 s); resume: test_calibration, test_stream_output
def test_tiny_random_llama_killed_and_resumed_is_identical(tmp_path, tiny_data):
  require_reference_model()  # its tokenizer tokenizes the windows
  import bench_large  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from compressjax.blocks import to_abstract_tree  # pylint: disable=g-import-not-at-top
  from compressjax.io import load_hf  # pylint: disable=g-import-not-at-top

  results = tmp_path / "bench_large.jsonl"
  rc = bench_large.main(["--tiny", "--work", str(tmp_path / "work"), "--data-dir", tiny_data,
                         "--results", str(results), "--shard-mb", "4"])
  assert rc == 0
  rec = json.loads(results.read_text().splitlines()[-1])
  assert rec["identical"] is True
  n = rec["settings"]["shape"]["layers"]
  assert n == 6 and rec["settings"]["kill_after_blocks"] == 3
  # Killed exactly at the kill point (the job stops itself there), resumed where it said.
  assert rec["killed_with_blocks_finished"] == 3
  assert rec["resumed_from_block"] == rec["killed_with_blocks_finished"]
  for key in ("block_seconds", "killed_block_seconds"):  # two blocks may finish in one poll: 0 s
    assert len(rec[key]) == n and all(v is not None and v >= 0 for v in rec[key]), (key, rec[key])
  for key in ("block_rss_end_mb", "block_rss_peak_mb"):
    assert len(rec[key]) == n and all(v is not None and v > 0 for v in rec[key]), (key, rec[key])
  assert rec["peak_rss_killed_attempt_mb"] > 0 and rec["peak_rss_resumed_attempt_mb"] > 0
  assert rec["bits_per_param"] == 4.25 and np.isfinite(rec["ppl_wiki"])
  # Streamed output (the default): the checkpoints hold one part per block, hard-linked from
  # the resume directory; the record says whether the end-of-block RSS grows with depth.
  assert rec["settings"]["stream_output"] is True
  assert isinstance(rec["rss_grows_with_depth"], bool)
  assert isinstance(rec["rss_end_trend_mb_per_block"], float)
  for name in ("killed", "reference"):
    parts = tmp_path / "work" / name / "blocks"
    assert sorted(os.listdir(parts)) == [f"{i:05d}" for i in range(n)]
    link = next(p for p in (parts / "00000").rglob("*") if p.is_file())
    assert link.stat().st_nlink >= 2  # the resume directory's file, written once
  assert not [e for e in os.listdir(tmp_path / "work") if ".tmp-" in e]  # none left behind

  # The model on disk: sharded safetensors (4 MiB shards), the generated values.
  model_dir = tmp_path / "work" / "model"
  assert (model_dir / "model.safetensors.index.json").is_file()
  shards = [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
  assert len(shards) > 2
  assert rec["model_file_bytes"] == sum(os.path.getsize(model_dir / f) for f in shards)
  cfg, params, _ = load_hf(str(model_dir), lazy=True)
  want = bench_large.random_params(cfg, seed=0)
  abstract = jax.tree.leaves(to_abstract_tree(params))
  assert rec["model_params"] == sum(int(np.prod(a.shape)) for a in abstract)
  for path in (("layers", 5, "mlp", "down_proj", "kernel"), ("lm_head", "kernel")):
    got, exp = params, want
    for k in path:
      got, exp = got[k], exp[k]
    np.testing.assert_array_equal(got.load(), exp.load())
    assert abs(float(np.std(exp.load())) - 0.02) < 0.002

  import render_results  # pylint: disable=g-import-not-at-top
  text = render_results.render_large("bench_large", [rec])
  assert "## bench_large" in text and "| yes |" in text
