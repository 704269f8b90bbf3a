"""AQLM: the additive-codebook format and the solver (beam search, codebooks, scales)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import checkpoint, formats, pipeline, transforms as T
from compressjax.calibration import LayerStats
from compressjax.formats import additive
from compressjax.quantize import aqlm_core as A
from compressjax.quantize import rtn_core

# Jitted once per shape (eager calls of the solver's loops would compile at every call).
_beam = jax.jit(A.beam_search_codes, static_argnames="beam_size")
_cg = jax.jit(A.update_codebooks, static_argnames="iters")
_obj = jax.jit(lambda W, H, b, C, s: A.objective(W, A.decode(b, C, s), H))

def _problem(K=128, N=64, seed=0, n=512):
  """A weight and a correlated Hessian ``X^T X / n``."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  mix = jnp.eye(K) + 0.7 * jax.random.normal(k2, (K, K)) / np.sqrt(K)
  X = jax.random.normal(k1, (n, K)) @ mix
  return 0.05 * jax.random.normal(k3, (K, N)), X.T @ X / n, X


def _leaf(M, B, g, K, N, seed=0, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  codes = jax.random.randint(k1, (K // g, N, M), 0, 2**B)
  cb = jax.random.normal(k2, (M, 2**B, g)).astype(jnp.float16)
  sc = (1 + jax.random.uniform(k3, (N,))).astype(jnp.float16)
  return codes, cb, sc, formats.AdditiveCodebookArray.from_codes(codes, cb, sc, nbits=B,
                                                                 dtype=dtype)


@pytest.mark.parametrize("M,B,g,container", [(2, 8, 8, np.uint8), (1, 10, 4, np.uint16),
                                             (3, 3, 2, np.uint32), (1, 16, 8, np.uint16)])
def test_materialize_is_the_direct_sum_and_codes_use_the_narrowest_container(M, B, g, container):
  K, N = 16 * g, 6
  codes, cb, sc, w = _leaf(M, B, g, K, N)
  assert w.codes.dtype == container and w.shape == (K, N)
  np.testing.assert_array_equal(w.code_values(), codes)
  c, b, s = np.asarray(codes), np.asarray(cb, np.float32), np.asarray(sc, np.float32)
  want = np.zeros((K, N), np.float32)
  for i, n in itertools.product(range(K // g), range(N)):
    want[i * g:(i + 1) * g, n] = s[n] * sum(b[m, c[i, n, m]] for m in range(M))
  np.testing.assert_allclose(w.materialize(), want, rtol=1e-6, atol=1e-6)
  # Honest bytes: codes (packed: ceil(I/32)*B words per (n, m), 3 bits: ceil(I/10)) + codebooks
  # + scales.
  words = -(-(K // g) // 10) if B == 3 else -(-(K // g) // 32) * B
  code_bytes = {np.uint8: K // g * N * M, np.uint16: 2 * K // g * N * M,
                np.uint32: 4 * words * N * M}[container]
  assert w.nbytes == code_bytes + 2 * M * 2**B * g + 2 * N
  assert formats.AdditiveCodebookArray.trainable == ("codebooks", "scales")


def test_bad_leaves_are_refused():
  codes, cb, sc, _ = _leaf(2, 4, 4, 32, 5)
  with pytest.raises(ValueError, match="nbits"):
    formats.AdditiveCodebookArray.from_codes(codes, cb, sc, nbits=17)
  with pytest.raises(ValueError, match="codebooks must be"):
    formats.AdditiveCodebookArray.from_codes(codes, cb, sc, nbits=5)
  with pytest.raises(ValueError, match="scales must be"):
    formats.AdditiveCodebookArray.from_codes(codes, cb, sc[:3], nbits=4)


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_lut_equals_decode_and_dot_equals_materialize(rows):
  _, _, _, w = _leaf(2, 8, 8, 64, 24)
  x = jax.random.normal(jax.random.PRNGKey(1), (rows, 64))
  dense = np.asarray(x) @ np.asarray(w.materialize())
  lut = additive.additive_matmul_xla(x, w, lut=True)
  dec = additive.additive_matmul_xla(x, w, lut=False)
  np.testing.assert_allclose(lut, dec, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(formats.dot(x, w), dense, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jax.jit(formats.dot)(x, w), dense, rtol=1e-4, atol=1e-4)
  # Leading batch axes and the per-shape rule (LUT for 2 * rows <= g).
  assert formats.dot(x.reshape(rows, 1, 64), w).shape == (rows, 1, 24)
  assert additive.use_lut(rows, w) == (2 * rows <= 8)


def test_beam_search_is_exact_on_a_tiny_problem_and_never_increases():
  W, H, _ = _problem(K=4, N=5)
  C = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 2)) * 0.05
  s = jnp.ones((5,))
  b0 = jnp.zeros((2, 5, 1), jnp.int32)
  # I = 2 groups, one 2-bit codebook: beam 4 keeps every code of group 0, so it is exhaustive.
  b = _beam(W, H, C, s, b0, beam_size=4)
  for n in range(5):
    losses = {}
    for c0, c1 in itertools.product(range(4), repeat=2):
      q = jnp.concatenate([C[0, c0], C[0, c1]])
      d = W[:, n] - q
      losses[(c0, c1)] = float(d @ H @ d)
    best = min(losses, key=losses.get)
    assert losses[tuple(np.asarray(b[:, n, 0]).tolist())] <= losses[best] * (1 + 1e-5)
  # On a real-size problem from random codes: every beam width lowers the objective, wider
  # beams do at least about as well, and a second pass never undoes the first.
  W, H, _ = _problem()
  b, C, s = A.init_aq_kmeans(W, M=2, B=4, g=4, iters=3, key=jax.random.PRNGKey(0))
  for start in (b, jax.random.randint(jax.random.PRNGKey(5), b.shape, 0, 16)):
    before = float(_obj(W, H, start, C, s))
    for beam in (1, 3):
      b1 = _beam(W, H, C, s, start, beam_size=beam)
      after = float(_obj(W, H, b1, C, s))
      assert after <= before * (1 + 1e-6)
      b2 = _beam(W, H, C, s, b1, beam_size=beam)
      assert float(_obj(W, H, b2, C, s)) <= after * (1 + 1e-6)


def test_codebook_update_reaches_least_squares_and_scales_are_optimal():
  W, H, _ = _problem(K=32, N=16)
  b, C, s = A.init_aq_kmeans(W, M=2, B=3, g=4, iters=3, key=jax.random.PRNGKey(0))
  obj = lambda C, s: float(_obj(W, H, b, C, s))
  # The dense least-squares solution of A^T H A c = A^T H w (A built explicitly).
  Amat = jax.jacobian(lambda c: A.decode(b, c, s).reshape(-1))(C).reshape(W.size, C.size)
  HN = jnp.kron(H, jnp.eye(16))  # vec(W) is row-major (K, N): H acts on the K axis
  c_ls = jnp.linalg.lstsq(Amat.T @ HN @ Amat, Amat.T @ HN @ W.reshape(-1), rcond=None)[0]
  c_cg = _cg(W, H, C, s, b, iters=60)
  assert obj(C, s) > obj(c_cg, s)
  np.testing.assert_allclose(obj(c_cg, s), obj(c_ls.reshape(C.shape), s), rtol=1e-3)
  prev = obj(C, s)
  for it in (1, 2, 4):  # CG never increases the objective
    cur = obj(_cg(W, H, C, s, b, iters=it), s)
    assert cur <= prev * (1 + 1e-6)
    prev = cur
  s2 = A.update_scales(W, H, c_cg, s, b)
  assert obj(c_cg, s2) <= obj(c_cg, s) * (1 + 1e-6)
  for eps in (0.99, 1.01):  # per-output optimum: perturbing any scale is worse
    assert obj(c_cg, s2 * eps) >= obj(c_cg, s2)


def test_aqlm_beats_rtn_and_kmeans_on_output_error_at_equal_bits():
  W, H, _ = _problem(K=128, N=64)
  rel = lambda q: float(A.relative_error(W, q, H))
  kw = dict(num_codebooks=2, nbits=4, in_group_size=4, kmeans_iters=6)
  # 2x4 g4: 2 code bits per weight + codebooks (2*16*4*16 bits / 8192 weights = 0.25) + scales.
  b, C, s, info = jax.jit(lambda W, H: A.aqlm_quantize(W, H, iterations=3, **kw))(W, H)
  ours = rel(A.decode(b, C.astype(jnp.float32), s.astype(jnp.float32)))
  np.testing.assert_allclose(ours, info["rel_err"][-1], rtol=1e-5)
  assert np.all(np.diff(np.asarray(info["rel_err"])) <= 1e-6)  # every round helps
  b0, C0, s0, _ = A.aqlm_quantize(W, H, iterations=0, **kw)
  kmeans = rel(A.decode(b0, C0.astype(jnp.float32), s0.astype(jnp.float32)))
  rtn = rel(rtn_core.quantize_rtn(W, bits=2, group_size=32, symmetric=False).materialize())
  leaf = formats.AdditiveCodebookArray.from_codes(b, C, s, nbits=4)
  rtn_leaf = rtn_core.quantize_rtn(W, bits=2, group_size=32, symmetric=False)
  assert leaf.bits_per_param < rtn_leaf.bits_per_param  # 2.38 vs 3.0 bits per weight
  print(f"rel output error: aqlm {ours:.4f}, k-means {kmeans:.4f}, rtn w2g32 {rtn:.4f}")
  assert ours < 0.8 * kmeans and ours < 0.6 * rtn


def test_transform_plan_jit_checkpoint_and_refusals(tmp_path):
  W, H, X = _problem(K=64, N=32)
  path = "layers/0/mlp/up_proj/kernel"
  params = {"layers": {0: {"mlp": {"up_proj": {"kernel": W}}}}}
  stats = {path: LayerStats.zeros(64).add(X)}
  t = T.aqlm(2, 4, 4, beam_size=2, iterations=2, kmeans_iters=3)
  q, _ = T.apply(t, params, stats)
  leaf = q["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(leaf, formats.AdditiveCodebookArray) and leaf.codes.dtype == np.uint32
  assert leaf.codebooks.dtype == np.float16 and leaf.scales.dtype == np.float16
  assert float(A.relative_error(W, leaf.materialize(), H)) < 0.2
  abstract = T.plan(t, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  pl = abstract["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert type(pl) is formats.AdditiveCodebookArray
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(pl)] == [
      (x.shape, x.dtype) for x in jax.tree.leaves(leaf)]
  assert pl.nbytes == leaf.nbytes
  back, _ = checkpoint.restore(checkpoint.save(str(tmp_path / "ck"), q))
  bl = back["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert type(bl) is formats.AdditiveCodebookArray and bl.nbits == 4
  for a, b in zip(jax.tree.leaves(bl), jax.tree.leaves(leaf)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert pipeline.METHODS["aqlm"] is T.aqlm and "aqlm" in pipeline.DATA_AWARE
  for kwargs, arg in [(dict(nbits=0), "nbits"), (dict(num_codebooks=0), "num_codebooks"),
                      (dict(in_group_size=1.5), "in_group_size"),
                      (dict(nbits=2, beam_size=5), "beam_size"), (dict(iterations=-1), "iterations"),
                      (dict(codebook_dtype="int8"), "codebook_dtype")]:
    with pytest.raises(ValueError, match=f"aqlm: {arg}"):
      T.aqlm(**kwargs)
  with pytest.raises(ValueError, match="in_group_size=3 must divide"):
    T.apply(T.aqlm(1, 2, 3, iterations=0, kmeans_iters=1), params, stats)


@pytest.mark.parametrize("name,bits", [("aqlm_2x8_g8", 2.153), ("aqlm_3x8_g8", 3.218),
                                       ("aqlm_1x16_g8", 18.62)])
def test_config_bits_per_parameter_on_the_reference_model_shapes(name, bits):
  """The configs' docstring claims: planned (abstract) leaves of one SmolLM2-135M block."""
  import importlib
  cfg = importlib.import_module(f"configs.{name}").get_config()
  shapes = {"attn": {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192),
                     "o_proj": (576, 576)},
            "mlp": {"gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}}
  params = {"layers": {0: {mod: {p: {"kernel": jax.ShapeDtypeStruct(s, jnp.float32)}
                                 for p, s in d.items()} for mod, d in shapes.items()}}}
  out = T.plan(pipeline.build_transform(cfg.compression), params)
  leaves = jax.tree.leaves(out, is_leaf=formats.is_compressed)
  assert len(leaves) == 7 and all(isinstance(x, formats.AdditiveCodebookArray) for x in leaves)
  total = sum(x.nbytes for x in leaves) * 8 / sum(x.num_params for x in leaves)
  assert total == pytest.approx(bits, abs=0.005)


def test_partition_specs_split_codes_and_scales_by_column():
  from jax.sharding import PartitionSpec as P
  _, _, _, w = _leaf(2, 8, 8, 64, 24)
  spec = formats.partition_specs(w, P(None, "model"), {"model": 4})
  assert tuple(spec.codes) == (None, "model", None) and tuple(spec.scales) == ("model",)
  assert tuple(spec.codebooks) == ()
  spec = formats.partition_specs(w, P("model", None), {"model": 4})
  assert tuple(spec.codes) == ("model", None, None) and tuple(spec.scales) == (None,)


@pytest.mark.slow  # ~20 s of CPU: two blocks through the engine
def test_tiny_model_through_the_calibration_engine_beats_rtn():
  """End to end: sequential calibration, AdditiveCodebookArray leaves in the model's forward."""
  import tiny
  from compressjax import calibration
  from compressjax.io import build_model, model_params
  model = tiny.tiny_model(seed=6)
  rng = np.random.default_rng(0)
  w, held = rng.integers(0, 300, (8, 32)), rng.integers(0, 300, (4, 32))
  ref = np.asarray(model(jnp.asarray(held)))
  err = lambda p: float(np.mean((np.asarray(build_model(model.cfg, p)(jnp.asarray(held))) - ref)**2))
  aq, _ = calibration.run_sequential(model, w, T.aqlm(2, 4, 4, iterations=2, kmeans_iters=3),
                                     batch_size=4, progress=False)
  rtn = T.apply(T.rtn(2, 32), model_params(model))[0]
  leaves = [x for x in jax.tree.leaves(aq, is_leaf=formats.is_compressed)
            if isinstance(x, formats.AdditiveCodebookArray)]
  assert len(leaves) == 14
  print(f"tiny model logits MSE: aqlm 2x4 g4 {err(aq):.4g}, rtn w2g32 {err(rtn):.4g}")
  assert err(aq) < err(rtn)
