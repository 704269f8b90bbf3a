"""QuIP#'s 3- and 4-bit residual modes (E8P12RVQ3B / E8P12RVQ4B): the E81B table against a
direct enumeration of E8, exact RVQ rounding, BlockLDLQ against plain rounding on the layer
objective, the summed lattice format (bytes, decode, dot, checkpoints, incoherence)."""

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import checkpoint, formats, pipeline, transforms as T
from compressjax.calibration import LayerStats
from compressjax.formats import E81BArray, E8PArray, Incoherent, SumArray
from compressjax.quantize import e8p_core
from test_e8p import _out_err, _problem  # the same test problem and layer objective

# The papers' variable names (H, W, X) are kept on purpose.
# pylint: disable=invalid-name


def _in_e8(v):
  """E8 = D8 u (D8 + 1/2): all integers or all half-odd, with an even coordinate sum."""
  two = 2 * np.asarray(v, np.float64)
  if not np.allclose(two, np.round(two)):
    return False
  two = np.round(two).astype(np.int64)
  return bool((np.all(two % 2 == 0) or np.all(two % 2 == 1)) and np.sum(v) % 2 == 0)


def test_e81b_table_is_the_reference_enumeration():
  G = e8p_core.E81B_GRID.astype(np.float64)
  assert G.shape == (256, 8) and len(np.unique(G, axis=0)) == 256
  assert all(_in_e8(v) for v in G)
  # Direct enumeration of E8 points with |x|^2 <= 2 over a box that holds them all (|x_k| <= 1
  # for integers, 1/2 for half-odd), in lexicographic order (the order the reference's
  # cartesian_prod + filter gives over [-4, 3]^8 and [-7/2, 7/2]^8).
  ints = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 8, indexing="ij"), -1).reshape(-1, 8)
  halves = np.stack(np.meshgrid(*[np.arange(-1.5, 2.0)] * 8, indexing="ij"), -1).reshape(-1, 8)
  pts = np.concatenate([ints, halves]).astype(np.float64)
  keep = (np.sum(pts * pts, 1) <= 2) & (np.sum(pts, 1) % 2 == 0)
  ball = pts[keep]
  assert len(ball) == 241  # the origin and the 240 roots of E8
  np.testing.assert_array_equal(G[:241], ball)
  np.testing.assert_array_equal(G[56], np.zeros(8))  # the origin
  # Then +2 e_0 .. +2 e_7, -2 e_0 .. -2 e_6 (the reference leaves out -2 e_7).
  eye = 2 * np.eye(8)
  np.testing.assert_array_equal(G[241:], np.concatenate([eye, -eye[:7]]))


@pytest.mark.parametrize("sigma", [0.3, 1.5])
def test_e81b_nearest_is_exact(sigma):
  x = np.random.RandomState(1).randn(300, 8) * sigma
  codes, v = e8p_core.e81b_nearest(jnp.asarray(x, jnp.float32))
  G = e8p_core.E81B_GRID.astype(np.float64)
  d = ((x[:, None, :] - G[None]) ** 2).sum(-1)
  ours = ((x - np.asarray(v, np.float64)) ** 2).sum(-1)
  np.testing.assert_allclose(ours, d.min(1), atol=1e-5)
  assert codes.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(v), G[np.asarray(codes)])


@pytest.mark.parametrize("bits", [3, 4])
def test_rvq_nearest_decodes_and_beats_e8p(bits):
  so, rs = e8p_core.RVQ_DEFAULTS[bits]
  x = jnp.asarray(np.random.RandomState(bits).randn(4000, 8) * so, jnp.float32)  # W / Wscale
  c1, c2, v = e8p_core.rvq_nearest(x, bits=bits)
  _, v1 = e8p_core.nearest(x)
  second = e8p_core.e81b_decode(c2) if bits == 3 else e8p_core.decode(c2)
  assert c1.dtype == jnp.uint16 and c2.dtype == (jnp.uint8 if bits == 3 else jnp.uint16)
  # The values are what the codes decode to.
  np.testing.assert_allclose(np.asarray(v), np.asarray(e8p_core.decode(c1) + second / rs),
                             atol=1e-6)
  e_rvq = np.sum((np.asarray(x) - np.asarray(v)) ** 2, -1)
  e_e8p = np.sum((np.asarray(x) - np.asarray(v1)) ** 2, -1)
  print(f"{bits} bits: MSE per weight E8P {e_e8p.mean() / 8:.4f}, RVQ {e_rvq.mean() / 8:.4f}")
  if bits == 3:  # E81B holds the origin: never worse, vector by vector
    assert np.all(e_rvq <= e_e8p + 1e-5)
  assert e_rvq.mean() < (0.45 if bits == 3 else 0.15) * e_e8p.mean()


def test_blockldlq_rvq_beats_plain_rvq_rounding_and_2bit():
  W, H, _ = _problem()
  Wj, Hj = jnp.asarray(W, jnp.float32), jnp.asarray(H, jnp.float32)
  # The statics T.e8p(bits=3) passes (one compilation for this test and the transform's).
  codes, rcodes, scale, info = e8p_core.rvq_quantize(
      Wj, Hj, bits=3, percdamp=0.01, blocksize=128, scale_override=0.98, resid_scale=2.04,
      tune_iters=0)
  assert bool(info["cholesky_ok"])
  assert codes.shape == rcodes.shape == (16, 64) and rcodes.dtype == jnp.uint8
  s = float(scale)
  assert s == pytest.approx(float(np.sqrt(np.mean(W**2))) / 0.98, rel=1e-5)
  Q = np.asarray(formats.e8p_rvq(codes, rcodes, scale, 2.04, dtype=jnp.float32).materialize(),
                 np.float64)
  # Plain RVQ rounding of every 8-vector at the same scale (no error feedback).
  near = np.asarray(e8p_core.rvq_nearest(jnp.asarray(W.T.reshape(-1, 8) / s, jnp.float32))[2])
  Qn = near.reshape(W.shape[1], W.shape[0]).T * s
  c2, s2, _ = e8p_core.e8p_quantize(Wj, Hj, percdamp=0.01, blocksize=128, scale_override=0.9,
                                    tune_iters=0)
  Q2 = np.asarray(E8PArray(c2, s2, dtype=jnp.float32).materialize(), np.float64)
  e_ldlq, e_near, e_2bit = _out_err(W, Q, H), _out_err(W, Qn, H), _out_err(W, Q2, H)
  print(f"tr(dW^T H dW): RVQ3 BlockLDLQ {e_ldlq:.4g}, RVQ3 nearest {e_near:.4g}, "
        f"E8P 2-bit BlockLDLQ {e_2bit:.4g}")
  assert e_ldlq < 0.8 * e_near
  assert e_ldlq < 0.5 * e_2bit
  # The solver's loss is the same objective in scaled units (damped H, hence the tolerance).
  assert float(info["loss"]) * s**2 == pytest.approx(e_ldlq / 2, rel=0.1)


def _leaf(bits, k=128, n=64, dtype=jnp.float32, incoherent=False):
  W, H, X = _problem(k, n)
  stats = LayerStats.zeros(k).add(X)
  t = T.e8p(bits=bits, where=r"w")
  if incoherent:
    t = T.chain(T.incoherence(seed=0, where=r"w"), t)
  out, _ = T.apply(t, {"w": jnp.asarray(W, dtype)}, {"w": stats})
  return out["w"], W, H


def _check_dot(w, dense, k):
  for rows in (1, 3, 40):
    x = jax.random.normal(jax.random.key(rows), (rows, k))
    np.testing.assert_allclose(np.asarray(formats.dot(x, w)), np.asarray(x @ dense),
                               rtol=1e-4, atol=1e-5)
  x = jnp.ones((2, 5, k))
  f = jax.jit(formats.dot)
  np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(x @ dense), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
def test_format_bytes_materialize_dot_and_checkpoint(bits, tmp_path):
  w, W, _ = _leaf(bits)
  K, N = W.shape
  assert isinstance(w, SumArray) and w.shape == W.shape
  first, resid = w.terms
  assert isinstance(first, E8PArray)
  assert isinstance(resid, E81BArray if bits == 3 else E8PArray)
  rs = e8p_core.RVQ_DEFAULTS[bits][1]
  assert float(resid.scale) == pytest.approx(float(first.scale) / rs, rel=1e-6)
  # Honest bytes: codes (2 + 1 or 2 + 2 bits per weight) and two float32 scales.
  assert w.nbytes == K * N * bits // 8 + 8
  assert w.bits_per_param == pytest.approx(bits + 64 / W.size)
  assert E81BArray.trainable == ("scale",)
  dense = np.asarray(w.materialize())
  second = (e8p_core.e81b_decode(resid.codes) if bits == 3 else e8p_core.decode(resid.codes))
  direct = ((np.asarray(e8p_core.decode(first.codes)) + np.asarray(second) / rs)
            .transpose(0, 2, 1).reshape(K, N) * float(first.scale))
  np.testing.assert_allclose(dense, direct, rtol=1e-5, atol=1e-7)
  _check_dot(w, dense, K)
  path = checkpoint.save(str(tmp_path / "ck"), {"layer": {"kernel": w}})
  r = checkpoint.restore(path)[0]["layer"]["kernel"]
  assert isinstance(r, SumArray) and [type(t) for t in r.terms] == [type(t) for t in w.terms]
  for a, b in zip(r.terms, w.terms):
    assert a.codes.dtype == b.codes.dtype
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    assert float(a.scale) == float(b.scale)


def test_incoherent_rvq_leaf_multiplies_and_round_trips(tmp_path):
  w, W, H = _leaf(3, incoherent=True)
  assert isinstance(w, Incoherent) and isinstance(w.inner, SumArray)
  assert isinstance(w.inner.terms[1], E81BArray)
  dense = np.asarray(w.materialize())
  _check_dot(w, dense, W.shape[0])
  # Quantizing the rotated weight with the rotated Hessian: the output error (in the original
  # basis) is still far below 2-bit E8P's on the same problem.
  w2, _, _ = _leaf(2, incoherent=True)
  e3, e2 = _out_err(W, dense, H), _out_err(W, np.asarray(w2.materialize()), H)
  print(f"incoherent: tr(dW^T H dW) 3-bit {e3:.4g}, 2-bit {e2:.4g}")
  assert e3 < 0.5 * e2
  path = checkpoint.save(str(tmp_path / "ck"), {"k": w})
  r = checkpoint.restore(path)[0]["k"]
  np.testing.assert_array_equal(np.asarray(r.materialize()), dense)


def test_plan_configs_and_bad_arguments():
  abstract = {"a": {"kernel": jax.ShapeDtypeStruct((576, 1536), jnp.bfloat16)}}
  out = T.plan(T.e8p(bits=3, where=r".*kernel"), abstract)["a"]["kernel"]
  assert isinstance(out, SumArray) and out.shape == (576, 1536) and out.dtype == jnp.bfloat16
  assert out.terms[0].codes.shape == (72, 1536) and out.terms[1].codes.dtype == jnp.uint8
  assert out.nbytes == 576 * 1536 * 3 // 8 + 8
  for name, bits in (("quip_e8p_3bit", 3), ("quip_e8p_4bit", 4)):
    cfg = importlib.import_module(f"configs.{name}").get_config()
    steps = [dict(s) for s in cfg.compression.steps]
    assert steps[0]["method"] == "incoherence" and steps[1]["method"] == "e8p"
    assert steps[1]["bits"] == bits and "scale_override" not in steps[1]
    pipeline.build_transform(cfg.compression)
  with pytest.raises(ValueError, match="e8p.*bits"):
    T.e8p(bits=5)
  with pytest.raises(ValueError, match="e8p.*resid_scale"):
    T.e8p(bits=2, resid_scale=2.0)
  with pytest.raises(ValueError, match="e8p.*resid_scale"):
    T.e8p(bits=3, resid_scale=-1.0)
  with pytest.raises(ValueError, match="RVQ bits"):
    e8p_core.rvq_nearest(jnp.zeros((1, 8)), bits=2)
  with pytest.raises(ValueError, match="resid_codes must be uint8"):
    formats.e8p_rvq(jnp.zeros((1, 2), jnp.uint16), jnp.zeros((1, 2), jnp.int32), 1.0, 2.0,
                    dtype=jnp.float32)
