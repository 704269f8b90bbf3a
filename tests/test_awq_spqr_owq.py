"""AWQ, SpQR and OWQ: the math against baselines, and the transforms through the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import calibration, formats, transforms as T
from compressjax.io import build_model, model_params
from compressjax.quantize import awq_core, gptq_core, gptq_quantize, owq_quantize, spqr_quantize


def _x(n=512, k=64, seed=0, salient=(3, 17, 40)):
  """Inputs with a few salient (large-magnitude) channels, as LLM activations have."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, k)).astype(np.float32)
  x[:, list(salient)] *= 12.0
  return x


def _w(k=64, n=32, seed=1):
  return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def _out_err(x, w, wq):
  return float(np.linalg.norm(x @ (w - np.asarray(wq))))


# ----------------------------------------------------------------------------------------- AWQ


def test_awq_scale_search_beats_rtn_on_output_error_and_includes_it():
  x, w = _x(), _w()
  h = jnp.asarray(x.T @ x / len(x))
  s, alpha, errors = awq_core.search_scale((jnp.asarray(w),), h, jnp.abs(x).mean(0), bits=3,
                                           group_size=32, symmetric=True)
  rtn = awq_core.fake_quantize(jnp.asarray(w), bits=3, group_size=32, symmetric=True)
  # errors[0] is alpha = 0, i.e. s = 1: plain RTN, measured exactly from H.
  assert float(errors[0]) == pytest.approx(_out_err(x, w, rtn)**2 / len(x), rel=1e-3)
  assert float(alpha) > 0 and float(errors.min()) < 0.9 * float(errors[0])
  wq = awq_core.fake_quantize(jnp.asarray(w) * s[:, None], bits=3, group_size=32,
                              symmetric=True) / s[:, None]
  assert _out_err(x, w, wq) < _out_err(x, w, rtn)
  assert float(jnp.sqrt(jnp.max(s) * jnp.min(s))) == pytest.approx(1.0, rel=1e-5)


def test_awq_clip_search_never_increases_group_error():
  x, w = _x(seed=3), _w(seed=4)
  w[5, 2] = 9.0  # a weight outlier makes clipping worthwhile
  h = jnp.asarray(x.T @ x / len(x))
  wc, ratio = awq_core.search_clip(jnp.asarray(w), h, bits=3, group_size=32, symmetric=True)
  assert ratio.shape == (2, 32) and float(ratio.min()) >= 0.5 and float(ratio.max()) == 1.0
  q = lambda a: awq_core.fake_quantize(a, bits=3, group_size=32, symmetric=True)
  for g in range(2):
    sl = slice(32 * g, 32 * g + 32)
    e_clip = np.sum((x[:, sl] @ (w - np.asarray(q(wc)))[sl])**2, 0)
    e_plain = np.sum((x[:, sl] @ (w - np.asarray(q(jnp.asarray(w))))[sl])**2, 0)
    assert np.all(e_clip <= e_plain * (1 + 1e-4) + 1e-4)


def _windows(n=6, t=24, seed=0):
  return np.random.default_rng(seed).integers(0, 300, (n, t)).astype(np.int32)


def _logits(model, w):
  return np.asarray(model(jnp.asarray(w)))


@pytest.mark.parametrize("num_kv_heads", [2, 4])  # grouped-query (no v->o fold) and MHA
def test_awq_scaling_is_exactly_undone_in_full_precision(num_kv_heads):
  model = tiny.tiny_model(seed=5, num_kv_heads=num_kv_heads)
  w = _windows()
  new, state = calibration.run_sequential(model, w, T.awq(4, 32, clip=False), batch_size=3,
                                          progress=False)
  p0 = model_params(model)
  # The weights really changed (non-trivial scales), yet the function did not.
  changed = [p for (p, a), (_, b) in zip(T.leaves_with_paths(p0), T.leaves_with_paths(new))
             if not np.allclose(a, b)]
  assert any(a > 0 for a in state.report.values()) and changed
  groups = {g.name.split("/")[-1] for g in state.groups}
  assert groups == ({"qkv", "gate_up", "down"} | ({"vo"} if num_kv_heads == 4 else set()))
  m2 = build_model(model.cfg, new)
  np.testing.assert_allclose(_logits(m2, w), _logits(model, w), rtol=2e-4, atol=2e-4)


def test_awq_then_rtn_beats_rtn_and_tells_gptq_the_rescaled_statistics():
  model = tiny.tiny_model(seed=6)
  w = _windows(8, 32)
  held = _windows(4, 32, seed=9)
  ref = _logits(model, held)
  err = lambda p: float(np.mean((_logits(build_model(model.cfg, p), held) - ref)**2))
  rtn_p, _ = calibration.run_sequential(model, w, T.rtn(3, 32), batch_size=4, progress=False)
  awq_p, _ = calibration.run_sequential(model, w, T.chain(T.awq(3, 32), T.rtn(3, 32)),
                                        batch_size=4, progress=False)
  assert err(awq_p) < err(rtn_p)
  # A step after awq sees the statistics of the rescaled inputs: the same as a fresh engine run
  # over the AWQ-scaled model (mode="original" so inputs are the full-precision ones).
  seen = {}

  def spy(path, leaf, stats):
    seen[path] = stats  # the planning call (placeholder stats) comes first
    return leaf

  scaled, _ = calibration.run_sequential(
      model, w, T.chain(T.awq(3, 32, clip=False), T.leafwise(spy, with_stats=True, name="spy")),
      batch_size=4, progress=False, mode="original")
  after = dict(seen)
  seen.clear()
  calibration.run_sequential(build_model(model.cfg, scaled), w,
                             T.leafwise(spy, with_stats=True, name="spy"), batch_size=4,
                             progress=False, mode="original")
  for p in ("layers/0/attn/q_proj/kernel", "layers/1/mlp/down_proj/kernel"):
    np.testing.assert_allclose(after[p].hessian, seen[p].hessian, rtol=2e-3, atol=2e-3)


def test_awq_inside_a_rule_is_a_clear_error():
  model = tiny.tiny_model(seed=7)
  with pytest.raises(ValueError, match="top level"):
    T.select((T.LINEAR_KERNELS, T.awq(4, 32))).init(model_params(model))


# ---------------------------------------------------------------------------------------- SpQR


def test_spqr_outliers_and_bilevel_statistics_round_trip():
  x, w = _x(seed=10), _w(seed=11)
  w[7, 3], w[50, 30] = 30.0, -25.0  # planted outliers
  h = jnp.asarray(2 * x.T @ x / len(x))
  kw = dict(bits=3, group_size=16, symmetric=False, scale_dtype=jnp.float16, blocksize=16,
            percdamp=0.01, act_order=False, static_groups=False, outlier_threshold=0.2,
            stats_bits=3, stats_group_size=16)
  codes, scale, zero, q, resid, info = gptq_core._gptq(jnp.asarray(w), h, with_q=True, **kw)
  leaf, info2 = spqr_quantize(jnp.asarray(w), h, bits=3, group_size=16, blocksize=16)
  assert isinstance(leaf, formats.SumArray)
  base, sparse = leaf.terms
  # Bilevel statistics: the stored second level decodes exactly to what the algorithm used.
  rt = lambda s: gptq_core.stats_roundtrip(s, stats_bits=3, stats_group_size=16,
                                           scale_dtype=jnp.float16)
  np.testing.assert_array_equal(np.asarray(base.scale_values()), np.asarray(rt(scale)))
  np.testing.assert_array_equal(np.asarray(base.zero_values()), np.asarray(rt(zero)))
  np.testing.assert_array_equal(np.asarray(base.codes()), np.asarray(codes))
  # Outliers: the planted weights are among them and come back (up to float16).
  dense_sparse = np.asarray(sparse.materialize())
  assert dense_sparse[7, 3] != 0 and dense_sparse[50, 30] != 0
  assert sparse.nnz == int(info2["outliers"]) == int(info["outliers"])
  np.testing.assert_allclose(np.asarray(leaf.materialize()), np.asarray(q), rtol=2e-3, atol=2e-3)
  assert abs(float(leaf.materialize()[7, 3]) - 30.0) < 0.5
  # Honest bytes: codes + 3-bit stats + second-level fp16 + 32 bits per outlier + pointers
  # (3-bit codes packed 10 per uint32: 7 words per column of 64, 4 per column of 32 stats).
  expect = (4 * 7 * 32 + 2 * (4 * 4 * 4 + 2 * 2 * 4 * 32 / 16)
            + 4 * sparse.nnz + 4 * 33)
  assert leaf.nbytes == pytest.approx(expect)


def test_spqr_outliers_reduce_output_error_and_spqr_beats_gptq():
  x, w = _x(seed=12), _w(seed=13)
  w[np.random.default_rng(0).random(w.shape) < 0.01] *= 8.0
  h = jnp.asarray(2 * x.T @ x / len(x))
  with_o, info = spqr_quantize(jnp.asarray(w), h, bits=3, group_size=16, blocksize=16)
  without, _ = spqr_quantize(jnp.asarray(w), h, bits=3, group_size=16, blocksize=16,
                             outlier_threshold=float("inf"))
  assert 0 < info["outlier_fraction"] < 0.05
  assert _out_err(x, w, with_o.materialize()) < _out_err(x, w, without.materialize())
  g, _ = gptq_quantize(jnp.asarray(w), h, bits=3, group_size=64, blocksize=16)
  assert _out_err(x, w, with_o.materialize()) < _out_err(x, w, g.materialize())


# ----------------------------------------------------------------------------------------- OWQ


def test_owq_keeps_the_sensitive_rows_and_beats_gptq():
  x, w = _x(seed=14, salient=(3, 17)), _w(seed=15)
  h = jnp.asarray(2 * x.T @ x / len(x))
  leaf, info = owq_quantize(jnp.asarray(w), h, bits=3, n_keep=2, blocksize=16)
  assert info["kept_rows"] == [3, 17]
  kept = leaf.terms[1]
  assert isinstance(kept, formats.KeptRows) and kept.nbytes == 2 * 4 + 2 * 32 * 2
  g, _ = gptq_quantize(jnp.asarray(w), h, bits=3, blocksize=16)
  assert _out_err(x, w, leaf.materialize()) < 0.8 * _out_err(x, w, g.materialize())
  base, _ = owq_quantize(jnp.asarray(w), h, bits=3, n_keep=0, blocksize=16)
  assert isinstance(base, formats.QuantizedArray)
  with pytest.raises(ValueError, match="static_groups"):
    gptq_core._check_args(jnp.asarray(w), h, 3, 16, 16, 0.01, True, False)
  with pytest.raises(ValueError, match="n_keep"):
    owq_quantize(jnp.asarray(w), h, bits=3, n_keep=64)


@pytest.mark.parametrize("kind", ["zeros", "rank1", "nan"])
def test_spqr_and_owq_are_finite_on_degenerate_hessians(kind):
  w = _w(seed=16)
  if kind == "zeros":
    h = np.zeros((64, 64), np.float32)
  elif kind == "rank1":
    v = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    h = np.outer(v, v)
  else:
    h = np.full((64, 64), np.nan, np.float32)
  for leaf in (spqr_quantize(jnp.asarray(w), jnp.asarray(h), bits=3, group_size=16,
                             blocksize=16)[0],
               owq_quantize(jnp.asarray(w), jnp.asarray(h), bits=3, n_keep=1, blocksize=16)[0]):
    assert np.all(np.isfinite(np.asarray(leaf.materialize())))


@pytest.mark.slow  # ~30 s (with -m slow, like spqr planning); owq_w3 runs in test_cli
def test_spqr_and_owq_transforms_through_the_engine():
  model = tiny.tiny_model(seed=8)
  w = _windows()
  out, _ = calibration.run_sequential(
      model, w, T.select((r".*attn/.*", T.spqr(3, 16)), (r".*mlp/.*", T.owq(3, n_keep=2))),
      batch_size=3, progress=False)
  q = out["layers"][0]["attn"]["q_proj"]["kernel"]
  o = out["layers"][1]["mlp"]["down_proj"]["kernel"]
  assert isinstance(q, (formats.SumArray, formats.QuantizedArray))
  assert isinstance(o, formats.SumArray) and isinstance(o.terms[1], formats.KeptRows)
  m = build_model(model.cfg, out)
  assert np.all(np.isfinite(_logits(m, w)))


def test_awq_then_gptq_chain_plans_and_runs():
  model = tiny.tiny_model(seed=10)
  recipe = T.chain(T.awq(3, 32), T.gptq(3, 32))
  planned = T.plan(recipe, T.to_abstract(model_params(model)))
  assert isinstance(planned["layers"][0]["mlp"]["down_proj"]["kernel"], formats.QuantizedArray)
  out, state = calibration.run_sequential(model, _windows(), recipe, batch_size=3, progress=False)
  assert set(state.inner[0].scales) == {p for p, _ in T.leaves_with_paths(out)
                                        if p.endswith("_proj/kernel") and "o_proj" not in p}
  assert np.all(np.isfinite(_logits(build_model(model.cfg, out), _windows())))
