"""QuIP#'s E8P codebook and BlockLDLQ: lattice membership, exact rounding against brute force,
output error against nearest rounding and GPTQ w2g64, the format, checkpoints and planning."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import checkpoint, formats, pipeline, transforms as T
from compressjax.calibration import LayerStats
from compressjax.formats import E8PArray
from compressjax.quantize import e8p_core, gptq_core

# The papers' variable names (H, W, X) are kept on purpose.
# pylint: disable=invalid-name


@pytest.fixture(scope="module")
def codewords():
  return np.asarray(e8p_core.all_codewords(), np.float64)


def _in_e8(v):
  """Membership in E8 = D8 u (D8 + 1/2): all integers or all half-odd, with an even sum."""
  two = 2 * v
  if not np.allclose(two, np.round(two)):
    return False
  two = np.round(two).astype(np.int64)
  same = np.all(two % 2 == 0) or np.all(two % 2 == 1)
  return bool(same and (np.sum(v) % 2 == 0))


def test_table_is_the_definition():
  S = e8p_core.ABS_GRID.astype(np.float64)
  # Direct enumeration: abs values of D8 + 1/2 points (half-odd coordinates, even sum) with
  # |x|^2 <= 10; coordinates beyond 5/2 cannot occur (3.5^2 > 10).
  pts = set()
  for v in itertools.product(np.arange(-2.5, 3.0, 1.0), repeat=8):
    v = np.asarray(v)
    if v @ v <= 10 and np.sum(v) % 2 == 0:
      pts.add(tuple(np.abs(v)))
  assert len(pts) == 227
  assert sorted(pts) == [tuple(r) for r in S[:227]]  # lexicographic, as torch.unique
  n12 = S[227:]
  assert n12.shape == (29, 8)
  assert np.all(np.sum(n12 * n12, 1) == 12)
  assert np.all(np.sum(n12 == 1.5, 1) == 5) and np.all(np.sum(n12 == 0.5, 1) == 3)


def test_decoded_codewords_are_the_shifted_lattice_points(codewords):
  C = codewords
  S = e8p_core.ABS_GRID.astype(np.float64)
  codes = np.arange(2**16)
  shift = np.where(codes & 1, 0.25, -0.25)
  base = C - shift[:, None]
  for v in base[::97]:
    assert _in_e8(v)
  # Every base point is a signed table entry with an even sum (D8 + 1/2), vectorised:
  assert np.allclose(np.abs(base), S[codes >> 8])
  assert np.all(np.round(np.sum(base, 1)) % 2 == 0)
  assert np.all(np.abs(2 * base) % 2 == 1)
  # Distinct, except the one vector the reference's table lists twice (entries 248, 254).
  assert np.array_equal(S[248], S[254])
  keep = (codes >> 8) != 254
  assert len(np.unique(C[keep], axis=0)) == keep.sum() == 2**16 - 256
  assert len(np.unique(C, axis=0)) == 2**16 - 256


def test_decode_bit_layout():
  S = e8p_core.ABS_GRID
  a, signs, plus = 5, 0b1010011, 1  # coordinates 1, 3, 6, 7 negative (bit 8 - k)
  code = (a << 8) | (signs << 1) | plus
  v = np.asarray(e8p_core.decode(jnp.asarray(code, jnp.uint16)))
  neg = [k for k in range(1, 8) if (code >> (8 - k)) & 1]
  assert neg == [1, 3, 6, 7]
  parity = int(S[a].sum()) % 2
  neg0 = (len(neg) % 2) != parity
  expect = S[a] * np.asarray([-1.0 if (k == 0 and neg0) or k in neg else 1.0 for k in range(8)])
  np.testing.assert_allclose(v, expect + 0.25)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_nearest_equals_brute_force(codewords, sigma):
  x = np.random.RandomState(int(sigma * 10)).randn(200, 8) * sigma
  codes, q = e8p_core.nearest(jnp.asarray(x, jnp.float32))
  d = (x * x).sum(1)[:, None] - 2 * x @ codewords.T + (codewords**2).sum(1)[None]  # (200, 2**16)
  best = d.min(1)
  ours = ((x - np.asarray(q, np.float64)) ** 2).sum(-1)
  np.testing.assert_allclose(ours, best, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(q), codewords[np.asarray(codes)])  # codes decode to q
  assert np.mean(np.asarray(codes) == d.argmin(1)) > 0.99  # same codeword but for ties


def _problem(k=128, n=64, seed=0, tokens=512):
  """Gaussian (incoherent-like) weight and a correlated Hessian ``2 X^T X / n``."""
  kx, kw, kc = jax.random.split(jax.random.key(seed), 3)
  mix = jnp.eye(k) + 0.6 * jax.random.normal(kc, (k, k)) / k**0.5
  X = jax.random.normal(kx, (tokens, k)) @ mix
  W = 0.02 * jax.random.normal(kw, (k, n))
  H = 2 * X.T @ X / tokens
  return np.asarray(W, np.float64), np.asarray(H, np.float64), X


def _out_err(W, Q, H):
  D = W - Q
  return float(np.trace(D.T @ H @ D))


def test_blockldlq_beats_nearest_and_gptq_w2g64():
  W, H, _ = _problem()
  Wj, Hj = jnp.asarray(W, jnp.float32), jnp.asarray(H, jnp.float32)
  codes, scale, info = e8p_core.e8p_quantize(Wj, Hj)
  assert bool(info["cholesky_ok"])
  Q = np.asarray(E8PArray(codes, scale, dtype=jnp.float32).materialize(), np.float64)
  # Nearest rounding with the same scale (no feedback).
  s = float(scale)
  near = np.asarray(e8p_core.nearest(jnp.asarray(W.T.reshape(-1, 8) / s, jnp.float32))[1])
  Qn = near.reshape(W.shape[1], W.shape[0]).T * s
  gq, _ = gptq_core.gptq_quantize(Wj, Hj, bits=2, group_size=64)
  Qg = np.asarray(gq.materialize(), np.float64)
  e_ldlq, e_near, e_gptq = _out_err(W, Q, H), _out_err(W, Qn, H), _out_err(W, Qg, H)
  print(f"output error: BlockLDLQ {e_ldlq:.4g}, nearest {e_near:.4g}, GPTQ w2g64 {e_gptq:.4g}")
  assert e_ldlq < 0.8 * e_near
  assert e_ldlq < 0.8 * e_gptq
  # The solver's loss is the same objective in scaled units (damped H, hence the tolerance).
  assert float(info["loss"]) * s**2 == pytest.approx(e_ldlq / 2, rel=0.1)
  # Tune passes (coordinate descent) do not make it worse.
  codes_t, _, _ = e8p_core.e8p_quantize(Wj, Hj, tune_iters=2)
  Qt = np.asarray(E8PArray(codes_t, scale, dtype=jnp.float32).materialize(), np.float64)
  e_tune = _out_err(W, Qt, H)
  print(f"output error with 2 tune passes: {e_tune:.4g}")
  assert e_tune <= e_ldlq * 1.001


def test_padded_sweep_codes_are_what_the_solver_used():
  # K = 200 is not a multiple of blocksize = 64: padding rows; dead input 3 (zero feature).
  W, H, _ = _problem(k=200, n=16, seed=3)
  H[3, :] = 0
  H[:, 3] = 0
  codes, scale, info = e8p_core.e8p_quantize(jnp.asarray(W, jnp.float32),
                                             jnp.asarray(H, jnp.float32), blocksize=64)
  assert codes.shape == (25, 16)
  Q = np.asarray(E8PArray(codes, scale, dtype=jnp.float32).materialize(), np.float64)
  Wd = W.copy()
  Wd[3] = 0  # what the solver quantizes (drop_dead)
  # The loss the solver reports is that of the values the codes decode to.
  assert float(info["loss"]) * float(scale)**2 == pytest.approx(_out_err(Wd, Q, H) / 2, rel=0.1)


def _leaf(k=128, n=64, dtype=jnp.float32):
  W, H, X = _problem(k, n)
  stats = LayerStats.zeros(k).add(X)
  out, _ = T.apply(T.e8p(where=r"w"), {"w": jnp.asarray(W, dtype)}, {"w": stats})
  return out["w"], W, H


def test_format_bytes_materialize_dot_and_jit():
  w, W, _ = _leaf()
  assert isinstance(w, E8PArray) and w.shape == W.shape
  assert w.codes.dtype == jnp.uint16 and w.codes.shape == (W.shape[0] // 8, W.shape[1])
  assert w.nbytes == W.size // 4 + 4  # 2 bits per weight + one float32 scale
  assert w.bits_per_param == pytest.approx(2 + 32 / W.size)
  assert E8PArray.trainable == ("scale",)
  dense = np.asarray(w.materialize())
  direct = (np.asarray(e8p_core.decode(w.codes))  # (K/8, N, 8) -> (K, N), times the scale
            .transpose(0, 2, 1).reshape(W.shape) * float(w.scale))
  np.testing.assert_allclose(dense, direct, rtol=1e-6)
  for rows in (1, 3, 40):
    x = jax.random.normal(jax.random.key(rows), (rows, W.shape[0]))
    np.testing.assert_allclose(np.asarray(formats.dot(x, w)), np.asarray(x @ dense),
                               rtol=1e-4, atol=1e-5)
  x = jnp.ones((2, 5, W.shape[0]))
  f = jax.jit(lambda x, w: formats.dot(x, w))
  np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(x @ dense), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(lambda w: w.materialize())(w)), dense)


def test_checkpoint_round_trip(tmp_path):
  w, _, _ = _leaf(64, 32)
  path = checkpoint.save(str(tmp_path / "ck"), {"layer": {"kernel": w}})
  restored, _ = checkpoint.restore(path)
  r = restored["layer"]["kernel"]
  assert isinstance(r, E8PArray) and r.dtype == w.dtype
  np.testing.assert_array_equal(np.asarray(r.codes), np.asarray(w.codes))
  assert r.codes.dtype == jnp.uint16 and float(r.scale) == float(w.scale)


def test_plan_on_abstract_arrays_and_pipeline():
  t = T.e8p(where=r".*kernel")
  abstract = {"a": {"kernel": jax.ShapeDtypeStruct((576, 1536), jnp.bfloat16)}}
  out = T.plan(t, abstract)["a"]["kernel"]
  assert isinstance(out, E8PArray) and out.shape == (576, 1536) and out.dtype == jnp.bfloat16
  assert out.codes.shape == (72, 1536) and out.codes.dtype == jnp.uint16
  assert "e8p" in pipeline.METHODS and "e8p" in pipeline.DATA_AWARE


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="e8p.*blocksize"):
    T.e8p(blocksize=12)
  with pytest.raises(ValueError, match="e8p.*percdamp"):
    T.e8p(percdamp=-1.0)
  with pytest.raises(ValueError, match="e8p.*scale_override"):
    T.e8p(scale_override=0.0)
  with pytest.raises(ValueError, match="e8p.*tune_iters"):
    T.e8p(tune_iters=-1)
  with pytest.raises(ValueError, match="K=12"):
    T.plan(T.e8p(where=r"w"), {"w": jax.ShapeDtypeStruct((12, 8), jnp.float32)})
