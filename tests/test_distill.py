"""End-to-end KD fine-tuning (compressjax.finetune.distill) on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import formats, transforms as T
from compressjax.finetune import distill
from compressjax.io import model_params


def _scales_mask(params):
  """True on the float scale/zero children of compressed leaves only."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [("kernel" in jax.tree_util.keystr(k) and jnp.issubdtype(v.dtype, jnp.floating))
          for k, v in flat]


@pytest.fixture(scope="module")
def setup():
  model = tiny.tiny_model(seed=1)
  p = model_params(model)
  q, _ = T.apply(T.rtn(2, 32), p)
  # Text-like windows: a sparse random bigram chain (held-out windows share its statistics).
  rng = np.random.default_rng(0)
  nxt = rng.integers(0, 300, (300, 3))
  windows = np.zeros((80, 32), np.int32)
  windows[:, 0] = rng.integers(0, 300, 80)
  for t in range(1, 32):
    windows[:, t] = nxt[windows[:, t - 1], rng.integers(0, 3, 80)]
  return model.cfg, p, q, windows


def test_partition_refuses_discrete_leaves_and_bad_masks(setup):
  _, _, q, _ = setup
  flat = jax.tree_util.tree_leaves(q)
  with pytest.raises(ValueError, match="only floating-point"):
    distill.partition(q, [True] * len(flat))
  with pytest.raises(ValueError, match="leaves"):
    distill.partition(q, [True])
  with pytest.raises(ValueError, match="no parameter"):
    distill.partition(q, [False] * len(flat))
  with pytest.raises(ValueError, match="micro_batch"):
    distill.DistillConfig(micro_batch=0)


def test_kd_lowers_heldout_loss_changes_only_scales_and_compiles_once(setup):
  cfg, p, q, windows = setup
  mask = _scales_mask(q)
  dc = distill.DistillConfig(steps=30, lr=5e-3, micro_batch=4, accum=2, chunk=16, warmup=2)
  part = distill.partition(q, mask)
  loss_fn, ts = distill.make_loss_fn(cfg, part, p, dc)
  train, frozen = part.split(q)
  before = distill.heldout_loss(loss_fn, ts, train, frozen, windows[64:], micro_batch=4)
  out, hist = distill.finetune(cfg, p, q, mask, windows[:64], dc, progress=False)
  tr2, fr2 = part.split(out)
  after = distill.heldout_loss(loss_fn, ts, tr2, fr2, windows[64:], micro_batch=4)
  assert after["kd"] < 0.9 * before["kd"], (before, after)
  # Codes (and everything outside the mask) are bit-identical; scales moved and kept their dtype.
  for a, b in zip(frozen, fr2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(train, tr2))
  assert [x.dtype for x in tr2] == [x.dtype for x in train]
  leaf = out["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(leaf, formats.QuantizedArray) and leaf.bits == 2
  assert len(hist) == 30 and all(np.isfinite(h["loss"]) for h in hist)


def test_step_compiles_once(setup):
  cfg, p, q, windows = setup
  dc = distill.DistillConfig(steps=3, lr=1e-3, micro_batch=1, accum=2, chunk=16)
  part = distill.partition(q, _scales_mask(q))
  loss_fn, ts = distill.make_loss_fn(cfg, part, p, dc)
  opt = dc.optimizer()
  step = distill.make_train_step(loss_fn, opt)
  train, frozen = part.split(q)
  train = part.master(train)
  state = opt.init(train)
  for s in range(3):
    batch = jnp.asarray(windows[2 * s:2 * s + 2].reshape(2, 1, -1))
    train, state, _ = step(train, frozen, state, ts, batch)
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_resume_after_kill_follows_the_same_trajectory(setup, tmp_path):
  cfg, p, q, windows = setup
  mask = _scales_mask(q)
  dc = distill.DistillConfig(steps=6, lr=5e-3, micro_batch=2, accum=1, chunk=16,
                             checkpoint_every=2)
  _, full = distill.finetune(cfg, p, q, mask, windows[:16], dc, progress=False)
  ck = str(tmp_path / "ck")
  _, first = distill.finetune(cfg, p, q, mask, windows[:16], dc, progress=False,
                              checkpoint_dir=ck, stop_after=4)
  _, rest = distill.finetune(cfg, p, q, mask, windows[:16], dc, progress=False,
                             checkpoint_dir=ck)
  assert [h["step"] for h in first + rest] == list(range(1, 7))
  np.testing.assert_allclose([h["loss"] for h in first + rest], [h["loss"] for h in full],
                             rtol=1e-5)
