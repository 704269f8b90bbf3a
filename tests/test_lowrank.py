"""Low-rank formats and factorization: SVD, activation-aware SVD, EoRA, LQ-LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import calibration, checkpoint, factorize, formats, pipeline, transforms as T
from compressjax.io import build_model, model_params
from compressjax.quantize import quantize_rtn


def _x(n=512, k=64, seed=0, sample_seed=None):
  """Inputs of one distribution (fixed by ``seed``); ``sample_seed`` draws other samples."""
  rng = np.random.default_rng(seed)
  x = np.random.default_rng(sample_seed).standard_normal((n, k)).astype(np.float32) if (
      sample_seed is not None) else rng.standard_normal((n, k)).astype(np.float32)
  rng = np.random.default_rng(seed + 1000)
  mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
  # Correlated channels of very different scale, as LLM activations.
  return (x * np.exp(rng.standard_normal(k)).astype(np.float32)) @ (np.eye(k) + mix)


def _w(k=64, n=48, seed=1):
  return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def _err(x, w, wp):
  return float(np.linalg.norm(x @ (w - np.asarray(wp))))


def test_svd_at_full_rank_reproduces_the_weights():
  w = _w()
  a, b = factorize.factorize(jnp.asarray(w), 48)
  np.testing.assert_allclose(np.asarray(a @ b), w, atol=2e-4)
  out, _ = T.apply(T.svd(48, factor_dtype=jnp.float32), {"layers": {0: {"mlp": {"up_proj": {
      "kernel": jnp.asarray(w)}}}}})
  np.testing.assert_allclose(np.asarray(out["layers"][0]["mlp"]["up_proj"]["kernel"].materialize()),
                             w, atol=2e-4)


@pytest.mark.parametrize("rank", [4, 16, 32])
def test_activation_aware_beats_plain_svd_on_output_error(rank):
  x, w = _x(), _w()
  h = jnp.asarray(x.T @ x)
  a, b = factorize.factorize(jnp.asarray(w), rank)
  a2, b2 = factorize.factorize(jnp.asarray(w), rank, h)
  assert _err(x, w, a2 @ b2) < _err(x, w, a @ b)
  # ... and it is optimal: its error is the tail of the whitened spectrum (undamped).
  a3, b3 = factorize.factorize(jnp.asarray(w), rank, h, percdamp=0.0)
  s = np.asarray(factorize.spectrum(jnp.asarray(w), h, percdamp=0.0))
  assert _err(x, w, a3 @ b3)**2 == pytest.approx(float((s[rank:]**2).sum()), rel=1e-3)
  # Plain SVD wins on weight error.
  assert np.linalg.norm(w - np.asarray(a @ b)) <= np.linalg.norm(w - np.asarray(a2 @ b2))


def test_eora_never_hurts_on_calibration_and_helps_on_held_out():
  x, w = _x(seed=0), _w()
  x_ho = _x(seed=0, sample_seed=5)  # held out: same distribution, other samples
  h = jnp.asarray(x.T @ x)
  for wc in (quantize_rtn(jnp.asarray(w), bits=3, group_size=32).materialize(),
             jnp.asarray(np.where(np.abs(w) > 0.7, w, 0))):  # a quantizer and a pruner
    before = _err(x, w, wc)
    for rank in (1, 4, 16, 48):
      a, b = factorize.eora_factors(jnp.asarray(w), wc, h, rank)
      assert _err(x, w, wc + a @ b) <= before * (1 + 1e-5)
    a, b = factorize.eora_factors(jnp.asarray(w), wc, h, 16)
    assert _err(x_ho, w, wc + a @ b) < 0.8 * _err(x_ho, w, wc)


def test_sum_and_lowrank_formats_multiply_like_their_materialization():
  w = jnp.asarray(_w())
  q = quantize_rtn(w, bits=4, group_size=32)
  a, b = factorize.factorize(w - q.materialize(), 8)
  lr = formats.LowRank(a.astype(jnp.float16), b.astype(jnp.float16), dtype=jnp.float32)
  s = formats.SumArray((q, lr), shape=w.shape, dtype=jnp.float32)
  for rows in (1, 5, 64):
    x = jax.random.normal(jax.random.key(rows), (rows, 64))
    for leaf in (lr, s):
      np.testing.assert_allclose(np.asarray(formats.dot(x, leaf)),
                                 np.asarray(x @ leaf.materialize()), rtol=2e-5, atol=2e-4)
  assert lr.nbytes == 2 * 8 * (64 + 48) and lr.rank == 8
  assert s.nbytes == q.nbytes + lr.nbytes


def test_lq_lora_alternation_improves_on_plain_quantization(tmp_path):
  x, w = _x(), _w()
  h = jnp.asarray(x.T @ x)
  quant = lambda m: quantize_rtn(m, bits=3, group_size=32)
  q, a, b, errors = factorize.lq_decompose(jnp.asarray(w), quant, 8, h, iters=4)
  assert min(errors) <= errors[0]
  assert _err(x, w, q.materialize() + a @ b) < _err(x, w, quant(jnp.asarray(w)).materialize())
  params = {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.asarray(w)}}}}}
  stats = {"layers/0/mlp/up_proj/kernel": calibration.LayerStats.zeros(64).add(jnp.asarray(x))}
  out, _ = T.apply(T.lq_lora(3, 32, rank=8), params, stats)
  leaf = out["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(leaf, formats.SumArray) and isinstance(leaf.terms[1], formats.LowRank)
  checkpoint.save(str(tmp_path / "c"), out)
  back, _ = checkpoint.restore(str(tmp_path / "c"))
  np.testing.assert_array_equal(
      np.asarray(back["layers"][0]["mlp"]["up_proj"]["kernel"].materialize()),
      np.asarray(leaf.materialize()))


def test_rank_allocation_respects_the_budget_and_varies():
  model = tiny.tiny_model()
  params = model_params(model)
  out, _ = T.apply(T.svd(keep_fraction=0.5, allocate=True), params)
  lrs = [l for _, l in T.leaves_with_paths(out) if isinstance(l, formats.LowRank)]
  budget = sum(factorize.rank_for_fraction(*l.shape, 0.5) * sum(l.shape) for l in lrs)
  assert sum(l.rank * sum(l.shape) for l in lrs) <= budget
  assert len({l.rank for l in lrs}) > 2
  with pytest.raises(ValueError, match="exactly one of rank= or keep_fraction="):
    T.svd(4, keep_fraction=0.5)


@pytest.mark.slow  # engine + pipeline jobs (~30 s alone)
def test_eora_after_quantizer_and_pruner_through_the_engine_and_pipeline():
  model = tiny.tiny_model()
  windows = np.random.default_rng(0).integers(0, 300, (8, 32))
  ref = model(jnp.asarray(windows))
  errs = {}
  for name, t in (("gptq", T.gptq(3, 32)), ("gptq+eora", T.eora(T.gptq(3, 32), 16)),
                  ("2:4", T.sparsegpt(pattern="2:4")),
                  ("2:4+eora", T.eora(T.sparsegpt(pattern="2:4"), 16))):
    out, _ = calibration.run_sequential(model, windows, t, batch_size=4, progress=False)
    errs[name] = float(jnp.mean((build_model(model.cfg, out)(jnp.asarray(windows)) - ref)**2))
  assert errs["gptq+eora"] < errs["gptq"] and errs["2:4+eora"] < errs["2:4"]
  comp = {"steps": ({"method": "gptq", "bits": 3, "group_size": 32}, {"method": "eora", "rank": 8})}
  assert pipeline.needs_calibration(comp)
  leaf = T.plan(pipeline.build_transform(comp), T.to_abstract(model_params(model)))[
      "layers"][0]["attn"]["q_proj"]["kernel"]
  assert isinstance(leaf, formats.SumArray) and leaf.terms[1].rank == 8


def test_quantized_factors_cost_fewer_bytes_and_keep_most_of_the_correction():
  """``factor_bits``: EoRA / SVD factors stored as RTN codes multiply like their materialization,
  cost well under half the float16 bytes at 4 bits, and 4-bit EoRA keeps most of its gain."""
  x, w = _x(), _w()
  params = {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.asarray(w)}}}}}
  stats = {"layers/0/mlp/up_proj/kernel": calibration.LayerStats.zeros(64).add(jnp.asarray(x))}
  base = T.rtn(3, 32)
  q = T.apply(base, params)[0]["layers"][0]["mlp"]["up_proj"]["kernel"]
  leaves = {}
  for fb in (None, 4):
    out, _ = T.apply(T.eora(base, 16, factor_bits=fb, factor_group_size=32), params, stats)
    leaves[fb] = out["layers"][0]["mlp"]["up_proj"]["kernel"]
  lr16, lr4 = leaves[None].terms[1], leaves[4].terms[1]
  assert isinstance(lr4.a, formats.QuantizedArray) and lr4.a.group_size == 32
  assert lr4.b.group_size == 16  # 16 rank rows: not a multiple of 32, so per-channel
  assert lr4.nbytes < 0.45 * lr16.nbytes  # scales and packing padding weigh more this small
  e_base, e16, e4 = (_err(x, w, l.materialize()) for l in (q, leaves[None], leaves[4]))
  assert e16 < e4 < e_base and (e_base - e4) > 0.7 * (e_base - e16)
  xs = jax.random.normal(jax.random.key(0), (5, 64))
  np.testing.assert_allclose(np.asarray(formats.dot(xs, leaves[4])),
                             np.asarray(xs @ leaves[4].materialize()), rtol=2e-5, atol=2e-4)
  out, _ = T.apply(T.svd(8, factor_bits=8), params)
  assert isinstance(out["layers"][0]["mlp"]["up_proj"]["kernel"].b, formats.QuantizedArray)
  with pytest.raises(ValueError, match="eora: factor_bits must be None or one of"):
    T.eora(base, 16, factor_bits=5)
  with pytest.raises(ValueError, match="svd: factor_group_size must be None or a positive int"):
    T.svd(8, factor_bits=4, factor_group_size=0)
