"""The sequential calibration engine on a tiny model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import calibration, checkpoint, formats, transforms as T
from compressjax.io import build_model, model_params


def _windows(n=6, t=24, seed=0):
  return np.random.default_rng(seed).integers(0, 300, (n, t)).astype(np.int32)


def _same(a, b):
  fa, ta = jax.tree_util.tree_flatten(a)
  fb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_block_statistics_are_exact():
  model = tiny.tiny_model(seed=1)
  w = _windows()
  seen = {}

  def spy(path, leaf, stats):
    seen[path] = stats
    return leaf

  calibration.run_sequential(model, w, T.leafwise(spy, with_stats=True, name="spy"), batch_size=4,
                             progress=False)
  x = model.layers[0].attn_norm(model.embed_tokens(jnp.asarray(w))).reshape(-1, 64)
  st = seen["layers/0/attn/q_proj/kernel"]
  # q, k, v share their input statistics (the same arrays; each leaf's LayerStats may differ
  # only in its static column split)
  assert seen["layers/0/attn/k_proj/kernel"].hessian is st.hessian
  np.testing.assert_allclose(st.hessian, x.T @ x, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(st.sq_sum, jnp.sum(x * x, 0), rtol=1e-5)
  np.testing.assert_allclose(st.abs_sum, jnp.sum(jnp.abs(x), 0), rtol=1e-5)
  assert float(st.n) == w.size
  assert seen["layers/1/mlp/down_proj/kernel"].hessian.shape == (128, 128)
  assert len(seen) == 14


def test_data_free_transform_through_engine_equals_direct_apply():
  model = tiny.tiny_model(seed=2)
  t = T.rtn(bits=4, group_size=32)
  direct, _ = T.apply(t, model_params(model))
  via, _ = calibration.run_sequential(model, _windows(), t, batch_size=4, progress=False)
  _same(direct, via)


class Boom(Exception):
  pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
  model = tiny.tiny_model(seed=3)
  w = _windows()
  gptq = T.gptq(bits=3, group_size=32, blocksize=16)
  full, _ = calibration.run_sequential(model, w, gptq, batch_size=4, progress=False)

  calls = {"n": 0}
  inner = T.gptq(bits=3, group_size=32, blocksize=16)

  def update(params, state, stats=None):
    if stats and any(p.startswith("layers/1/") for p in stats):
      raise Boom("killed")
    return inner.update(params, state, stats)

  crashing = T.Transform(inner.init, update)
  with pytest.raises(Boom):
    calibration.run_sequential(model, w, crashing, batch_size=4, resume_dir=str(tmp_path),
                               progress=False)
  resumed, _ = calibration.run_sequential(model, w, gptq, batch_size=4, resume_dir=str(tmp_path),
                                          progress=False)
  _same(full, resumed)
  # Other calibration data must not silently reuse the resume point.
  with pytest.raises(ValueError, match="fingerprint"):
    calibration.run_sequential(model, _windows(seed=9), gptq, batch_size=4,
                               resume_dir=str(tmp_path), progress=False)
  # The last block is not propagated (its outputs feed nothing): the completed resume point
  # holds no inputs, and a run resumed from it solves and runs nothing and gives the same model.
  saved, meta = checkpoint.restore(os.path.join(str(tmp_path), "latest"))
  assert meta["next_block"] == 2 and np.asarray(saved["x"]).size == 0
  prof = calibration.EngineProfile()
  again, _ = calibration.run_sequential(model, w, gptq, batch_size=4, resume_dir=str(tmp_path),
                                        progress=False, profile=prof)
  _same(full, again)
  assert prof.blocks == [] and prof.seconds["stats"] == prof.seconds["forward"] == 0


def test_gptq_through_the_engine_beats_rtn_on_held_out_output():
  model = tiny.tiny_model(seed=4)
  cal, held = _windows(n=16, t=32, seed=0), jnp.asarray(_windows(n=4, t=32, seed=1))
  ref = model(held)
  err = {}
  for name, t in {"rtn": T.rtn(bits=3, group_size=32),
                  "gptq": T.gptq(bits=3, group_size=32)}.items():
    q, _ = calibration.run_sequential(model, cal, t, batch_size=8, progress=False)
    assert isinstance(q["layers"][1]["mlp"]["down_proj"]["kernel"], formats.QuantizedArray)
    err[name] = float(jnp.mean((build_model(model.cfg, q)(held) - ref) ** 2))
  assert err["gptq"] < err["rtn"], err


def test_modes_and_errors():
  """``mode`` decides which inputs the next block is calibrated on: "original" gives every block
  the uncompressed model's activations, "sequential" the compressed blocks' outputs."""
  model = tiny.tiny_model(seed=5)
  w = _windows()

  def recorder(seen):
    def spy(path, leaf, stats):
      if not isinstance(stats.hessian, jax.core.Tracer):  # chain() plans the steps first
        seen[path] = np.asarray(stats.hessian)
      return leaf
    return T.leafwise(spy, with_stats=True, name="spy")

  runs = {}
  for label, quantizer, mode in (("clean", None, "sequential"),
                                 ("seq", T.rtn(bits=2), "sequential"),
                                 ("orig", T.rtn(bits=2), "original")):
    seen = {}
    t = recorder(seen) if quantizer is None else T.chain(quantizer, recorder(seen))
    calibration.run_sequential(model, w, t, mode=mode, progress=False)
    runs[label] = seen
  key0, key1 = "layers/0/attn/q_proj/kernel", "layers/1/attn/q_proj/kernel"
  for label in ("seq", "orig"):  # layer 0 sees the embeddings in every mode
    np.testing.assert_array_equal(runs[label][key0], runs["clean"][key0])
  # "original": layer 1 sees the uncompressed layer 0's outputs, exactly as with no compression.
  np.testing.assert_array_equal(runs["orig"][key1], runs["clean"][key1])
  # "sequential": layer 1 sees the 2-bit layer 0's outputs, which differ.
  rel = np.abs(runs["seq"][key1] - runs["clean"][key1]).max() / np.abs(runs["clean"][key1]).max()
  assert rel > 1e-3, rel
  with pytest.raises(ValueError, match="mode"):
    calibration.run_sequential(model, w, T.gptq(bits=4), mode="parallel")
  with pytest.raises(ValueError, match="needs calibration statistics"):
    T.apply(T.gptq(bits=4), model_params(model))


def test_micro_steps_split_each_batch_per_device_and_join_back():
  assert calibration.micro_windows(8, 512) == 2  # MICRO_ROWS = 1024 rows per device
  assert calibration.micro_windows(8, 2048) == 1
  assert calibration.micro_windows(6, 256) == 3  # the largest divisor within the budget
  assert calibration.micro_windows(5, 24) == 5
  a = jnp.arange(8 * 3).reshape(8, 3)
  s = calibration._micro_split(a, 2, 2)  # 2 devices x 4 windows, 2 per device per micro-step
  # micro-step j holds windows 2j, 2j + 1 of device 0 (windows 0-3) and of device 1 (4-7)
  np.testing.assert_array_equal(np.asarray(s[:, :, 0]) // 3, [[0, 1, 4, 5], [2, 3, 6, 7]])
  np.testing.assert_array_equal(calibration._micro_join(s, 2, 2), a)


def test_propagation_pass_overwrites_its_inputs_in_place():
  """The forward (propagation) pass consumes its inputs: the compiled program's output aliases
  the donated input buffer and no temporary holds a second copy of the activations
  (``memory_analysis``), and its outputs are the block applied to every batch."""
  bm = calibration.as_block_model(tiny.tiny_model(seed=1))
  block = bm.block_params(0)
  xs = jax.random.normal(jax.random.key(0), (48, 4, 32, 64))  # activations >> one batch's temps
  want = jax.lax.map(lambda x: bm.apply_block(block, x), xs)
  passes = calibration._Passes(bm)
  mem = passes.forward.lower(block, xs).compile().memory_analysis()
  assert mem.alias_size_in_bytes == xs.nbytes, mem
  assert mem.temp_size_in_bytes < xs.nbytes / 2, mem  # a batch's temporaries, not a copy
  copy = jnp.copy(xs)
  got = passes.forward(block, copy)
  assert copy.is_deleted()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_micro_steps_bound_the_statistics_pass_temporaries(monkeypatch):
  """The statistics pass's compiled temporaries stay those of one micro-step (plus a copy of
  the batch's inputs, split into micro-steps) whatever the batch (``memory_analysis``), and its
  statistics are the same sums (float32 rounding)."""
  model = tiny.tiny_model(seed=1)
  bm = calibration.as_block_model(model)
  block = bm.block_params(0)
  xs = jax.random.normal(jax.random.key(0), (1, 8, 64, 64))
  monkeypatch.setattr(calibration, "MICRO_ROWS", 64)  # one window per micro-step
  passes = calibration._Passes(bm)
  small = passes.stats(True).lower(block, xs, None).compile().memory_analysis()
  one = passes.stats(True).lower(block, xs[:, :1], None).compile().memory_analysis()
  st_micro, out_micro = passes.stats(True)(block, xs, None)
  monkeypatch.setattr(calibration, "MICRO_ROWS", 1 << 20)  # the whole batch in one step
  whole = calibration._Passes(bm)
  big = whole.stats(True).lower(block, xs, None).compile().memory_analysis()
  st_whole, out_whole = whole.stats(True)(block, xs, None)
  batch_bytes = xs[0].size * 4  # the batch's inputs, split; with outputs kept: their join
  assert small.temp_size_in_bytes <= one.temp_size_in_bytes + 2 * batch_bytes
  assert big.temp_size_in_bytes > 3 * small.temp_size_in_bytes
  np.testing.assert_array_equal(out_micro, out_whole)
  for k in st_whole:
    np.testing.assert_allclose(st_micro[k].hessian, st_whole[k].hessian, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st_micro[k].sq_sum, st_whole[k].sq_sum, rtol=1e-5)
    assert float(st_micro[k].n) == float(st_whole[k].n) == 8 * 64
