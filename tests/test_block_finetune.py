"""Trainable declarations of the formats, trainable masks, and block-wise fine-tuning in the
calibration engine (tiny model)."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny
from compressjax import blocks, calibration, finetune, formats as F, pipeline, transforms as T
from compressjax.io import model_params
from compressjax.transforms.selection import leaves_with_paths


def _qa(k=64, n=8, bits=2, gs=32, symmetric=False, seed=0):
  rng = np.random.default_rng(seed)
  codes = jnp.asarray(rng.integers(0, 2**bits, (k, n)), jnp.uint8)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, (k // gs, n)), jnp.float16)
  zero = None if symmetric else jnp.asarray(rng.standard_normal((k // gs, n)), jnp.float16)
  return F.QuantizedArray.from_codes(codes, scale, zero, bits=bits, group_size=gs,
                                     symmetric=symmetric)


def _keyed(tree):
  """``{key path string: leaf}`` of every array leaf (compressed leaves descended into)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(kp): x for kp, x in flat}


def _all_formats():
  rng = np.random.default_rng(1)
  dense = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
  sparse_dense = np.zeros((64, 8), np.float32)
  sparse_dense[3, 1], sparse_dense[40, 5] = 2.0, -1.0
  spqr_scale = F.Transposed(_qa(8, 2, bits=3, gs=8, symmetric=False, seed=2))  # (2, 8) stats
  keep = jnp.asarray(rng.random((64, 8)) < 0.5)
  nm_keep = jnp.asarray(np.tile(np.array([1, 1, 0, 0], bool)[:, None], (16, 8)))
  return {
      "qa": _qa(),
      "spqr": F.QuantizedArray(_qa(symmetric=True).packed, spqr_scale, None, bits=2, group_size=32,
                               shape=(64, 8), symmetric=True, dtype=jnp.float32),
      "sum": F.SumArray((_qa(seed=3), dense, F.LowRank(dense[:, :2], dense[:2, :],
                                                       dtype=jnp.float32),
                         F.SparseOutliers.from_dense(sparse_dense)), shape=(64, 8),
                        dtype=jnp.float32),
      "lowrank_q": F.LowRank(_qa(64, 32, bits=4, symmetric=True), dense[:32, :],
                             dtype=jnp.float32),
      "kept": F.KeptRows(jnp.array([1, 7], jnp.int32), jnp.ones((2, 8), jnp.float16),
                         shape=(64, 8), dtype=jnp.float32),
      "bitmask": F.BitmaskSparse.from_dense(dense, keep),
      "bitmask_q": F.BitmaskSparse.from_codes(jnp.zeros((64, 8), jnp.uint8), keep,
                                              jnp.ones((2, 8), jnp.float16), None, bits=4,
                                              group_size=32, symmetric=True),
      "nm": F.NMSparse.from_dense(dense, nm_keep, n=2, m=4),
      "nm_q": F.NMSparse.from_compact(_qa(32, 8, bits=4, gs=32, symmetric=True),
                                      jnp.tile(jnp.array([[0], [1]], jnp.int32), (16, 8)),
                                      n=2, m=4, dtype=jnp.float32),
  }


# Exactly the children a fine-tune may train (everything else is discrete or not selected).
EXPECTED_TRAINABLE = {
    "['qa'].scale", "['qa'].zero",
    "['spqr'].scale.inner.scale", "['spqr'].scale.inner.zero",
    "['sum'].terms[0].scale", "['sum'].terms[0].zero", "['sum'].terms[1]", "['sum'].terms[2].a",
    "['sum'].terms[2].b", "['sum'].terms[3].values",
    "['lowrank_q'].a.scale", "['lowrank_q'].b",
    "['kept'].values",
    "['bitmask'].values",
    "['bitmask_q'].scale",
    "['nm'].values",
    "['nm_q'].values.scale",
}


def test_every_format_declares_trainable_fields_that_exist():
  def subclasses(c):
    for s in c.__subclasses__():
      yield s
      yield from subclasses(s)

  seen = set()
  for cls in subclasses(F.CompressedArray):
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    assert set(cls.trainable) <= names, (cls, cls.trainable)
    seen.add(cls.__name__)
  assert {"QuantizedArray", "SumArray", "LowRank", "SparseOutliers", "KeptRows", "Transposed",
          "BitmaskSparse", "NMSparse"} <= seen
  assert F.QuantizedArray.trainable == ("scale", "zero") and F.CompressedArray.trainable == ()


def test_mask_is_true_exactly_on_declared_float_children():
  params = _all_formats()
  mask = finetune.trainable_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  got = {k for k, m in _keyed(mask).items() if m}
  assert got == EXPECTED_TRAINABLE, (got ^ EXPECTED_TRAINABLE)
  leaves = _keyed(params)
  for k, m in _keyed(mask).items():  # never codes, masks, indices, pointers
    if not jnp.issubdtype(leaves[k].dtype, jnp.floating):
      assert not m, k
  # The mask drives optax directly.
  state = optax.masked(optax.adam(1e-3), mask).init(params)
  assert state is not None
  # Abstract trees (planned recipes) get the same mask.
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  assert _keyed(finetune.trainable_mask(abstract)) == _keyed(mask)


def test_selection_dense_leaves_and_refusals():
  model = tiny.tiny_model(seed=0)
  planned = T.plan(T.rtn(bits=2, group_size=32), T.to_abstract(model_params(model)))
  mask = finetune.trainable_mask(planned, where=r"layers/0/attn/.*", train_dense=finetune.NORMS)
  flat = dict(leaves_with_paths(mask))
  assert flat["layers/0/attn/q_proj/kernel"].scale is True
  assert flat["layers/0/attn/q_proj/kernel"].packed is False
  assert flat["layers/0/mlp/up_proj/kernel"].scale is False  # not selected by `where`
  assert flat["layers/1/attn_norm/scale"] and flat["norm/scale"]
  assert not flat["embed/embedding"]
  for none in (None, ()):  # no dense leaf unless asked for
    m = dict(leaves_with_paths(finetune.trainable_mask(planned, train_dense=none)))
    assert not any(v for v in m.values() if isinstance(v, bool))
  with pytest.raises(ValueError, match="where=.*matched no compressed leaf"):
    finetune.trainable_mask(planned, where=r"layers/9/.*")
  with pytest.raises(ValueError, match="train_dense=.*matched no dense"):
    finetune.trainable_mask(planned, train_dense=r".*/bias")


def test_gradients_reach_only_selected_trainable_leaves():
  params = {"layers": {"0": {"w": _qa(seed=4)}, "1": {"w": _qa(seed=5)}},
            "norm": {"scale": jnp.ones((64,))}, "head": jnp.ones((8, 3))}
  mask = finetune.trainable_mask(params, where=r"layers/0/.*", train_dense=finetune.NORMS)
  train, frozen = finetune.partition(params, mask)
  kinds = {k: v.dtype for k, v in _keyed(train).items()}
  assert set(kinds) == {"['layers']['0']['w'].scale", "['layers']['0']['w'].zero",
                        "['norm']['scale']"}
  assert all(jnp.issubdtype(d, jnp.floating) for d in kinds.values())
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 64)), jnp.float32)

  @jax.jit
  def loss(t, f):
    p = finetune.combine(t, f)
    h = x * p["norm"]["scale"]
    y = F.dot(h, p["layers"]["0"]["w"]) + F.dot(h, p["layers"]["1"]["w"])
    return jnp.sum((y @ p["head"]) ** 2)

  grads = jax.grad(loss)(train, frozen)
  assert set(_keyed(grads)) == set(kinds)
  assert all(float(jnp.abs(g.astype(jnp.float32)).max()) > 0 for g in jax.tree.leaves(grads))
  back = finetune.combine(train, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _windows(n, t=32, seed=0):
  return np.random.default_rng(seed).integers(0, 300, (n, t)).astype(np.int32)


FT = finetune.BlockFinetune(steps=20, lr=1e-3, batch_size=4, train_norms=True)


@pytest.fixture(scope="module")
def gptq_runs():
  """GPTQ 2-bit in "original" mode (every block calibrated on the dense model's activations, so
  block errors of the two runs are comparable), without and with block fine-tuning."""
  model = tiny.tiny_model(seed=4)
  cal = _windows(8)
  plain, _ = calibration.run_sequential(model, cal, T.gptq(bits=2, group_size=32), batch_size=8,
                                        mode="original", progress=False)
  handler = _Count("Compiling jit(_finetune_step)")
  log = logging.getLogger("jax")
  log.addHandler(handler)
  try:
    with jax.log_compiles():
      tuned, _ = calibration.run_sequential(model, cal, T.gptq(bits=2, group_size=32),
                                            batch_size=8, mode="original", progress=False,
                                            block_finetune=FT)
  finally:
    log.removeHandler(handler)
  return model, cal, plain, tuned, handler.count


class _Count(logging.Handler):
  def __init__(self, needle):
    super().__init__(logging.DEBUG)
    self.needle, self.count = needle, 0

  def emit(self, record):
    self.count += self.needle in record.getMessage()


def _block_errors(model, params, windows):
  """Per block: MSE of the block in ``params`` vs the dense block, on the dense activations."""
  bm = blocks.as_block_model(model)
  x = bm.embed(bm.outside_params(), jnp.asarray(windows))
  apply = jax.jit(bm.apply_block)
  errs = []
  for i in range(bm.num_blocks):
    dense = bm.block_params(i)
    block = dict(leaves_with_paths(params["layers"][i]))
    y = apply(dense, x)
    errs.append(float(jnp.mean((apply(block, x) - y) ** 2)))
    x = y
  return errs


def test_block_finetune_lowers_each_blocks_output_error_and_keeps_codes(gptq_runs):
  model, cal, plain, tuned, _ = gptq_runs
  for name, w in (("calibration", cal), ("held-out", _windows(8, seed=1))):
    e0, e1 = _block_errors(model, plain, w), _block_errors(model, tuned, w)
    print(name, "block MSE without / with fine-tune:", e0, e1)
    assert all(b < 0.9 * a for a, b in zip(e0, e1)), (name, e0, e1)
  dense = model_params(model)
  for i in range(2):
    for path, q0 in leaves_with_paths(plain["layers"][i]):
      q1 = dict(leaves_with_paths(tuned["layers"][i]))[path]
      if isinstance(q0, F.QuantizedArray):  # codes bit-identical, the grid tuned, dtype kept
        np.testing.assert_array_equal(np.asarray(q0.packed), np.asarray(q1.packed))
        assert q1.scale.dtype == q0.scale.dtype
        assert float(jnp.abs(q1.scale.astype(jnp.float32) - q0.scale).max()) > 0
    n0 = dense["layers"][i]["attn_norm"]["scale"]
    assert float(jnp.abs(tuned["layers"][i]["attn_norm"]["scale"] - n0).max()) > 0  # train_norms
    np.testing.assert_array_equal(plain["layers"][i]["attn_norm"]["scale"], n0)
  np.testing.assert_array_equal(tuned["embed"]["embedding"], dense["embed"]["embedding"])


def test_train_step_compiles_once_for_all_blocks(gptq_runs):
  assert gptq_runs[-1] == 1  # 2 blocks x 20 steps, one compilation


class Boom(Exception):
  pass


def test_resume_with_block_finetune_equals_an_uninterrupted_run(gptq_runs, tmp_path):
  model, cal, plain, full, _ = gptq_runs
  gptq = T.gptq(bits=2, group_size=32)

  def update(params, state, stats=None):
    if isinstance(stats, dict) and any(p.startswith("layers/1/") for p in stats):
      raise Boom("killed")
    return gptq.update(params, state, stats)

  run = lambda t, **kw: calibration.run_sequential(model, cal, t, batch_size=8, mode="original",
                                                   resume_dir=str(tmp_path), progress=False, **kw)
  with pytest.raises(Boom):
    run(T.Transform(gptq.init, update), block_finetune=FT)
  # The saved block 0 is the tuned one.
  saved, _ = calibration.checkpoint.restore(str(tmp_path / "blocks" / "00000"))
  np.testing.assert_array_equal(saved["attn"]["q_proj"]["kernel"].scale,
                                full["layers"][0]["attn"]["q_proj"]["kernel"].scale)
  # Other fine-tune settings (or none) do not reuse the resume point.
  for other in (None, dataclasses.replace(FT, steps=21)):
    with pytest.raises(ValueError, match="fingerprint"):
      run(gptq, block_finetune=other)
  resumed, _ = run(gptq, block_finetune=FT)
  fa, ta = jax.tree_util.tree_flatten(full)
  fb, tb = jax.tree_util.tree_flatten(resumed)
  assert ta == tb
  for a, b in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(steps=0), "block_finetune: steps"), (dict(batch_size=-1), "block_finetune: batch_size"),
    (dict(lr=0.0), "block_finetune: lr"), (dict(b2=1.0), "block_finetune: b2"),
    (dict(train_norms="yes"), "block_finetune: train_norms")])
def test_bad_settings_are_refused_when_built(kwargs, fragment):
  with pytest.raises(ValueError, match=fragment):
    finetune.BlockFinetune(**kwargs)


def test_engine_refuses_selectors_matching_nothing_before_any_work():
  model = tiny.tiny_model(seed=0)
  calls = []
  rtn = T.rtn(bits=2, group_size=32)
  spy = T.Transform(rtn.init, lambda p, s, stats=None: calls.append(1) or rtn.update(p, s, stats))
  with pytest.raises(ValueError, match="block_finetune: .*matched no compressed leaf"):
    calibration.run_sequential(model, _windows(2), spy, progress=False,
                               block_finetune=finetune.BlockFinetune(where=r"layers/7/.*"))
  with pytest.raises(ValueError, match="block_finetune must be"):
    calibration.run_sequential(model, _windows(2), rtn, progress=False, block_finetune={"steps": 1})
  assert calls == [1]  # only the planning call


def test_config_field_wires_through_the_pipeline(tiny_gguf, tiny_data, monkeypatch):
  import importlib
  default = importlib.import_module("configs.default").get_config()
  assert pipeline.block_finetune_from_config(default.compression) is None  # steps = 0: off
  cfg = importlib.import_module("configs.gptq_w2g64_ft").get_config()
  assert pipeline.block_finetune_from_config(cfg.compression) == finetune.BlockFinetune(
      steps=100, lr=1e-4, batch_size=8, train_norms=True)
  cfg.model, cfg.data.dir = tiny_gguf[0], tiny_data
  cfg.data.seq_len, cfg.data.num_eval_windows, cfg.data.batch_size = 64, 2, 2
  cfg.calibration.num_windows, cfg.calibration.seq_len, cfg.calibration.batch_size = 4, 64, 2
  cfg.eval_before, cfg.output_dir = False, ""
  cfg.compression.block_finetune.steps = 7
  seen = {}

  def fake_run_sequential(*args, **kwargs):
    seen.update(kwargs)
    raise Boom("stop")

  monkeypatch.setattr(pipeline.calibration, "run_sequential", fake_run_sequential)
  with pytest.raises(Boom):
    pipeline.run_compress(cfg)
  assert seen["block_finetune"].steps == 7 and seen["block_finetune"].train_norms
  assert '"block_finetune"' in seen["recipe_key"]
  cfg.compression.block_finetune.lr = -1.0
  with pytest.raises(ValueError, match="compression.block_finetune: lr"):
    pipeline.run_compress(cfg)
  cfg.compression.block_finetune.lr = 1e-4
  cfg.compression.block_finetune.nesterov = True
  with pytest.raises(ValueError, match="compression.block_finetune: .*nesterov"):
    pipeline.run_compress(cfg)
  rtn = importlib.import_module("configs.rtn_w2g64").get_config()  # data-free: no engine
  rtn.model, rtn.data.dir, rtn.eval_before, rtn.output_dir = tiny_gguf[0], tiny_data, False, ""
  rtn.compression.block_finetune.steps = 5
  with pytest.raises(ValueError, match="needs a calibrated method"):
    pipeline.run_compress(rtn)


MESH_SCRIPT = """
import os; os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
import tiny
from compressjax import calibration, finetune, transforms as T
model = tiny.tiny_model(seed=4)
w = np.random.default_rng(0).integers(0, 300, (8, 32)).astype(np.int32)
ft = finetune.BlockFinetune(steps=5, lr=1e-3, batch_size=4, train_norms=True)
run = lambda **kw: calibration.run_sequential(model, w, T.rtn(bits=2, group_size=32), batch_size=4,
                                              progress=False, block_finetune=ft, **kw)[0]
one, sh = run(), run(mesh=jax.make_mesh((4,), ("data",)))
d = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(sh)))
assert d < 1e-5, d
print("BLOCK_FT_MESH_OK", d)
"""


@pytest.mark.slow
def test_block_finetune_on_a_mesh_equals_one_device():
  """Windows split over 4 simulated devices: the same tuned model as on one device."""
  from conftest import run_script
  run_script(MESH_SCRIPT, "BLOCK_FT_MESH_OK")


@pytest.mark.parametrize("incoherent", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["aqlm", "incoherent-aqlm"])  # incoherent: ~28 s alone, -m slow
def test_block_finetune_tunes_aqlm_codebooks_and_scales_keeping_codes(incoherent):
  """AQLM's own recipe (the paper's block-wise fine-tune of codebooks and scales), also behind
  the incoherence rotation: block errors fall, codes stay, codebooks and scales move."""
  model = tiny.tiny_model(seed=4)
  cal = _windows(8)
  aq = T.aqlm(num_codebooks=2, nbits=6, in_group_size=8, iterations=1, kmeans_iters=2)
  recipe = T.chain(T.incoherence(seed=0), aq) if incoherent else aq
  run = lambda ft: calibration.run_sequential(model, cal, recipe, batch_size=8, mode="original",
                                              progress=False, block_finetune=ft)[0]
  plain, tuned = run(None), run(FT)
  # On the calibration windows (what it minimizes) every block's error falls. Held out it must
  # not grow much: the tiny model's 256 calibration tokens against 2 x 64 x 8 codebook entries
  # per layer overfit (on the reference model each layer sees 65,536 tokens).
  e0, e1 = _block_errors(model, plain, cal), _block_errors(model, tuned, cal)
  assert all(b < 0.9 * a for a, b in zip(e0, e1)), (e0, e1)
  h0, h1 = (_block_errors(model, p, _windows(8, seed=1)) for p in (plain, tuned))
  assert all(b < 1.05 * a for a, b in zip(h0, h1)), (h0, h1)
  moved = 0
  for i in range(2):
    tuned_leaves = dict(leaves_with_paths(tuned["layers"][i]))
    for path, q0 in leaves_with_paths(plain["layers"][i]):
      q1 = tuned_leaves[path]
      if incoherent and isinstance(q0, F.Incoherent):
        np.testing.assert_array_equal(np.asarray(q0.su_bits), np.asarray(q1.su_bits))
        q0, q1 = q0.inner, q1.inner
      if isinstance(q0, F.AdditiveCodebookArray):
        np.testing.assert_array_equal(np.asarray(q0.codes), np.asarray(q1.codes))
        assert q1.codebooks.dtype == q0.codebooks.dtype
        moved += float(jnp.abs(q1.codebooks.astype(jnp.float32) - q0.codebooks).max()) > 0
        moved += float(jnp.abs(q1.scales.astype(jnp.float32) - q0.scales).max()) > 0
  assert moved == 2 * 2 * 7, moved  # every layer's codebooks and scales were tuned
