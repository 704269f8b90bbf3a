"""Pruning: masks, SparseGPT against a slow reference and baselines, sparse formats, structured
pruning through the calibration engine, sparse + quantized chains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import calibration, checkpoint, formats, pipeline, prune, transforms as T
from compressjax.io import build_model, model_params
from compressjax.prune import structured_core


def _x(n=512, k=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, k)).astype(np.float32)
  x *= np.exp(rng.standard_normal(k)).astype(np.float32)  # channels of very different scale
  return x


def _w(k=64, n=32, seed=1):
  return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def _out_err(x, w, wp):
  return float(np.linalg.norm(x @ (w - np.asarray(wp))))


def _hess(x):
  return jnp.asarray(2 * x.T @ x / len(x))


# ----------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_keep_exactly_n_of_every_m_even_with_ties(n, m):
  w = _w(64, 16)
  w[:8] = 0.0  # ties: whole groups of zeros
  for keep in (prune.nm_mask(jnp.abs(jnp.asarray(w)), n, m),
               prune.nm_mask(prune.wanda_score(jnp.asarray(w), jnp.ones(64)), n, m)):
    counts = np.asarray(keep).reshape(64 // m, m, 16).sum(1)
    assert (counts == n).all()
  x = _x()
  _, keep, _ = prune.sparsegpt_prune(jnp.asarray(w), _hess(x), pattern=f"{n}:{m}", blocksize=16)
  assert (np.asarray(keep).reshape(64 // m, m, 16).sum(1) == n).all()


def test_unstructured_masks_exact_counts():
  w = jnp.asarray(_w())
  assert int(prune.unstructured_mask(jnp.abs(w), 0.5).sum()) == w.size // 2
  per_out = prune.unstructured_mask(jnp.abs(w), 0.25, per_output=True)
  assert (np.asarray(per_out).sum(0) == 48).all()
  # Magnitude keeps the largest entries.
  keep = np.asarray(prune.unstructured_mask(jnp.abs(w), 0.5))
  assert np.abs(np.asarray(w))[keep].min() >= np.abs(np.asarray(w))[~keep].max()


def test_bad_patterns_and_sparsities_are_named():
  with pytest.raises(ValueError, match="pattern"):
    T.wanda(pattern="2-4")
  with pytest.raises(ValueError, match="sparsity"):
    T.magnitude(1.5)
  with pytest.raises(ValueError, match="m=8 to divide the input width K=60"):
    prune.nm_mask(jnp.ones((60, 4)), 4, 8)
  with pytest.raises(ValueError, match="scope"):
    T.magnitude(0.5, scope="model")


# ------------------------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_sparsegpt_matches_slow_reference(pattern):
  x, w = _x(256, 48), _w(48, 8)  # K=48 with blocksize 32: a padded last block
  wp, keep, info = prune.sparsegpt_prune(jnp.asarray(w), _hess(x), sparsity=0.5, pattern=pattern,
                                         blocksize=32)
  wr, kr = prune.sparsegpt_reference(w, _hess(x), sparsity=0.5, pattern=pattern, blocksize=32)
  assert (np.asarray(keep) == kr).all()
  np.testing.assert_allclose(np.asarray(wp), wr, atol=2e-5)
  assert bool(info["cholesky_ok"])
  assert (np.asarray(wp)[~np.asarray(keep)] == 0).all()


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_beats_magnitude_and_wanda_on_output_error(pattern):
  x, w = _x(), _w()
  nm = prune.parse_pattern(pattern)
  h = _hess(x)
  wp, _, _ = prune.sparsegpt_prune(jnp.asarray(w), h, sparsity=0.5, pattern=pattern, blocksize=64)
  mask = lambda s: (prune.nm_mask(s, *nm) if nm else prune.unstructured_mask(s, 0.5))
  mag = np.where(np.asarray(mask(jnp.abs(jnp.asarray(w)))), w, 0)
  wscore = prune.wanda_score(jnp.asarray(w), jnp.asarray((x * x).sum(0)))
  wan = np.where(np.asarray(prune.nm_mask(wscore, *nm) if nm else
                            prune.unstructured_mask(wscore, 0.5, per_output=True)), w, 0)
  e_sgpt, e_mag, e_wan = _out_err(x, w, wp), _out_err(x, w, mag), _out_err(x, w, wan)
  assert e_sgpt < e_wan < e_mag
  # ... while magnitude wins on weight error (it keeps exactly the largest weights).
  assert np.linalg.norm(w - mag) < np.linalg.norm(w - np.asarray(wp))


def test_sparsegpt_singular_hessian_is_finite():
  x = _x(8, 64)  # rank 8 < 64, and a dead input
  x[:, 5] = 0
  wp, keep, info = prune.sparsegpt_prune(jnp.asarray(_w()), _hess(x), sparsity=0.5)
  assert np.isfinite(np.asarray(wp)).all() and int(info["dead"]) == 1


# ---------------------------------------------------------------------------------- formats


def test_sparse_formats_multiply_like_their_materialization_and_count_bytes():
  w = jnp.asarray(_w(64, 32))
  keep = prune.unstructured_mask(jnp.abs(w), 0.5)
  s = formats.BitmaskSparse.from_dense(w, keep)
  nm = formats.NMSparse.from_dense(w, prune.nm_mask(jnp.abs(w), 2, 4), n=2, m=4)
  for leaf in (s, nm):
    for rows in (1, 3, 40):
      x = jax.random.normal(jax.random.key(rows), (rows, 64))
      np.testing.assert_allclose(np.asarray(formats.dot(x, leaf)),
                                 np.asarray(x @ leaf.materialize()), rtol=1e-5, atol=1e-5)
  # 1 mask bit per entry + fp16 values; 2:4: fp16 values + 2-bit indices of the kept half;
  # 4:8: 3-bit indices packed 10 per uint32 (4 words for the 32 kept rows of a column of 64).
  assert s.nbytes == 64 * 32 // 8 + 2 * 1024
  assert nm.bits_per_param == pytest.approx(9.0)
  assert formats.NMSparse.from_dense(w, prune.nm_mask(jnp.abs(w), 4, 8), n=4, m=8).bits_per_param \
      == pytest.approx(8 + 4 * 32 / 64)


def test_sparse_quantized_round_trips(tmp_path):
  x, w = _x(), _w()
  h = _hess(x)
  wp, keep, _ = prune.sparsegpt_prune(jnp.asarray(w), h, sparsity=0.5)
  params = {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.asarray(w)}}}}}
  stats = {"layers/0/mlp/up_proj/kernel": calibration.LayerStats.zeros(64).add(jnp.asarray(x))}
  for pattern in (None, "2:4"):
    for q in (T.rtn(4, 32), T.gptq(4, 32)):
      out, _ = T.apply(T.chain(T.sparsegpt(0.5, pattern, blocksize=64), q), params, stats)
      leaf = out["layers"][0]["mlp"]["up_proj"]["kernel"]
      dense = np.asarray(leaf.materialize())
      kept = np.asarray(leaf.keep_mask())
      assert (dense[~kept] == 0).all() and kept.mean() == 0.5
      # Kept values lie on the 4-bit grid of their group: at most 16 distinct values per group.
      assert all(len(np.unique(dense[g * 32:(g + 1) * 32, c])) <= 17
                 for g in range(2) for c in range(0, 32, 7))
      checkpoint.save(str(tmp_path / "ck"), out, overwrite=True)
      back, _ = checkpoint.restore(str(tmp_path / "ck"))
      np.testing.assert_array_equal(
          np.asarray(back["layers"][0]["mlp"]["up_proj"]["kernel"].materialize()), dense)
  # GPTQ with the mask fixed beats RTN of the same mask on output error.
  errs = {}
  for name, q in (("rtn", T.rtn(4, 32)), ("gptq", T.gptq(4, 32))):
    out, _ = T.apply(T.chain(T.sparsegpt(0.5, blocksize=64), q), params, stats)
    errs[name] = _out_err(x, w, out["layers"][0]["mlp"]["up_proj"]["kernel"].materialize())
  assert errs["gptq"] < errs["rtn"]
  # 50% + 4-bit g32: 1 mask bit + 4 bits per kept value + fp16 scales.
  assert out["layers"][0]["mlp"]["up_proj"]["kernel"].bits_per_param == pytest.approx(
      1 + 2 + 16 / 32, abs=0.01)


# ------------------------------------------------------------------------------ transforms


def test_magnitude_global_and_lamp_budgets():
  model = tiny.tiny_model()
  params = model_params(model)
  for budget in (None, "lamp"):
    out, _ = T.apply(T.magnitude(0.5, scope="global", budget=budget), params)
    leaves = [l for p, l in T.leaves_with_paths(out) if isinstance(l, formats.BitmaskSparse)]
    assert len(leaves) == 14
    total = sum(l.num_params for l in leaves)
    assert sum(l.nnz for l in leaves) == total - round(0.5 * total)
    assert len({round(l.density, 3) for l in leaves}) > 1  # layer-adaptive
  planned = T.plan(T.magnitude(0.5, scope="global"), T.to_abstract(params))
  assert isinstance(planned["layers"][0]["mlp"]["up_proj"]["kernel"], formats.BitmaskSparse)


def test_pruning_transforms_through_the_engine_and_plan():
  model = tiny.tiny_model()
  windows = np.random.default_rng(0).integers(0, 300, (8, 32))
  params = model_params(model)
  errs = {}
  for name, t in (("magnitude", T.magnitude(0.5)), ("wanda", T.wanda(0.5)),
                  ("sparsegpt", T.sparsegpt(0.5))):
    if name == "magnitude":
      out, _ = T.apply(t, params)
    else:
      out, _ = calibration.run_sequential(model, windows, t, batch_size=4, progress=False)
    planned = T.plan(t, T.to_abstract(params))
    for (p, leaf), (_, ab) in zip(T.leaves_with_paths(out), T.leaves_with_paths(planned)):
      if isinstance(leaf, formats.CompressedArray):
        assert type(leaf) is type(ab) and leaf.nnz == ab.nnz, p
    logits = build_model(model.cfg, out)(jnp.asarray(windows))
    ref = model(jnp.asarray(windows))
    errs[name] = float(jnp.mean((logits - ref)**2))
  assert errs["sparsegpt"] < errs["magnitude"] and errs["wanda"] < errs["magnitude"]


def test_pruning_a_compressed_leaf_names_the_path():
  params = {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.asarray(_w())}}}}}
  q, _ = T.apply(T.rtn(4, 32), params)
  with pytest.raises(ValueError, match="layers/0/mlp/up_proj/kernel.*already compressed"):
    T.apply(T.magnitude(0.5), q)


# ------------------------------------------------------------------------------ structured


def test_structured_with_nothing_pruned_is_exactly_the_original():
  model = tiny.tiny_model()
  windows = np.random.default_rng(0).integers(0, 300, (4, 16))
  t = T.structured(0.0, prune_heads=False)
  out, _ = calibration.run_sequential(model, windows, t, batch_size=4, progress=False)
  for (p, a), (_, b) in zip(T.leaves_with_paths(out), T.leaves_with_paths(model_params(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)


@pytest.mark.slow  # several structured runs and chains (~33 s alone)
def test_structured_really_shrinks_and_chains_with_quantizers(tmp_path):
  model = tiny.tiny_model()
  cfg = model.cfg
  windows = np.random.default_rng(0).integers(0, 300, (8, 32))
  t = T.structured(0.3, prune_heads=True, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
                   multiple_of=16)
  out, state = calibration.run_sequential(model, windows, t, batch_size=4, progress=False)
  blk = out["layers"][0]
  # 4 heads in 2 KV groups -> 1 per group kept; the MLP loses the rest of the 30%.
  assert blk["attn"]["q_proj"]["kernel"].shape == (64, 2 * cfg.head_dim)
  assert blk["attn"]["o_proj"]["kernel"].shape == (2 * cfg.head_dim, 64)
  assert blk["attn"]["k_proj"]["kernel"].shape == (64, 2 * cfg.head_dim)
  f = blk["mlp"]["down_proj"]["kernel"].shape[0]
  assert f < 128 and f % 16 == 0
  assert blk["mlp"]["gate_proj"]["kernel"].shape == blk["mlp"]["up_proj"]["kernel"].shape == (64, f)
  n_before = sum(np.size(l) for p, l in T.leaves_with_paths(model_params(model)) if "layers/0/" in p)
  n_after = sum(np.size(l) for p, l in T.leaves_with_paths(out) if "layers/0/" in p)
  assert n_after < 0.75 * n_before
  # The smaller model is a normal model: it runs, saves and restores.
  small = build_model(cfg, out)
  logits = small(jnp.asarray(windows[:2]))
  assert logits.shape == (2, 32, cfg.vocab_size) and bool(jnp.isfinite(logits).all())
  checkpoint.save(str(tmp_path / "s"), out)
  back, _ = checkpoint.restore(str(tmp_path / "s"))
  np.testing.assert_array_equal(np.asarray(build_model(cfg, back)(jnp.asarray(windows[:2]))),
                                np.asarray(logits))
  # Chained quantizer gets the statistics of the kept channels (restat).
  out_q, _ = calibration.run_sequential(model, windows, T.chain(t, T.gptq(4, 16)), batch_size=4,
                                        progress=False)
  k = out_q["layers"][1]["mlp"]["down_proj"]["kernel"]
  assert isinstance(k, formats.QuantizedArray) and k.shape == (f, 64)
  assert set(state.inner[0].kept if hasattr(state, "inner") else state.kept) >= {
      "layers/0/mlp/down_proj/kernel", "layers/1/attn/o_proj/kernel"}


def test_structured_compensation_reduces_output_error():
  x = np.abs(_x(512, 64))  # post-activation-like inputs
  w = _w(64, 16)
  h = jnp.asarray(x.T @ x)
  score = structured_core.channel_scores(jnp.asarray(w), jnp.asarray((x * x).sum(0)))
  idx = structured_core.top_channels(score, 40)
  plain = np.asarray(x[:, np.asarray(idx)] @ w[np.asarray(idx)])
  refit = np.asarray(x[:, np.asarray(idx)] @ np.asarray(
      structured_core.compensate_rows(jnp.asarray(w), h, idx)))
  full = x @ w
  assert np.linalg.norm(full - refit) < 0.8 * np.linalg.norm(full - plain)
  # The score beats a random choice of the same size.
  rnd = np.sort(np.random.default_rng(0).permutation(64)[:40])
  assert np.linalg.norm(full - plain) < np.linalg.norm(full - x[:, rnd] @ w[rnd])


def test_pipeline_steps_build_a_chain_and_need_calibration():
  comp = {"method": "none", "where": T.LINEAR_KERNELS,
          "steps": ({"method": "sparsegpt", "sparsity": 0.5},
                    {"method": "gptq", "bits": 4, "group_size": 32})}
  assert pipeline.needs_calibration(comp)
  t = pipeline.build_transform(comp)
  out = T.plan(t, T.to_abstract(model_params(tiny.tiny_model())))
  leaf = out["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(leaf, formats.BitmaskSparse) and leaf.bits == 4
  with pytest.raises(ValueError, match="cannot be used inside compression.rules"):
    pipeline.build_transform({"rules": ({"where": ".*", "method": "structured"},)})
