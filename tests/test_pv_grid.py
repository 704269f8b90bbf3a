"""PV-tuning's V step in grid units (``PVConfig(v_units="grid")``): the grid step of scalar and
VQ leaves, and the V update scaled by it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
from compressjax.finetune import distill, pv, trainable_mask
from compressjax.quantize import quantize_rtn


def _vq(rng, k=32, n=24, dim=4, group_size=16, out_block=12, bits=4):
  cb = rng.integers(-127, 128, (k // group_size, n // out_block, 2**bits, dim))
  codes = rng.integers(0, 2**bits, (k // dim, n))
  scale = rng.uniform(0.01, 0.02, (k // group_size, n // out_block)).astype(np.float32)
  return formats.VQArray.from_codes(jnp.asarray(codes), jnp.asarray(cb, jnp.int8),
                                    jnp.asarray(scale), dim=dim, group_size=group_size,
                                    out_block=out_block)


def _expand(step, reps):
  return np.repeat(np.repeat(np.asarray(step), reps[0], 0), reps[1], 1)


def test_grid_step_of_scalar_and_vq_leaves():
  rng = np.random.default_rng(0)
  q = quantize_rtn(jnp.asarray(rng.standard_normal((64, 48)), jnp.float32), bits=3,
                   group_size=16)
  tree = pv.to_pv({"a": q, "b": _vq(rng)})
  step, reps = pv.grid_step(tree["a"])
  full = _expand(step, reps)
  assert full.shape == (64, 48)
  # Adjacent levels of the scalar grid are one step apart.
  codes = np.asarray(tree["a"].prev_codes())
  up = np.minimum(codes + 1, 2**3 - 1)
  moved = np.asarray(tree["a"].decode(jnp.asarray(up))) - np.asarray(
      tree["a"].decode(jnp.asarray(codes)))
  np.testing.assert_allclose(np.abs(moved)[up != codes], full[up != codes], rtol=1e-3)
  # VQ: |scale| * median nearest-neighbour distance / sqrt(dim), per codebook.
  leaf = tree["b"]
  step, reps = pv.grid_step(leaf)
  cb = np.asarray(leaf.codebook, np.float64)
  want = np.zeros(cb.shape[:2])
  for i in range(cb.shape[0]):
    for j in range(cb.shape[1]):
      d = np.sqrt(((cb[i, j][:, None] - cb[i, j][None]) ** 2).sum(-1))
      np.fill_diagonal(d, np.inf)
      want[i, j] = np.median(d.min(1)) / 2 * abs(float(leaf.scale[i, j]))
  np.testing.assert_allclose(np.asarray(step), want, rtol=1e-5)
  assert _expand(step, reps).shape == (32, 24)


def test_grid_units_scale_each_v_update_by_its_grid_step():
  rng = np.random.default_rng(1)
  q = quantize_rtn(jnp.asarray(rng.standard_normal((64, 48)), jnp.float32), bits=2,
                   group_size=16)
  tree = pv.to_pv({"a": q, "b": _vq(rng)})
  part = distill.partition(tree, trainable_mask(tree))
  dcfg = distill.DistillConfig(lr=1e-3)
  train, _ = part.split(tree)
  grads = [jnp.asarray(rng.standard_normal(np.shape(x)), jnp.float32) for x in train]
  ups = {}
  for units in ("weight", "grid"):
    opt = pv.make_optimizer(tree, part, dcfg, pv.PVConfig(lr_v=0.5, v_units=units))
    ups[units], _ = opt.update(grads, opt.init(train), train)
  flags = pv._latent_flags(tree)  # pylint: disable=protected-access
  latents = [j for j, i in enumerate(part.train_idx) if flags[i]]
  assert len(latents) == 2
  for j, leaf in zip(latents, (tree["a"], tree["b"])):
    full = _expand(*pv.grid_step(leaf))
    np.testing.assert_allclose(np.asarray(ups["grid"][j]), np.asarray(ups["weight"][j]) * full,
                               rtol=1e-5, atol=1e-9)
  for j in set(range(len(train))) - set(latents):  # the P-steps do not change
    np.testing.assert_array_equal(np.asarray(ups["grid"][j]), np.asarray(ups["weight"][j]))


def test_grid_units_refuse_other_formats_naming_the_leaf():
  rng = np.random.default_rng(2)
  e8p = formats.E8PArray(jnp.asarray(rng.integers(0, 2**16, (8, 16)), jnp.uint16),
                         jnp.asarray(0.3, jnp.float32), dtype=jnp.float32)
  tree = pv.to_pv({"layer": {"w": e8p}})
  part = distill.partition(tree, trainable_mask(tree))
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\] is 'e8p'"):
    pv.make_optimizer(tree, part, distill.DistillConfig(), pv.PVConfig(v_units="grid"))
  with pytest.raises(ValueError, match="v_units"):
    pv.PVConfig(v_units="grids")
