"""Straight-through (STE) and PV-tuning fine-tunes (compressjax.finetune.ste / pv), tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import formats, transforms as T
from compressjax.finetune import distill, pv, ste, trainable_mask
from compressjax.io import build_model, model_params

SEL = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"
DC = dict(lr=5e-3, micro_batch=4, accum=2, chunk=16, warmup=2)


@pytest.fixture(scope="module")
def setup():
  model = tiny.tiny_model(seed=1)
  p = model_params(model)
  q, _ = T.apply(T.rtn(2, 32), p)
  rng = np.random.default_rng(0)
  nxt = rng.integers(0, 300, (300, 3))
  windows = np.zeros((80, 32), np.int32)
  windows[:, 0] = rng.integers(0, 300, 80)
  for t in range(1, 32):
    windows[:, t] = nxt[windows[:, t - 1], rng.integers(0, 3, 80)]
  return model.cfg, p, q, windows


def _logits(cfg, params, tokens):
  return np.asarray(build_model(cfg, params)(jnp.asarray(tokens)))


def _heldout(cfg, p, q, windows, dc):
  part = distill.partition(q, trainable_mask(q, where=SEL))
  loss_fn, ts = distill.make_loss_fn(cfg, part, p, dc)
  tr, fr = part.split(q)
  return distill.heldout_loss(loss_fn, ts, tr, fr, windows, micro_batch=4)["kd"]


def _run(cfg, p, q, windows, mode, steps, **kw):
  dc = distill.DistillConfig(steps=steps, **{**DC, **kw.pop("dc", {})})
  if mode == "kd":
    return distill.finetune(cfg, p, q, trainable_mask(q, where=SEL), windows, dc,
                            progress=False, **kw)
  pc = kw.pop("pc", pv.PVConfig(tau=0.005, lr_v=5e-3))
  tree = ste.to_ste(q, SEL) if mode == "ste" else pv.to_pv(q, SEL)
  mask = trainable_mask(tree, where=SEL)
  extra = {}
  if mode == "pv":
    part = distill.partition(tree, mask)
    extra = dict(opt=pv.make_optimizer(tree, part, dc, pc), post_step=pv.make_v_step(pc))
  out, hist = distill.finetune(cfg, p, tree, mask, windows, dc, progress=False, **extra, **kw)
  return out, hist


def test_ste_forward_is_the_compressed_models_exactly(setup):
  cfg, _, q, windows = setup
  s = ste.to_ste(q)
  for tokens in (windows[:2], windows[:1, :8]):  # decode path and few-row path of formats.dot
    np.testing.assert_array_equal(_logits(cfg, s, tokens), _logits(cfg, q, tokens))
  e = ste.export(s)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), q, e))
  # A VQ leaf: nearest-codeword codes reproduce the stored ones (duplicate codewords included).
  rng = np.random.default_rng(3)
  cb = jnp.asarray(rng.integers(-4, 4, (2, 2, 16, 4)), jnp.int8)  # duplicates likely
  vq = formats.VQArray.from_codes(jnp.asarray(rng.integers(0, 16, (16, 64))), cb,
                                  jnp.full((2, 2), 0.01, jnp.float16), dim=4, group_size=32,
                                  out_block=32)
  sv = ste.to_ste({"w": vq})["w"]
  np.testing.assert_array_equal(np.asarray(sv.codes()), np.asarray(vq.code_values()))
  x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(formats.dot(x, sv)), np.asarray(formats.dot(x, vq)))


def test_gradients_reach_only_selected_continuous_leaves(setup):
  cfg, p, q, windows = setup
  where = r"layers/0/mlp/\w+_proj/kernel"
  tree = ste.to_ste(q, where)
  assert isinstance(tree["layers"][1]["mlp"]["up_proj"]["kernel"], formats.QuantizedArray)
  mask = trainable_mask(tree, where=where)
  part = distill.partition(tree, mask)
  dc = distill.DistillConfig(steps=1, chunk=16)
  loss_fn, ts = distill.make_loss_fn(cfg, part, p, dc)
  train, frozen = part.split(tree)
  g = jax.grad(lambda tr: loss_fn(tr, frozen, ts, jnp.asarray(windows[:2]))[0])(train)
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  names = [paths[i] for i in part.train_idx]
  # Exactly latent + scale of the three selected MLP projections; codes never in the list.
  assert len(names) == 6 and all("'layers'][0]['mlp'" in n for n in names), names
  assert sorted({n.rsplit(".", 1)[1] for n in names}) == ["latent", "scale"]
  assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in train)
  assert all(float(jnp.abs(x).max()) > 0 for x in g)
  for i in part.frozen_idx:
    if paths[i].endswith(".codes0"):
      assert not jnp.issubdtype(jax.tree_util.tree_leaves(tree)[i].dtype, jnp.floating)


def test_v_step_respects_tau_and_keeps_codes_valid(setup):
  _, _, q, _ = setup
  pc = pv.PVConfig(tau=0.05, lr_v=1e-2, delta_decay=1.0)
  leaf = pv.to_pv(q, SEL)["layers"][0]["mlp"]["down_proj"]["kernel"]
  rng = np.random.default_rng(0)
  moved = dataclasses.replace(leaf, latent=leaf.latent + jnp.asarray(
      rng.standard_normal(leaf.shape) * 0.2, jnp.float32))
  new, changed = pv.v_update(moved, pc.tau, pc.delta_decay)
  old_c, new_c = np.asarray(leaf.prev_codes()), np.asarray(new.prev_codes())
  n_changed = int((old_c != new_c).sum())
  assert n_changed == int(changed) <= pv.v_budget(leaf, pc.tau) == int(0.05 * old_c.size)
  assert n_changed > 0.5 * pv.v_budget(leaf, pc.tau)  # the perturbation asks for many changes
  assert new_c.min() >= 0 and new_c.max() < 4
  # Packed exactly as QuantizedArray.from_codes packs (padding codes included).
  packed = formats.QuantizedArray.from_codes(jnp.asarray(new_c, jnp.uint8), leaf.scale, None,
                                             bits=2, group_size=32, symmetric=True).packed
  np.testing.assert_array_equal(np.asarray(new.codes0), np.asarray(packed))
  # delta_decay=1: the buffer is reset to the new decoded weight.
  np.testing.assert_array_equal(np.asarray(new.latent), np.asarray(new.decode(new.prev_codes())))
  # VQ: the changed vectors obey the budget too, codes stay in range.
  cb = jnp.asarray(rng.integers(-60, 60, (2, 2, 16, 4)), jnp.int8)
  vq = formats.VQArray.from_codes(jnp.asarray(rng.integers(0, 16, (16, 64))), cb,
                                  jnp.full((2, 2), 0.01, jnp.float16), dim=4, group_size=32,
                                  out_block=32)
  sv = pv.to_pv({"w": vq})["w"]
  sv = dataclasses.replace(sv, latent=sv.latent + jnp.asarray(rng.standard_normal(sv.shape),
                                                                jnp.float32) * 0.3)
  nv, c = pv.v_update(sv, 0.1, 0.0)
  diff = int((np.asarray(nv.prev_codes()) != np.asarray(sv.prev_codes())).sum())
  assert 0 < diff == int(c) <= pv.v_budget(sv, 0.1) == int(0.1 * 16 * 64)
  assert int(np.asarray(nv.prev_codes()).max()) < 16


def test_ste_pv_lower_heldout_kd_and_pv_vs_kd(setup):
  cfg, p, q, windows = setup
  dc = distill.DistillConfig(steps=1, **DC)
  before = _heldout(cfg, p, q, windows[64:], dc)
  res = {}
  for mode in ("kd", "ste", "pv"):
    out, hist = _run(cfg, p, q, windows[:64], mode, 20)
    tuned = out if mode == "kd" else ste.export(out)
    if mode != "kd":  # the exported tree's forward is the trained tree's forward
      np.testing.assert_array_equal(_logits(cfg, tuned, windows[:2]),
                                    _logits(cfg, out, windows[:2]))
    res[mode] = _heldout(cfg, p, tuned, windows[64:], dc)
    if mode == "pv":
      assert all(h["v_frac_max"] <= 0.005 + 1e-9 for h in hist)
      assert sum(h["v_changed"] for h in hist) > 0
  print(f"held-out KD: before {before:.4f}, " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
  for mode in ("ste", "pv"):
    assert res[mode] < 0.9 * before, (mode, before, res)
  # PV against continuous-only KD at equal steps and tokens (2-bit RTN, 20 steps).
  assert res["pv"] < res["kd"], res


def test_pv_resume_after_kill_same_trajectory_and_compiles_once(setup, tmp_path):
  cfg, p, q, windows = setup
  big = pv.PVConfig(tau=0.02, lr_v=2e-2)  # large V-steps, so codes change within 6 steps
  kw = dict(dc=dict(micro_batch=2, accum=1, checkpoint_every=2), pc=big)
  _, full = _run(cfg, p, q, windows[:16], "pv", 6, **kw)
  ck = str(tmp_path / "ck")
  _, first = _run(cfg, p, q, windows[:16], "pv", 6, checkpoint_dir=ck, stop_after=4,
                  dc=dict(micro_batch=2, accum=1, checkpoint_every=2), pc=big)
  _, rest = _run(cfg, p, q, windows[:16], "pv", 6, checkpoint_dir=ck,
                 dc=dict(micro_batch=2, accum=1, checkpoint_every=2), pc=big)
  assert [h["step"] for h in first + rest] == list(range(1, 7))
  np.testing.assert_allclose([h["loss"] for h in first + rest], [h["loss"] for h in full],
                             rtol=1e-5)
  assert [h["v_changed"] for h in first + rest] == [h["v_changed"] for h in full]
  assert sum(h["v_changed"] for h in full) > 0
  # One compilation of the train step and of the V-step over several steps.
  dc = distill.DistillConfig(steps=3, micro_batch=1, accum=2, chunk=16)
  pc = pv.PVConfig(tau=0.005, lr_v=5e-3)
  tree = pv.to_pv(q, SEL)
  part = distill.partition(tree, trainable_mask(tree, where=SEL))
  loss_fn, ts = distill.make_loss_fn(cfg, part, p, dc)
  opt = pv.make_optimizer(tree, part, dc, pc)
  step = distill.make_train_step(loss_fn, opt)
  post = pv.make_v_step(pc)(part)
  train, frozen = part.split(tree)
  train = part.master(train)
  state = opt.init(train)
  for s in range(3):
    batch = jnp.asarray(windows[2 * s:2 * s + 2].reshape(2, 1, -1))
    train, state, _ = step(train, frozen, state, ts, batch)
    train, frozen, _ = post(train, frozen)
  assert step._cache_size() == 1 and post._cache_size() == 1  # pylint: disable=protected-access


def test_job_dispatches_modes_from_configs(setup):
  from compressjax.finetune import job  # pylint: disable=g-import-not-at-top
  from configs import finetune_kd, finetune_pv, finetune_ste  # pylint: disable=g-import-not-at-top
  _, _, q, _ = setup
  cfgs = {m: c.get_config() for m, c in (("kd", finetune_kd), ("ste", finetune_ste),
                                         ("pv", finetune_pv))}
  keys = ("steps", "micro_batch", "accum", "lr")
  assert len({tuple(c.finetune[k] for k in keys) for c in cfgs.values()}) == 1  # equal tokens
  for mode, c in cfgs.items():
    assert c.finetune.mode == mode
    dcfg = job.distill_config(c.finetune)
    mask = trainable_mask(q, where=c.finetune.train, train_dense=c.finetune.train_dense)
    tree, tmask, extra = job._mode_setup(mode, q, mask, c.finetune, dcfg)  # pylint: disable=protected-access
    leaf = tree["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert isinstance(leaf, formats.QuantizedArray if mode == "kd" else ste.STEWeight)
    assert sorted(extra) == ([] if mode != "pv" else ["opt", "post_step"])
  with pytest.raises(ValueError, match="finetune.mode"):
    job._mode_setup("qat", q, mask, cfgs["kd"].finetune, dcfg)  # pylint: disable=protected-access
