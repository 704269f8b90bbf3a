"""STE / PV-tuning of codebook leaves (AQLM, E8P, Incoherent(E8P)): leaf-level properties.

The model-level properties (fine-tune runs over a tree holding these formats) are in
tests/test_ste_pv.py, which shares one tiny model and one set of compiled runs.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
from compressjax.finetune import codes_core, pv, ste
from compressjax.quantize import e8p_core


def _aqlm(rng, k=64, n=48, m=2, b=4, g=8):
  cb = jnp.asarray(rng.standard_normal((m, 2**b, g)), jnp.float16)
  codes = jnp.asarray(rng.integers(0, 2**b, (k // g, n, m)))
  s = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float16)
  return formats.AdditiveCodebookArray.from_codes(codes, cb, s, nbits=b)


def _e8p(rng, k=64, n=48):
  codes = rng.integers(0, 2**16, (k // 8, n))
  codes[0, :4] = (254 << 8) | np.arange(4)  # the table's duplicated entry (254 == 248)
  return formats.E8PArray(jnp.asarray(codes, jnp.uint16), jnp.asarray(0.3, jnp.float32),
                          dtype=jnp.float32)


def _incoherent(rng, inner):
  k, n = inner.shape
  su = jnp.asarray(rng.choice([-1.0, 1.0], k))
  sv = jnp.asarray(rng.choice([-1.0, 1.0], n))
  return formats.Incoherent(inner, formats.incoherent.pack_signs(su),
                            formats.incoherent.pack_signs(sv))


def test_additive_encode_is_exact_search_and_keeps_prev():
  rng = np.random.default_rng(0)
  c = jnp.asarray(rng.standard_normal((2, 8, 4)), jnp.float32)
  c = c.at[1, 5].set(c[1, 2])  # a duplicated codeword
  t = jnp.asarray(rng.standard_normal((200, 4)), jnp.float32)
  prev = jnp.asarray(rng.integers(0, 8, (200, 2)))
  combos = np.asarray(list(itertools.product(range(8), repeat=2)))
  vals = np.asarray(c[0][combos[:, 0]] + c[1][combos[:, 1]])  # (64, 4)
  best = np.min(((np.asarray(t)[:, None, :] - vals[None]) ** 2).sum(-1), axis=1)
  dist = lambda b: np.asarray(jnp.sum(jnp.square(t - c[0][b[:, 0]] - c[1][b[:, 1]]), -1))
  d_prev = dist(prev)
  # beam >= 2**B with M = 2 is exhaustive: the exact optimum.
  np.testing.assert_allclose(dist(codes_core.additive_encode(t, c, prev, beam_size=8)), best,
                             rtol=1e-5, atol=1e-6)
  d1 = dist(codes_core.additive_encode(t, c, prev))
  assert np.all(d1 <= d_prev + 1e-6) and np.all(d1 >= best - 1e-5)
  assert d1.mean() < 0.7 * d_prev.mean()
  # The decoded vector of any codes re-encodes to those codes (duplicates included).
  dec = c[0][prev[:, 0]] + c[1][prev[:, 1]]
  for beam in (1, 3):
    np.testing.assert_array_equal(codes_core.additive_encode(dec, c, prev, beam_size=beam), prev)


@pytest.mark.parametrize("kind", ["aqlm2x4", "aqlm1x8", "e8p", "incoherent_e8p"])
def test_ste_leaf_forward_exact_and_p_gradients(kind):
  rng = np.random.default_rng(1)
  if kind.startswith("aqlm"):
    leaf = _aqlm(rng, m=2, b=4) if kind == "aqlm2x4" else _aqlm(rng, m=1, b=8)
  else:
    leaf = _e8p(rng)
    if kind == "incoherent_e8p":
      leaf = _incoherent(rng, leaf)
  s = ste.to_ste({"w": leaf})["w"]
  inner = s.inner if kind == "incoherent_e8p" else s
  assert isinstance(inner, ste.STEWeight) and inner.kind == kind[:4].replace("inco", "e8p")
  for rows in (1, 16):  # the LUT (few rows) and decode paths of the AQLM matmul
    x = jnp.asarray(rng.standard_normal((rows, 64)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(formats.dot(x, s)), np.asarray(formats.dot(x, leaf)))
  np.testing.assert_array_equal(np.asarray(s.materialize()), np.asarray(leaf.materialize()))
  # Exported at init: the stored leaf, bit for bit.
  e = ste.export({"w": s})["w"]
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), e, leaf))
  # Continuous children: the P-gradient (codes fixed) equals autodiff through the format.
  y = jnp.asarray(rng.standard_normal((16, 48)), jnp.float32)
  loss = lambda w: jnp.sum(formats.dot(x, w) * y)
  g_ste = jax.grad(loss, allow_int=True)(s)
  gi = g_ste.inner if kind == "incoherent_e8p" else g_ste
  names = ("scales", "codebooks") if kind.startswith("aqlm") else ("scale",)
  base = leaf.inner if kind == "incoherent_e8p" else leaf

  def loss_children(*children):
    w = dataclasses.replace(base, **dict(zip(names, children)))
    return loss(dataclasses.replace(leaf, inner=w) if kind == "incoherent_e8p" else w)

  g_fmt = jax.grad(loss_children, argnums=tuple(range(len(names))))(
      *(getattr(base, n) for n in names))
  mine = (gi.scale, gi.codebook) if kind.startswith("aqlm") else (gi.scale,)
  for a, b in zip(mine, g_fmt):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(b).max())
  # Latent: the straight-through dL/dW_hat (in the rotated space for Incoherent).
  xr = s.rotate_inputs(x) if kind == "incoherent_e8p" else x
  yr = (formats.incoherent.hadamard_core.matmul_hadU(y * s.signs()[1])
        if kind == "incoherent_e8p" else y)
  np.testing.assert_allclose(np.asarray(gi.latent), np.asarray(xr.T @ yr), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["aqlm2x4", "aqlm1x8", "e8p", "incoherent_e8p"])
def test_v_step_budget_and_valid_codes(kind):
  rng = np.random.default_rng(2)
  if kind.startswith("aqlm"):
    leaf = _aqlm(rng, m=2, b=4) if kind == "aqlm2x4" else _aqlm(rng, m=1, b=8)
  else:
    leaf = _e8p(rng)
    if kind == "incoherent_e8p":
      leaf = _incoherent(rng, leaf)
  tree = pv.to_pv({"w": leaf}, beam_size=2 if kind == "aqlm2x4" else 1)["w"]
  p = tree.inner if kind == "incoherent_e8p" else tree
  moved = dataclasses.replace(p, latent=p.latent + jnp.asarray(
      rng.standard_normal(p.shape) * 0.5, jnp.float32))
  tau = 0.05
  new, changed = pv.v_update(moved, tau, 0.0)
  old_c, new_c = np.asarray(p.prev_codes()), np.asarray(new.prev_codes())
  diff = old_c != new_c
  units = diff.any(-1) if diff.ndim == 3 else diff  # AQLM: a unit is a group's M codes
  budget = pv.v_budget(p, tau)
  assert budget == int(tau * units.size)
  assert int(units.sum()) == int(changed) <= budget
  assert int(changed) > 0.5 * budget  # the perturbation asks for many changes
  # Every changed unit lowers ||latent - W||^2 over its rows.
  err = lambda c: np.asarray(jnp.square(moved.latent - p.decode(jnp.asarray(c))))
  per_unit = lambda e: e.reshape(units.shape[0], -1, units.shape[1]).sum(1)
  assert np.all(per_unit(err(new_c))[units] < per_unit(err(old_c))[units])
  # Valid codes in the format's own container.
  back = ste.export({"w": new})["w"]
  if kind.startswith("aqlm"):
    assert isinstance(back, formats.AdditiveCodebookArray)
    assert new_c.min() >= 0 and new_c.max() < 2**back.nbits
    np.testing.assert_array_equal(np.asarray(back.code_values()), new_c)
  else:
    assert isinstance(back, formats.E8PArray) and back.codes.dtype == jnp.uint16
    assert new_c.min() >= 0 and new_c.max() < 2**16
    cw = e8p_core.decode(jnp.asarray(new_c))
    np.testing.assert_array_equal(np.asarray(e8p_core.nearest(cw)[1]), np.asarray(cw))
  np.testing.assert_array_equal(np.asarray(back.materialize()),
                                np.asarray(new.decode(new.prev_codes())))


def test_refusals_name_the_leaf():
  rng = np.random.default_rng(3)
  with pytest.raises(ValueError, match="beam_size"):
    ste.to_ste({"w": _aqlm(rng)}, beam_size=0)
  lr = formats.LowRank(jnp.ones((64, 2), jnp.float32), jnp.ones((2, 48), jnp.float32),
                      dtype=jnp.float32)
  with pytest.raises(NotImplementedError, match="layer/w is a LowRank"):
    ste.to_ste({"layer": {"w": lr}})
  with pytest.raises(NotImplementedError, match=r"w \(Incoherent inner\) is a LowRank"):
    ste.to_ste({"w": _incoherent(rng, lr)})
