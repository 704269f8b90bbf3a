"""The faster OBS solver pieces give the same results as the ones they replace (issue 12, item 2)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.prune import masks, sparsegpt_core
from compressjax.quantize import gptq_core, obs_core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _old_hinv(H):
  """The references' factor: Cholesky, inverse (cho_solve), upper Cholesky of the inverse."""
  K = H.shape[0]
  L = jnp.linalg.cholesky(H)
  Hi = jax.scipy.linalg.cho_solve((L, True), jnp.eye(K, dtype=H.dtype))
  return jnp.triu(jnp.linalg.cholesky(Hi, upper=True))


def _hessian(k, seed, n=None):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n or 4 * k, k)).astype(np.float32)
  x = (x @ (np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k))).astype(np.float32)
  x *= np.exp(rng.standard_normal(k)).astype(np.float32)
  h = 2 * x.T @ x / len(x)
  return h + 0.01 * np.mean(np.diag(h)) * np.eye(k, dtype=np.float32)


@pytest.mark.parametrize("k", [40, 128, 200, 384, 577])
def test_hinv_factor_matches_reference_and_float64(k):
  h = _hessian(k, k)
  u = np.asarray(jax.jit(obs_core.hinv_factor)(jnp.asarray(h)))
  u64 = np.linalg.cholesky(np.linalg.inv(h.astype(np.float64))).T
  old = np.asarray(jax.jit(_old_hinv)(jnp.asarray(h)))
  scale = np.max(np.abs(u64))
  assert np.all(np.tril(u, -1) == 0)
  assert np.all(np.diag(u) > 0)
  # float32 rounding only, and no further from float64 than the old three-step factor (+ slack).
  err_new = np.max(np.abs(u - u64)) / scale
  err_old = np.max(np.abs(old - u64)) / scale
  assert err_new < 2e-6, err_new
  assert err_new <= 1.5 * err_old + 1e-7, (err_new, err_old)


def test_hinv_cholesky_still_retries_and_falls_back():
  k = 64
  h = jnp.asarray(_hessian(k, 0))
  bad = h.at[3, 3].set(-1e3)  # indefinite: the first dampings fail
  hinv, rel, _, ok = jax.jit(lambda a: obs_core.hinv_cholesky(a, 0.01))(bad)
  assert bool(ok) and float(rel) > 0.01
  hinv, _, _, ok = jax.jit(lambda a: obs_core.hinv_cholesky(a, 0.01))(h.at[0, 1].set(jnp.nan))
  assert not bool(ok)
  np.testing.assert_array_equal(np.asarray(hinv), np.eye(k))


def _score_cases():
  rng = np.random.default_rng(0)
  a = (rng.standard_normal((32, 48)) ** 2).astype(np.float32)
  a[20:] = np.inf  # SparseGPT's padding rows
  b = np.round(rng.standard_normal((16, 24)) * 2).astype(np.float32)  # many ties, -0.0
  c = rng.standard_normal((8, 8)).astype(np.float32)
  c[1, 1], c[2, 2] = -np.inf, np.inf
  return [a, b, c]


@pytest.mark.parametrize("case", range(3))
def test_smallest_equals_stable_ranks(case):
  s = jnp.asarray(_score_cases()[case])
  f = jax.jit(masks.smallest)  # n traced
  r = np.asarray(masks.ranks(s))
  for n in sorted({0, 1, 2, 7, s.size // 3, s.size // 2, s.size - 1, s.size}):
    np.testing.assert_array_equal(np.asarray(f(s, n)), r < n, err_msg=f"n={n}")


def test_sparsegpt_mask_unchanged_by_smallest():
  """SparseGPT with the block mask from ``smallest`` equals the mask from sorting (ranks)."""
  k, n = 96, 40
  h = jnp.asarray(_hessian(k, 3))
  w = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)).astype(np.float32))
  wp, keep, _ = sparsegpt_core.sparsegpt_prune(w, h, sparsity=0.5, blocksize=32)
  ref_w, ref_keep = sparsegpt_core.sparsegpt_reference(w, h, sparsity=0.5, blocksize=32)[:2]
  np.testing.assert_array_equal(np.asarray(keep), np.asarray(ref_keep))
  np.testing.assert_allclose(np.asarray(wp), np.asarray(ref_w), atol=2e-5)


def test_gptq_act_order_codes_match_float64_reference():
  k, n = 128, 48
  h = jnp.asarray(_hessian(k, 5))
  w = jnp.asarray(np.random.default_rng(2).standard_normal((k, n)).astype(np.float32))
  kw = dict(bits=4, group_size=32, act_order=True, static_groups=True)
  qw, info = gptq_core.gptq_quantize(w, h, blocksize=32, **kw)
  ref, rinfo = gptq_core.gptq_reference(w, h, **kw)
  codes, rcodes = np.asarray(qw.codes()), np.asarray(ref.codes())
  assert np.mean(codes != rcodes) < 2e-3  # float32 vs float64 rounding at grid boundaries
  np.testing.assert_allclose(float(info["loss"]), rinfo["loss"], rtol=1e-3)


def test_bench_solver_tiny(tmp_path):
  out = tmp_path / "bench.jsonl"
  subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_solver.py"), "--tiny",
                  "--out", str(out)], check=True, cwd=ROOT, capture_output=True, timeout=300)
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["method"] for r in recs] == ["gptq", "sparsegpt"]
  for r in recs:
    assert set(r["per_shape"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert r["block_s"] > 0 and abs(r["model_s"] - 30 * r["block_s"]) < 1e-9
    assert r["commit"] and r["date"] and r["machine"]


@pytest.mark.parametrize("kw", [
    dict(bits=4, group_size=64, act_order=True, static_groups=True),
    dict(bits=3, group_size=None, symmetric=False),
    dict(bits=4, group_size=32, act_order=False, static_groups=False)])
def test_gptq_fused_equals_per_layer(kw):
  """q/k/v-like weights sharing one H: the fused solve gives each weight's own codes and scales."""
  k = 192
  h = jnp.asarray(_hessian(k, 7))
  rng = np.random.default_rng(3)
  ws = [jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) * s)
        for n, s in ((96, 0.05), (32, 0.1), (32, 1.0))]
  fused, finfo = jax.jit(lambda ws, h: gptq_core.gptq_quantize_fused(ws, h, blocksize=64,
                                                                     **kw))(ws, h)
  loss = 0.0
  for w, qf in zip(ws, fused):
    q1, info = jax.jit(lambda w, h: gptq_core.gptq_quantize(w, h, blocksize=64, **kw))(w, h)
    assert qf.shape == w.shape
    np.testing.assert_array_equal(np.asarray(qf.codes()), np.asarray(q1.codes()))
    np.testing.assert_array_equal(np.asarray(qf.scale), np.asarray(q1.scale))
    if q1.zero is not None:
      np.testing.assert_array_equal(np.asarray(qf.zero), np.asarray(q1.zero))
    np.testing.assert_array_equal(np.asarray(qf.materialize()), np.asarray(q1.materialize()))
    loss += float(info["loss"])
  np.testing.assert_allclose(float(finfo["loss"]), loss, rtol=1e-5)
  with pytest.raises(ValueError, match=r"Ws\[1\] must be a \(K=192, N\)"):
    gptq_core.gptq_quantize_fused([ws[0], ws[1][:-1]], h, **kw)


@pytest.mark.slow  # ~60-110 s: two engine runs (the fused solve is checked bit for bit in test_gptq_fused_equals_per_layer)
def test_engine_fuses_shared_input_gptq_and_matches_per_layer(monkeypatch):
  """Under the engine, q/k/v and gate/up are solved as one GPTQ sweep each (one compiled fused
  solve per group shape, reused by every block) and the compressed model equals the per-layer
  solves exactly."""
  import tiny  # pylint: disable=import-outside-toplevel
  from compressjax import calibration, transforms as T  # pylint: disable=import-outside-toplevel
  from compressjax.transforms.selection import leaves_with_paths  # pylint: disable=import-outside-toplevel

  real = gptq_core.gptq_quantize_fused
  calls = []

  def counting(ws, h, **kw):
    calls.append(tuple(w.shape for w in ws))
    return real(ws, h, **kw)

  def per_layer(ws, h, **kw):  # what the engine did before: one solve per weight
    outs = [gptq_core.gptq_quantize(w, h, **kw) for w in ws]
    return [q for q, _ in outs], {"loss": sum(i["loss"] for _, i in outs)}

  model = tiny.tiny_model(seed=4)
  windows = np.random.default_rng(0).integers(0, 300, (4, 16)).astype(np.int32)
  kw = dict(bits=4, group_size=16, act_order=True, static_groups=True, blocksize=16)
  res = {}
  for name, impl in (("fused", counting), ("per_layer", per_layer)):
    monkeypatch.setattr(gptq_core, "gptq_quantize_fused", impl)
    q, _ = calibration.run_sequential(model, windows, T.gptq(**kw), batch_size=4, progress=False)
    res[name] = dict(leaves_with_paths(q))
  # Traced (compiled) once per group shape, then reused by every block.
  assert model.cfg.num_layers == 2
  assert sorted(len(c) for c in calls) == [2, 3], calls
  assert res["fused"].keys() == res["per_layer"].keys()
  for p, a in res["fused"].items():
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(res["per_layer"][p])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)
