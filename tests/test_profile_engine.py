"""The calibration engine's phase profile (issue 12): exact results, honest phase accounting,
compile seconds, FLOP counts, and experiments/profile_engine.py --tiny rendered."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from jax._src import monitoring

import tiny
from conftest import REPO
from compressjax import calibration, transforms as T
from compressjax.engine_profile import PHASES

sys.path.insert(0, os.path.join(REPO, "experiments"))


def _windows(n=6, t=24, seed=0):
  return np.random.default_rng(seed).integers(0, 300, (n, t)).astype(np.int32)


def _linear_flops_per_token(cfg) -> float:
  """Matmul FLOPs of one Llama block per token: the 7 linears and attention's two products
  (over all ``T`` keys, no causal skipping)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  hd = d // cfg.num_heads
  kv = cfg.num_kv_heads * hd
  return 2.0 * (d * d + 2 * d * kv + d * d + 3 * d * f)


def test_profiled_run_is_identical_and_accounts_for_its_time():
  model = tiny.tiny_model(seed=3)
  w = _windows()
  gptq = T.gptq(bits=4, group_size=32)  # one object: the unprofiled run reuses its solver
  listeners = len(monitoring.get_event_time_span_listeners())
  prof = calibration.EngineProfile()
  got, _ = calibration.run_sequential(model, w, gptq, batch_size=4, progress=False, profile=prof)
  assert len(monitoring.get_event_time_span_listeners()) == listeners  # unregistered
  want, _ = calibration.run_sequential(model, w, gptq, batch_size=4, progress=False)
  fa, ta = jax.tree_util.tree_flatten(got)
  fb, tb = jax.tree_util.tree_flatten(want)
  assert ta == tb
  for x, y in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Every phase that ran took time; the phases are disjoint parts of the call.
  for ph in ("read", "transfer", "embed", "stats", "solver", "forward", "outside"):
    assert prof.seconds[ph] > 0, ph
  for ph in ("finetune", "save", "resume"):
    assert prof.seconds[ph] == 0, ph
  assert set(prof.seconds) == set(PHASES)
  assert sum(prof.seconds.values()) + prof.overhead_s <= prof.wall_s
  # First call: the engine's programs are compiled inside their phases, and counted there.
  assert prof.compile_s["stats"] > 0 and prof.compile_s["forward"] > 0
  assert prof.compile_s["embed"] > 0 and prof.total_compile_s() > 0
  for ph in PHASES:
    assert 0 <= prof.compile_s[ph] <= prof.seconds[ph] + 1e-3, ph
  assert prof.compile_events["/jax/core/compile/backend_compile_duration"] > 0
  # Per block: both blocks, their loop phases add up to the totals, block 1 compiles nothing
  # new in the statistics pass (same shapes) and, being the last, runs no propagation pass.
  assert [b["block"] for b in prof.blocks] == [0, 1]
  for ph in ("stats", "solver", "forward"):  # ("read" and "transfer" also run before the loop)
    assert sum(b["seconds"].get(ph, 0) for b in prof.blocks) == pytest.approx(prof.seconds[ph])
  assert prof.blocks[1]["compile_s"]["stats"] == 0
  assert prof.blocks[0]["seconds"]["forward"] > 0 and "forward" not in prof.blocks[1]["seconds"]
  # Peak memory per phase (Linux: the high-water mark reset before each phase): every phase that
  # ran has one, at most the whole call's peak, which is at least this process's current RSS.
  if sys.platform.startswith("linux"):
    rss = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status")
               if l.startswith("VmRSS:"))
    for ph in ("read", "stats", "solver", "forward", "outside"):
      assert 0 < prof.peak_rss_mb[ph] <= prof.peak_rss_total_mb, ph
      assert prof.blocks[0]["peak_rss_mb"].get(ph, 0) <= prof.peak_rss_mb[ph]
    assert prof.peak_rss_mb["save"] is None  # did not run
    assert prof.peak_rss_total_mb >= 0.5 * rss

  # FLOPs: the solver's analytic count per layer (K, N of each of the 7 linears, 2 blocks) ...
  cfg = model.cfg
  d, f = cfg.hidden_size, cfg.intermediate_size
  kv = cfg.num_kv_heads * (d // cfg.num_heads)
  shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
  want_solver = 2 * sum(calibration.obs_solver_flops(k, n) for k, n in shapes)
  assert prof.flops["solver"] == pytest.approx(want_solver)
  # ... and the propagation pass's (cost analysis x batches): all 8 padded windows' tokens
  # through the block's matmuls, plus attention's products, norms, rope and softmax (< 25%).
  tokens = 8 * 24
  matmuls = tokens * _linear_flops_per_token(cfg) + 8 * 4 * 24 * 24 * d
  per_block = prof.flops["forward"]  # block 0 only: the last block is not propagated
  assert matmuls <= per_block <= 1.25 * matmuls, (per_block, matmuls)
  # The statistics pass adds X^T X of the four distinct linear inputs on top of a forward.
  gram = 2.0 * tokens * (3 * d * d + f * f)
  assert prof.flops["stats"] / 2 > gram
  assert prof.flops["finetune"] is None and prof.flops["read"] is None
  summary = prof.summary(matmul_gflops=10.0)
  s = summary["stats"]
  assert s["gflop_per_s_compute"] == pytest.approx(
      prof.flops["stats"] / (prof.seconds["stats"] - prof.compile_s["stats"]) / 1e9)
  assert s["fraction_of_matmul"] == pytest.approx(s["gflop_per_s_compute"] / 10.0)


class Boom(Exception):
  pass


def test_bad_profile_and_a_crash_leave_no_listener():
  model = tiny.tiny_model(seed=3)
  with pytest.raises(ValueError, match="profile must be"):
    calibration.run_sequential(model, _windows(), T.rtn(bits=4), progress=False, profile={})
  listeners = len(monitoring.get_event_time_span_listeners())

  def update(params, state, stats=None):
    raise Boom("killed")

  inner = T.rtn(bits=4)
  with pytest.raises(Boom):
    calibration.run_sequential(model, _windows(n=2, t=8), T.Transform(inner.init, update),
                               batch_size=2, progress=False,
                               profile=calibration.EngineProfile(solver_flops=None))
  assert len(monitoring.get_event_time_span_listeners()) == listeners


def test_tiny_script_writes_a_record_the_renderer_renders(tmp_path):
  import profile_engine  # pylint: disable=g-import-not-at-top
  import render_results  # pylint: disable=g-import-not-at-top

  results = tmp_path / "profile_engine.jsonl"
  assert profile_engine.main(["--tiny", "--windows", "4", "--seq-len", "16", "--matmul-n", "128",
                              "--results", str(results), "--no-progress"]) == 0
  rec = json.loads(results.read_text().splitlines()[-1])
  assert rec["method"] == "gptq-w4g64" and rec["settings"]["windows"] == 4
  assert rec["ppl_wiki"] is None and rec["ppl_austen"] is None
  assert rec["bits_per_param"] == pytest.approx(4.25)
  assert rec["matmul_gflop_per_s"] > 0 and rec["compile_s"] > 0
  assert 0 < rec["achieved_fraction"] == pytest.approx(
      rec["gflop"] / rec["wall_s"] / rec["matmul_gflop_per_s"])
  assert sum(v["s"] for v in rec["phases"].values()) <= rec["wall_s"]
  assert len(rec["blocks"]) == 2 and rec["peak_rss_mb"] > 0
  text = render_results.render_profile("profile_engine", [rec])
  assert "## profile_engine" in text and "python experiments/profile_engine.py" in text
  for ph in ("| stats |", "| solver |", "| forward |", "| all phases |"):
    assert ph in text, ph
  # The renderer's phase order is the engine's.
  assert render_results.PROFILE_PHASES == PHASES


def test_pass_flops_count_every_micro_step(monkeypatch):
  """The passes run each batch as micro-steps (an inner scan that XLA's cost analysis counts
  once): the profile's FLOPs are the same whether a batch is one micro-step or four."""
  model = tiny.tiny_model(seed=3)
  w = _windows()
  flops = {}
  default = calibration.MICRO_ROWS
  for rows in (default, 24):  # 4 windows of 24 tokens: 1 or 4 micro-steps
    monkeypatch.setattr(calibration, "MICRO_ROWS", rows)
    prof = calibration.EngineProfile()
    calibration.run_sequential(model, w, T.gptq(bits=4, group_size=32), batch_size=4,
                               progress=False, profile=prof)
    flops[rows] = prof.flops
  for ph in ("stats", "forward"):
    # (within 2%: each micro-step also adds into the K x K carry once)
    assert flops[24][ph] == pytest.approx(flops[default][ph], rel=2e-2), ph
