"""Straight-through (STE) and PV-tuning fine-tunes (compressjax.finetune.ste / pv), tiny model."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import formats, transforms as T
from compressjax.finetune import codes_core, distill, pv, ste, trainable_mask
from compressjax.io import build_model, model_params
from compressjax.quantize import e8p_core

SEL = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"
DC = dict(lr=5e-3, micro_batch=2, accum=2, chunk=16, warmup=2)
STEPS = 6
#: The STE run's selection: some leaves of every format, not all (v and o projections stay).
GRAD_SEL = [r"layers/0/mlp/(gate|up|down)_proj/kernel", r"layers/0/attn/(q|k)_proj/kernel"]
PC = pv.PVConfig(tau=0.01, lr_v=1e-2)  # V-steps large enough to change codes within 6 steps


def _aqlm_leaf(w, rng, m=2, b=4, g=8):
  """AQLM of ``w``: random codebooks, per-output RMS scales, codes by the L2 encoder."""
  k, n = w.shape
  s = jnp.sqrt(jnp.mean(w * w, axis=0)).astype(jnp.float16)
  cb = jnp.asarray(rng.standard_normal((m, 2**b, g)) * 0.6, jnp.float16)
  t = jnp.swapaxes((w / s.astype(jnp.float32)).reshape(k // g, g, n), 1, 2).reshape(-1, g)
  codes = codes_core.additive_encode(t, cb, jnp.zeros((t.shape[0], m), jnp.int32), sweeps=2)
  return formats.AdditiveCodebookArray.from_codes(codes.reshape(k // g, n, m), cb, s, nbits=b)


def _e8p_leaf(w):
  scale = e8p_core.e8p_scale(w)
  k, n = w.shape
  codes, _ = e8p_core.nearest(jnp.swapaxes((w / scale).reshape(k // 8, 8, n), 1, 2))
  return formats.E8PArray(codes, scale, dtype=jnp.float32)


@pytest.fixture(scope="module")
def setup():
  """The tiny model (one layer: the compile time of every run scales with the depth), its 2-bit
  RTN tree ``q`` and a mixed tree ``qc`` (AQLM 2x4 attention q/o projections, E8P gate
  projection, Incoherent(E8P) up projection; k/v/down 2-bit RTN), and Markov-chain token
  windows (40 training, 8 held-out, 16 tokens)."""
  model = tiny.tiny_model(seed=1, num_layers=1)
  p = model_params(model)
  q, _ = T.apply(T.rtn(2, 32), p)
  rng = np.random.default_rng(0)
  qc = jax.tree.map(lambda x: x, q, is_leaf=formats.is_compressed)
  l1 = p["layers"][0]
  for name in ("q_proj", "o_proj"):
    qc["layers"][0]["attn"][name]["kernel"] = _aqlm_leaf(l1["attn"][name]["kernel"], rng)
  qc["layers"][0]["mlp"]["gate_proj"]["kernel"] = _e8p_leaf(l1["mlp"]["gate_proj"]["kernel"])
  w = l1["mlp"]["up_proj"]["kernel"]
  su = jnp.asarray(rng.choice([-1.0, 1.0], w.shape[0]), jnp.float32)
  sv = jnp.asarray(rng.choice([-1.0, 1.0], w.shape[1]), jnp.float32)
  inc = formats.Incoherent.rotate(w, su, sv)
  qc["layers"][0]["mlp"]["up_proj"]["kernel"] = dataclasses.replace(inc, inner=_e8p_leaf(inc.inner))
  nxt = rng.integers(0, 300, (300, 3))
  windows = np.zeros((48, 16), np.int32)
  windows[:, 0] = rng.integers(0, 300, 48)
  for t in range(1, 16):
    windows[:, t] = nxt[windows[:, t - 1], rng.integers(0, 3, 48)]
  return model.cfg, p, q, qc, windows


def _logits_fn(cfg):
  return jax.jit(lambda params, tokens: build_model(cfg, params)(tokens))


def _run(cfg, p, q, windows, mode, steps, **kw):
  dc = distill.DistillConfig(steps=steps, **{**DC, **kw.pop("dc", {})})
  if mode == "kd":
    return distill.finetune(cfg, p, q, trainable_mask(q, where=SEL), windows, dc,
                            progress=False, **kw)
  pc = kw.pop("pc", PC)
  where = kw.pop("where", SEL)
  tree = ste.to_ste(q, where) if mode == "ste" else pv.to_pv(q, where)
  mask = trainable_mask(tree, where=where)
  extra = {}
  if mode == "pv":
    part = distill.partition(tree, mask)
    extra = dict(opt=pv.make_optimizer(tree, part, dc, pc), post_step=pv.make_v_step(pc))
  out, hist = distill.finetune(cfg, p, tree, mask, windows, dc, progress=False, **extra, **kw)
  return out, hist


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
  """One STE and one PV run of ``STEPS`` steps on the mixed tree (the PV one checkpointing
  at steps 4 and 6), and the PV run resumed after a kill at step 4; the jitted train steps and
  V-steps they compiled."""
  cfg, p, _, qc, windows = setup
  compiled = {"step": [], "post": []}
  orig_step, orig_v = distill.make_train_step, pv.make_v_step

  def rec_step(*a, **k):
    f = orig_step(*a, **k)
    compiled["step"].append(f)
    return f

  def rec_v(pc):
    factory = orig_v(pc)

    def wrapped(part):
      f = factory(part)
      compiled["post"].append(f)
      return f

    return wrapped

  distill.make_train_step, pv.make_v_step = rec_step, rec_v
  try:
    ck = tmp_path_factory.mktemp("pv") / "ck"
    train = windows[:40]
    out = {"ste": _run(cfg, p, qc, train, "ste", STEPS, where=GRAD_SEL)}
    out["pv"] = _run(cfg, p, qc, train, "pv", STEPS, checkpoint_dir=str(ck),
                     dc=dict(checkpoint_every=4))
    # A kill right after step 4's checkpoint: step 6's never happened; resume from step 4.
    shutil.rmtree(ck / str(STEPS))
    out["resumed"] = _run(cfg, p, qc, train, "pv", STEPS, checkpoint_dir=str(ck),
                          dc=dict(checkpoint_every=4))
  finally:
    distill.make_train_step, pv.make_v_step = orig_step, orig_v
  return out, compiled


def test_ste_forward_is_the_compressed_models_exactly(setup, runs):
  cfg, _, q, qc, windows = setup
  logits = _logits_fn(cfg)
  # The mixed tree (scalar, AQLM, E8P, Incoherent(E8P) leaves); the few-row (LUT) matmul
  # paths are checked leaf by leaf in tests/test_ste_pv_codebooks.py.
  s = ste.to_ste(qc)
  np.testing.assert_array_equal(logits(s, windows[:2]), logits(qc, windows[:2]))
  e = ste.export(s)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), qc, e))
  up = s["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(up, formats.Incoherent) and up.inner.kind == "e8p"
  # After training: the exported tree's forward is the trained tree's forward.
  (out_ste, _), (out_pv, _) = runs[0]["ste"], runs[0]["pv"]
  for out in (out_ste, out_pv):
    np.testing.assert_array_equal(logits(ste.export(out), windows[:2]),
                                  logits(out, windows[:2]))
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


def test_gradients_reach_only_selected_continuous_leaves(setup, runs):
  """Structure: the trainable list holds exactly the selected continuous children. Flow: the
  STE run (``GRAD_SEL``) changed every one of them and nothing else (codes, signs and
  unselected leaves bit for bit as they were)."""
  _, _, _, qc, _ = setup
  tree = ste.to_ste(qc, GRAD_SEL)
  assert isinstance(tree["layers"][0]["attn"]["v_proj"]["kernel"], formats.QuantizedArray)
  assert isinstance(tree["layers"][0]["attn"]["o_proj"]["kernel"],
                    formats.AdditiveCodebookArray)
  part = distill.partition(tree, trainable_mask(tree, where=GRAD_SEL))
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  names = sorted(paths[i] for i in part.train_idx)
  # latent + scale of the 2-bit RTN k and down projections and of the E8P gate projection;
  # latent + scales + codebooks of the AQLM q projection; latent + scale of the E8P inside the
  # Incoherent up projection (in its rotated space). Never codes, signs or unselected leaves.
  k = "['layers'][0]"
  want = sorted([f"{k}['{b}']['{n}_proj']['kernel'].{c}"
                 for b, n in (("attn", "k"), ("mlp", "down"), ("mlp", "gate"))
                 for c in ("latent", "scale")] +
                [f"{k}['attn']['q_proj']['kernel'].{c}" for c in ("latent", "scale", "codebook")] +
                [f"{k}['mlp']['up_proj']['kernel'].inner.{c}" for c in ("latent", "scale")])
  assert names == want, names
  out = runs[0]["ste"][0]
  before, after = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(out)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
  for i, (a, b) in enumerate(zip(before, after)):
    same = bool(jnp.array_equal(a, b))
    assert same != (i in part.train_idx), (paths[i], same)
    if i in part.frozen_idx and paths[i].endswith((".codes0", "_bits")):
      assert not jnp.issubdtype(a.dtype, jnp.floating)


def test_v_step_respects_tau_and_keeps_codes_valid(setup, runs):
  _, _, q, qc, _ = setup
  pc = pv.PVConfig(tau=0.05, lr_v=1e-2, delta_decay=1.0)
  leaf = pv.to_pv(q, SEL)["layers"][0]["mlp"]["down_proj"]["kernel"]  # 2-bit RTN
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
  # In the PV run over the mixed tree: every V-step within tau in every weight (AQLM: groups),
  # codes changed overall in every format, all codes valid.
  out, hist = runs[0]["pv"]
  assert all(h["v_frac_max"] <= PC.tau + 1e-9 for h in hist)
  assert sum(h["v_changed"] for h in hist) > 0
  init = pv.to_pv(qc, SEL)
  for path in (("attn", "q_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")):
    a, b = (t["layers"][0][path[0]][path[1]]["kernel"] for t in (init, out))
    a, b = (getattr(x, "inner", x) for x in (a, b))
    ca, cb_ = np.asarray(a.prev_codes()), np.asarray(b.prev_codes())
    units = (ca != cb_).any(-1) if ca.ndim == 3 else ca != cb_
    assert 0 < units.sum() <= STEPS * pv.v_budget(a, PC.tau), path
    hi = {"scalar": 4, "aqlm": 16, "e8p": 2**16}[a.kind]
    assert cb_.min() >= 0 and cb_.max() < hi, path


def test_ste_pv_lower_heldout_kd(setup, runs):
  cfg, p, _, qc, windows = setup
  part = distill.partition(qc, trainable_mask(qc, where=SEL))
  loss_fn, ts = distill.make_loss_fn(cfg, part, p, distill.DistillConfig(steps=1, chunk=16))
  f = jax.jit(lambda tr, fr, tok: loss_fn(tr, fr, ts, tok)[1][0])
  held = jnp.asarray(windows[40:])
  kd = lambda tree: float(f(*part.split(tree), held))
  before = kd(qc)
  res = {m: kd(ste.export(runs[0][m][0])) for m in ("ste", "pv")}
  print(f"held-out KD: before {before:.4f}, " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
  for mode, v in res.items():
    assert v < 0.95 * before, (mode, before, res)


def test_pv_resume_after_kill_same_trajectory_and_compiles_once(runs):
  out, compiled = runs
  full, rest = out["pv"][1], out["resumed"][1]
  assert [h["step"] for h in rest] == [5, 6]
  np.testing.assert_allclose([h["loss"] for h in rest], [h["loss"] for h in full[4:]],
                             rtol=1e-5)
  assert [h["v_changed"] for h in rest] == [h["v_changed"] for h in full[4:]]
  assert sum(h["v_changed"] for h in full) > 0
  same = lambda a, b: bool(jnp.array_equal(a, b))
  assert jax.tree.all(jax.tree.map(same, ste.export(out["resumed"][0]), ste.export(out["pv"][0])))
  # One compilation of the train step and of the V-step over all the steps of each run.
  assert len(compiled["step"]) == 3 and len(compiled["post"]) == 2
  assert all(f._cache_size() == 1 for f in compiled["step"] + compiled["post"])  # pylint: disable=protected-access


@pytest.mark.slow
def test_pv_vs_kd_vs_ste_at_equal_steps(setup):  # pylint: disable=unused-argument
  """PV against continuous-only KD and STE on 2-bit RTN at equal steps and tokens (20 steps,
  32-token windows; measured by the previous version of this test: held-out KD PV 0.426,
  KD 0.433, STE 0.426)."""
  del setup
  model = tiny.tiny_model(seed=1)  # two layers, as when the numbers above were measured
  cfg, p = model.cfg, model_params(model)
  q, _ = T.apply(T.rtn(2, 32), p)
  rng = np.random.default_rng(0)
  nxt = rng.integers(0, 300, (300, 3))
  windows = np.zeros((80, 32), np.int32)
  windows[:, 0] = rng.integers(0, 300, 80)
  for t in range(1, 32):
    windows[:, t] = nxt[windows[:, t - 1], rng.integers(0, 3, 80)]
  part = distill.partition(q, trainable_mask(q, where=SEL))
  loss_fn, ts = distill.make_loss_fn(cfg, part, p, distill.DistillConfig(steps=1, chunk=16))
  f = jax.jit(lambda tr, fr, tok: loss_fn(tr, fr, ts, tok)[1][0])
  kd = lambda tree: float(f(*part.split(tree), jnp.asarray(windows[64:])))
  before = kd(q)
  res = {}
  for mode in ("kd", "ste", "pv"):
    out, _ = _run(cfg, p, q, windows[:64], mode, 20, dc=dict(micro_batch=4),
                  pc=pv.PVConfig(tau=0.005, lr_v=5e-3))
    res[mode] = kd(out if mode == "kd" else ste.export(out))
  print(f"held-out KD: before {before:.4f}, " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
  for mode in ("ste", "pv"):
    assert res[mode] < 0.9 * before, (mode, before, res)
  assert res["pv"] < res["kd"], res


def test_job_dispatches_modes_from_configs(setup):
  from compressjax.finetune import job  # pylint: disable=g-import-not-at-top
  from configs import finetune_kd, finetune_pv, finetune_ste  # pylint: disable=g-import-not-at-top
  _, _, q, _, _ = setup
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
