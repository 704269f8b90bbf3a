"""QuIP#-style incoherence processing: Hadamard matrices, the Incoherent format, the transform."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import calibration, checkpoint, formats, pipeline, transforms as T
from compressjax.calibration import LayerStats
from compressjax.io import build_model, model_params
from compressjax.quantize import hadamard_core as hc
from compressjax.transforms.incoherence import random_signs

PATH = "layers/0/mlp/up_proj/kernel"
REFERENCE_WIDTHS = (576, 192, 1536, 64)  # SmolLM2-135M: hidden, kv out, mlp, head dim


def _params(w):
  return {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.asarray(w)}}}}}


def _kernel(tree):
  return tree["layers"][0]["mlp"]["up_proj"]["kernel"]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 64, 108, 140, 192, 576,
                               1536])
def test_hadamard_matrices_are_orthogonal(n):
  hk, k = hc.get_hadK(n)
  assert (n // k) & (n // k - 1) == 0
  h = hc.sylvester(n // k) if hk is None else np.kron(hk, hc.sylvester(n // k))
  assert set(np.unique(h)) <= {-1, 1}
  np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_reference_widths_use_the_expected_factors():
  assert [hc.get_hadK(n)[1] for n in REFERENCE_WIDTHS] == [36, 12, 12, 1]


@pytest.mark.parametrize("n", [3, 6, 52, 100])
def test_unsupported_sizes_are_refused(n):
  assert not hc.is_supported(n)
  with pytest.raises(ValueError, match=f"n={n}.*not supported"):
    hc.matmul_hadU(jnp.ones((2, n)))


@pytest.mark.parametrize("n", [12, 64, 576, 1536])
def test_fast_transform_equals_dense_and_is_undone_in_float64(n):
  with jax.enable_x64(True):
    x = np.random.default_rng(n).standard_normal((3, n))
    h = hc.hadamard_matrix(n)
    y = np.asarray(hc.matmul_hadU(jnp.asarray(x)))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, x @ h, atol=1e-12)
    np.testing.assert_allclose(np.asarray(hc.matmul_hadUt(jnp.asarray(x))), x @ h.T, atol=1e-12)
    np.testing.assert_allclose(np.asarray(hc.matmul_hadUt(jnp.asarray(y))), x, atol=1e-12)


def test_weight_and_hessian_rotations_are_exact_in_float64():
  k, n = 192, 576
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    w = rng.standard_normal((k, n))
    su, sv = np.sign(rng.standard_normal(k)), np.sign(rng.standard_normal(n))
    wt = np.asarray(hc.incoherent_weight(jnp.asarray(w), jnp.asarray(su), jnp.asarray(sv)))
    hin, hout = hc.hadamard_matrix(k), hc.hadamard_matrix(n)
    np.testing.assert_allclose(wt, hin.T @ np.diag(su) @ w @ np.diag(sv) @ hout, atol=1e-12)
    back = hc.coherent_weight(jnp.asarray(wt), jnp.asarray(su), jnp.asarray(sv))
    np.testing.assert_allclose(np.asarray(back), w, atol=1e-12)
    x = rng.standard_normal((50, k))
    xr = (x * su) @ hin
    hr = hc.incoherent_hessian(jnp.asarray(x.T @ x), jnp.asarray(su))
    np.testing.assert_allclose(np.asarray(hr), xr.T @ xr, atol=1e-10)
    np.testing.assert_allclose(xr @ wt @ hout.T * sv, x @ w, atol=1e-10)  # same function


def _incoherent(k=192, n=576, seed=0):
  w = jax.random.normal(jax.random.PRNGKey(seed), (k, n)) * 0.05
  return w, _kernel(T.apply(T.incoherence(seed=seed), _params(w))[0])


def test_format_materializes_and_multiplies_without_forming_w():
  w, inc = _incoherent()
  assert isinstance(inc, formats.Incoherent) and inc.shape == (192, 576)
  assert inc.trainable == ()
  np.testing.assert_allclose(inc.materialize(), w, atol=2e-6)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 192))
  y = formats.dot(x, inc)
  assert y.shape == (2, 4, 576)
  np.testing.assert_allclose(y, x @ inc.materialize(), atol=2e-5)
  # honest bytes: the dense inner plus one bit per sign, in whole uint32 words
  assert inc.nbytes == 192 * 576 * 4 + 4 * (192 // 32 + 576 // 32)
  # the product computes no (K, N) value (W is never formed; Wt is only read) and no dense
  # Hadamard matrix; materialize() does build W (the check can fail)
  assert _shapes_computed(lambda x, w: formats.dot(x, w), x, inc) & {
      (192, 576), (192, 192), (576, 576)} == set()
  assert (192, 576) in _shapes_computed(lambda w: w.materialize(), inc)


def _shapes_computed(f, *args):
  shapes = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
      for p in eqn.params.values():
        sub = getattr(p, "jaxpr", None)
        if sub is not None:
          walk(getattr(sub, "jaxpr", sub))

  walk(jax.make_jaxpr(f)(*args).jaxpr)
  return shapes


def test_dot_with_quantized_inner_under_jit_compiles_once():
  w, _ = _incoherent()
  q = _kernel(T.apply(T.chain(T.incoherence(), T.rtn(bits=4, group_size=64)), _params(w))[0])
  assert isinstance(q.inner, formats.QuantizedArray)
  x = jax.random.normal(jax.random.PRNGKey(2), (5, 192))
  f = jax.jit(formats.dot)
  np.testing.assert_allclose(f(x, q), x @ q.materialize(), atol=1e-4, rtol=1e-4)
  n_compiles = f._cache_size()  # pylint: disable=protected-access
  f(x + 1.0, q)
  assert f._cache_size() == n_compiles  # pylint: disable=protected-access
  assert q.nbytes == q.inner.nbytes + 4 * (6 + 18)


def test_checkpoint_round_trip_with_quantized_inner(tmp_path):
  w, _ = _incoherent(k=64, n=192)
  params = _params(w)
  q, _ = T.apply(T.chain(T.incoherence(seed=3), T.rtn(bits=3, group_size=32)), params)
  path = checkpoint.save(str(tmp_path / "ck"), q)
  r, _ = checkpoint.restore(path)
  a, b = _kernel(q), _kernel(r)
  assert type(b) is formats.Incoherent and type(b.inner) is formats.QuantizedArray
  fa, ta = jax.tree_util.tree_flatten(a)
  fb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for u, v in zip(fa, fb):
    assert u.dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  x = jnp.ones((2, 64))
  np.testing.assert_array_equal(formats.dot(x, a), formats.dot(x, b))


def test_signs_are_deterministic_per_seed_and_path():
  s = lambda seed, path: random_signs(seed, path, 64, 128)
  a, b = s(0, PATH), s(0, PATH)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], s(1, PATH)[0])
  assert not np.array_equal(a[0], s(0, "layers/1/mlp/up_proj/kernel")[0])
  assert set(np.unique(np.asarray(a[0]))) == {-1.0, 1.0}
  _, i1 = _incoherent(64, 128, seed=4)
  _, i2 = _incoherent(64, 128, seed=4)
  np.testing.assert_array_equal(i1.su_bits, i2.su_bits)
  np.testing.assert_array_equal(i1.inner, i2.inner)


def _heavy_tailed_layer(k=192, n=128, seed=0):
  rng = np.random.default_rng(seed)
  w = (rng.standard_t(df=3, size=(k, n)) * 0.02).astype(np.float32)
  w[rng.integers(0, k, 20), rng.integers(0, n, 20)] *= 20  # outlier weights
  a = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
  x = (rng.standard_normal((1024, k)) @ a).astype(np.float32)
  x[:, :4] *= 10  # outlier input channels
  return w, x


def _output_error(w, q, h):
  d = np.asarray(w, np.float64) - np.asarray(formats.materialize(q), np.float64)
  return float(np.trace(d.T @ h @ d))


def test_leafwise_sees_through_with_rotated_statistics():
  w, x = _heavy_tailed_layer(k=64, n=64)
  st = LayerStats.zeros(64).add(jnp.asarray(x))
  inc = _kernel(T.apply(T.incoherence(), _params(w))[0])
  seen = {}

  def spy(path, leaf, stats):
    seen["leaf"], seen["stats"] = leaf, stats
    return leaf * 2

  out, _ = T.apply(T.chain(T.incoherence(), T.leafwise(spy, with_stats=True, name="spy")),
                   _params(w), {PATH: st})
  np.testing.assert_array_equal(seen["leaf"], inc.inner)  # the rotated weight, not the wrapper
  su, _ = inc.signs()
  xr = np.asarray(inc.rotate_inputs(jnp.asarray(x)), np.float64)
  ref = LayerStats.zeros(64).add(jnp.asarray(xr))
  got = seen["stats"]
  np.testing.assert_allclose(got.hessian, ref.hessian, rtol=1e-4, atol=1e-2)
  np.testing.assert_allclose(got.sq_sum, ref.sq_sum, rtol=1e-4)
  np.testing.assert_allclose(got.abs_sum, ref.abs_sum, rtol=0.1)  # Gaussian estimate
  assert float(got.n) == float(st.n)
  o = _kernel(out)
  assert isinstance(o, formats.Incoherent)
  np.testing.assert_array_equal(o.su_bits, inc.su_bits)
  np.testing.assert_allclose(o.materialize(), 2 * w, atol=1e-5)


def test_incoherence_then_gptq_beats_plain_gptq_at_2_bits():
  w, x = _heavy_tailed_layer()
  st = LayerStats.zeros(w.shape[0]).add(jnp.asarray(x))
  h = np.asarray(st.gptq_hessian(), np.float64)
  kw = dict(bits=2, group_size=64, act_order=True, static_groups=True)
  errs = {}
  for name, t in [("rtn", T.rtn(bits=2, group_size=64)), ("gptq", T.gptq(**kw)),
                  ("inc+rtn", T.chain(T.incoherence(), T.rtn(bits=2, group_size=64))),
                  ("inc+gptq", T.chain(T.incoherence(), T.gptq(**kw)))]:
    errs[name] = _output_error(w, _kernel(T.apply(t, _params(w), {PATH: st})[0]), h)
  print("Hessian-weighted output error, 2-bit g64:", errs)
  assert errs["inc+gptq"] < 0.5 * errs["gptq"]
  assert errs["inc+gptq"] < errs["inc+rtn"]  # the rotated Hessian is the right one
  assert errs["gptq"] < errs["rtn"]


def test_plan_on_abstract_arrays():
  abstract = T.to_abstract(_params(jnp.zeros((576, 1536))))
  t = T.chain(T.incoherence(), T.gptq(bits=2, group_size=64))
  leaf = _kernel(T.plan(t, abstract))
  assert isinstance(leaf, formats.Incoherent) and isinstance(leaf.inner, formats.QuantizedArray)
  assert isinstance(leaf.su_bits, jax.ShapeDtypeStruct)
  assert leaf.shape == (576, 1536)
  assert leaf.nbytes == leaf.inner.nbytes + 4 * (18 + 48)


def test_bad_arguments_and_unsupported_widths_are_refused():
  with pytest.raises(ValueError, match="incoherence: seed"):
    T.incoherence(seed=-1)
  with pytest.raises(ValueError, match="incoherence.*up_proj.*n=52"):
    T.plan(T.incoherence(), T.to_abstract(_params(jnp.zeros((52, 64)))))
  with pytest.raises(ValueError, match="incoherence.*already compressed"):
    T.apply(T.chain(T.rtn(bits=4), T.incoherence()), _params(jnp.ones((64, 64))))


@pytest.mark.parametrize("bits", [2, 3])
def test_configs_build_a_calibrated_chain(bits):
  cfg = importlib.import_module(f"configs.gptq_w{bits}g64_incoherent").get_config()
  assert pipeline.needs_calibration(cfg.compression)
  steps = cfg.compression.steps
  assert [s["method"] for s in steps] == ["incoherence", "gptq"]
  assert steps[1]["bits"] == bits and steps[1]["group_size"] == 64
  pipeline.build_transform(cfg.compression)


def test_engine_hands_rotated_stats_and_runs_incoherent_leaves():
  """The calibration engine runs the block forward with Incoherent leaves (jitted) and a
  data-aware step after incoherence gets the rotated statistics of every kernel."""
  model = tiny.tiny_model(seed=5)
  seen = {}

  def spy(path, leaf, stats):
    seen[path] = (leaf.shape, stats.hessian.shape)
    return leaf

  t = pipeline.build_transform({"steps": ({"method": "incoherence", "seed": 0},)})
  t = T.chain(t, T.leafwise(spy, with_stats=True, name="spy"))
  windows = np.random.default_rng(0).integers(0, 300, (4, 16)).astype(np.int32)
  out, _ = calibration.run_sequential(model, windows, t, batch_size=4, progress=False)
  assert len(seen) == 14 and all(s[0][0] == s[1][0] for s in seen.values())
  k = out["layers"][1]["mlp"]["down_proj"]["kernel"]
  assert isinstance(k, formats.Incoherent) and k.shape == (128, 64)
  dense = model_params(model)["layers"][1]["mlp"]["down_proj"]["kernel"]
  np.testing.assert_allclose(k.materialize(), dense, atol=1e-5)  # the same function


@pytest.mark.slow
def test_engine_runs_the_chain_on_a_tiny_model():
  model = tiny.tiny_model(seed=5)
  cfg = importlib.import_module("configs.gptq_w3g64_incoherent").get_config()
  comp = cfg.compression.to_dict()
  comp["steps"] = ({"method": "incoherence", "seed": 0},
                   {"method": "gptq", "bits": 4, "group_size": 32, "blocksize": 16})
  t = pipeline.build_transform(comp)
  windows = np.random.default_rng(0).integers(0, 300, (4, 16)).astype(np.int32)
  out, _ = calibration.run_sequential(model, windows, t, batch_size=4, progress=False)
  k = out["layers"][1]["mlp"]["down_proj"]["kernel"]
  assert isinstance(k, formats.Incoherent) and isinstance(k.inner, formats.QuantizedArray)
  toks = jnp.asarray(windows[:1])
  ref = build_model(model.cfg, model_params(model))(toks)
  got = build_model(model.cfg, out)(toks)
  assert bool(jnp.all(jnp.isfinite(got)))
  assert float(jnp.mean((got - ref) ** 2)) < 0.1 * float(jnp.var(ref))


def test_vector_quantizer_sees_through_too():
  """Any leafwise quantizer (here GPTVQ) quantizes the rotated weight with the rotated Hessian."""
  w, x = _heavy_tailed_layer(k=64, n=64)
  st = LayerStats.zeros(64).add(jnp.asarray(x))
  h = np.asarray(st.gptq_hessian(), np.float64)
  kw = dict(dim=2, bits=2, group_size=32, out_block=64, kmeans_iters=3)
  plain = _kernel(T.apply(T.gptvq(**kw), _params(w), {PATH: st})[0])
  inc = _kernel(T.apply(T.chain(T.incoherence(), T.gptvq(**kw)), _params(w), {PATH: st})[0])
  assert isinstance(inc, formats.Incoherent) and type(inc.inner) is type(plain)
  e_plain, e_inc = _output_error(w, plain, h), _output_error(w, inc, h)
  print("GPTVQ d2 w2 output error: plain", e_plain, "incoherent", e_inc)
  assert e_inc < e_plain
  planned = _kernel(T.plan(T.chain(T.incoherence(), T.gptvq(**kw)), T.to_abstract(_params(w))))
  assert isinstance(planned, formats.Incoherent) and planned.nbytes == inc.nbytes


def test_partition_specs_shard_the_inner_like_the_dense_kernel():
  from jax.sharding import PartitionSpec as P
  w, _ = _incoherent(k=64, n=192)
  q = _kernel(T.apply(T.chain(T.incoherence(), T.rtn(bits=4, group_size=32)), _params(w))[0])
  specs = formats.partition_specs(q, P(None, "model"), {"model": 2})
  assert specs.su_bits == P() and specs.sv_bits == P()
  assert specs.inner.packed == P(None, "model") and specs.inner.scale == P(None, "model")


def test_e8p_sees_through_and_gains_from_incoherence():
  """QuIP#'s pairing: E8P + BlockLDLQ on the incoherence-processed weight."""
  w, x = _heavy_tailed_layer(k=64, n=64)
  st = LayerStats.zeros(64).add(jnp.asarray(x))
  h = np.asarray(st.gptq_hessian(), np.float64)
  plain = _kernel(T.apply(T.e8p(blocksize=32), _params(w), {PATH: st})[0])
  inc = _kernel(T.apply(T.chain(T.incoherence(), T.e8p(blocksize=32)), _params(w), {PATH: st})[0])
  assert isinstance(inc, formats.Incoherent) and type(inc.inner) is type(plain)
  e_plain, e_inc = _output_error(w, plain, h), _output_error(w, inc, h)
  print("E8P output error: plain", e_plain, "incoherent", e_inc)
  assert e_inc < e_plain
