"""Recipes fail when built or planned, never hours later: impossible settings, non-finite
weights or statistics, and every method plans and chains (SpQR and OWQ included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import calibration, formats, transforms as T
from compressjax.calibration import LayerStats
from compressjax.io import model_params


@pytest.fixture(scope="module")
def abstract():
  return T.to_abstract(model_params(tiny.tiny_model()))


@pytest.mark.parametrize("build, fragment", [
    (lambda: T.gptq(4, 0), "gptq: group_size must be a positive int"),
    (lambda: T.gptq(4, -64), "gptq: group_size must be a positive int"),
    (lambda: T.gptq(4, 64, blocksize=0), "gptq: blocksize must be a positive int"),
    (lambda: T.gptq(4, 64, percdamp=-0.01), r"gptq: percdamp \(damping\) must be a finite"),
    (lambda: T.gptq(4, 64, percdamp=float("inf")), "percdamp"),
    (lambda: T.gptq(5, 64), "gptq: bits must be one of"),
    (lambda: T.rtn(4, 0), "rtn: group_size must be a positive int"),
    (lambda: T.spqr(3, 0), "spqr: group_size"),
    (lambda: T.owq(3, percdamp=float("nan")), "owq: percdamp"),
    (lambda: T.awq(4, 0), "awq: group_size"),
    (lambda: T.lq_lora(3, 64, rank=0), "lq_lora: rank must be a positive int"),
    (lambda: T.lq_lora(3, 0), "lq_lora: group_size"),
    (lambda: T.eora(T.gptq(3, 64), rank=0), "eora: rank must be a positive int"),
    (lambda: T.magnitude(0.0), r"sparsity must be a float in \(0, 1\)"),
    (lambda: T.wanda(1.0), r"sparsity must be a float in \(0, 1\)"),
    (lambda: T.sparsegpt(0.0), r"sparsity must be a float in \(0, 1\)"),
    (lambda: T.sparsegpt(0.5, blocksize=0), "sparsegpt: blocksize must be a positive int"),
    (lambda: T.sparsegpt(0.5, percdamp=-1.0), "sparsegpt: percdamp"),
    (lambda: T.asvd(rank=4, percdamp=-1.0), "asvd: percdamp"),
    (lambda: T.eora(T.rtn(4), 4, percdamp=-1.0), "eora: percdamp"),
    (lambda: T.awq(4, 64, n_grid=0), "awq: n_grid must be a positive int"),
    (lambda: T.awq(4, 64, max_shrink=0.01), "awq: max_shrink must be in"),
])
def test_impossible_settings_fail_when_built(build, fragment):
  with pytest.raises(ValueError, match=fragment):
    build()


@pytest.mark.parametrize("build, fragment", [
    (lambda: T.gptq(4, 48), "group_size must be a positive divisor of K=64"),
    (lambda: T.spqr(3, 48), "group_size must be a positive divisor"),
    (lambda: T.owq(3, 48), "group_size must be a positive divisor"),
    (lambda: T.chain(T.awq(4, 48), T.gptq(4, 48)), "group_size must be a positive divisor"),
    (lambda: T.rtn(4, 48), "group_size must be a positive divisor"),
    (lambda: T.svd(rank=1000), r"rank 1000 exceeds min\(K, N\) = 32"),
    (lambda: T.asvd(rank=33), r"rank 33 exceeds min\(K, N\) = 32"),
    (lambda: T.eora(T.gptq(3, 32), rank=100), r"eora at parameter .*rank 100 exceeds"),
    (lambda: T.lq_lora(3, 32, rank=100), r"rank 100 exceeds"),
    (lambda: T.select((r"layers/\d+/attn/qkv_proj/kernel", T.rtn(4))), "matched no parameter"),
])
def test_impossible_settings_fail_when_planned(abstract, build, fragment):
  """Found on abstract arrays (``T.plan``), naming the parameter, before any calibration."""
  with pytest.raises(ValueError, match=fragment) as e:
    T.plan(build(), abstract)
  if "rule" not in fragment and "matched" not in fragment:
    assert "at parameter 'layers/" in str(e.value)


def _kernel(nan_at=None):
  k = jnp.asarray(np.random.default_rng(0).normal(size=(64, 16)), jnp.float32)
  if nan_at is not None:
    k = k.at[nan_at].set(jnp.nan)
  return {"layers": {0: {"mlp": {"up_proj": {"kernel": k}}}}}


def _stats(h):
  return {"layers/0/mlp/up_proj/kernel": LayerStats(h, jnp.diag(h), jnp.ones(64), jnp.float32(64))}


@pytest.mark.parametrize("t", [T.rtn(4, 32), T.magnitude(0.5), T.svd(rank=4)],
                         ids=["rtn", "magnitude", "svd"])
def test_nonfinite_weight_refused_naming_the_parameter(t):
  with pytest.raises(ValueError, match=r"at parameter 'layers/0/mlp/up_proj/kernel': weight has "
                                       r"1 non-finite values"):
    T.apply(t, _kernel(nan_at=(3, 4)))


@pytest.mark.parametrize("t", [T.gptq(4, 32), T.spqr(3, 16), T.owq(3), T.sparsegpt(0.5),
                               T.wanda(0.5)], ids=["gptq", "spqr", "owq", "sparsegpt", "wanda"])
def test_nonfinite_weight_or_statistics_refused(t):
  x = np.random.default_rng(1).normal(size=(256, 64)).astype(np.float32)
  h = jnp.asarray(x.T @ x)
  with pytest.raises(ValueError, match="weight has 1 non-finite"):
    T.apply(t, _kernel(nan_at=(0, 0)), _stats(h))
  with pytest.raises(ValueError, match=r"calibration statistics \(X\^T X\) has 1 non-finite"):
    T.apply(t, _kernel(), _stats(h.at[2, 2].set(jnp.inf)))
  T.apply(t, _kernel(), _stats(h))  # finite in, finite out


def test_nonfinite_result_is_an_error():
  """A rewrite that produces NaN (e.g. from a degenerate Hessian) is never returned silently."""
  t = T.leafwise(lambda p, w: w * jnp.nan, name="broken")
  with pytest.raises(ValueError, match="broken at parameter .* result has 1024 non-finite"):
    T.apply(t, _kernel())


def test_other_error_types_are_kept_and_name_the_parameter():
  t = T.leafwise(lambda p, w: 1 // 0, name="divides")
  with pytest.raises(ZeroDivisionError) as e:
    T.apply(t, _kernel())
  assert "(in divides at parameter 'layers/0/mlp/up_proj/kernel')" in e.value.__notes__


def test_error_of_any_type_keeps_its_cause_and_a_readable_message(abstract):
  def needs_concrete(p, w):
    return w * float(np.asarray(w).sum())  # a JAX tracer error while planning

  with pytest.raises(TypeError, match="needs_concrete at parameter 'layers/0/") as e:
    T.plan(T.leafwise(needs_concrete, name="needs_concrete"), abstract)
  assert isinstance(e.value.__cause__, jax.errors.TracerArrayConversionError)


@pytest.mark.parametrize("name, build", [
    # the heaviest (~25-30 s each alone) run with -m slow; owq, gptq, owq+eora in the default
    pytest.param("spqr", lambda: T.spqr(3, 16), marks=pytest.mark.slow),
    ("owq", lambda: T.owq(3, n_keep=2)),
    pytest.param("awq+spqr", lambda: T.chain(T.awq(3, 16), T.spqr(3, 16)),
                 marks=pytest.mark.slow),
    ("owq+eora", lambda: T.eora(T.owq(3, n_keep=2), rank=4)),
    ("gptq", lambda: T.gptq(4, 32)),
    pytest.param("sparsegpt+gptq", lambda: T.chain(T.sparsegpt(0.5), T.gptq(4, 32)),
                 marks=pytest.mark.slow),
])
def test_every_method_plans_and_chains(name, build):
  """The plan (abstract arrays) has the formats and shapes of a real calibrated run."""
  del name
  from compressjax.transforms.selection import leaves_with_paths
  model = tiny.tiny_model(seed=4)
  planned = T.plan(build(), T.to_abstract(model_params(model)))
  w = np.random.default_rng(0).integers(0, 300, (4, 24)).astype(np.int32)
  real, _ = calibration.run_sequential(model, w, build(), progress=False)

  def desc(tree):
    return {p: (type(x).__name__ if isinstance(x, formats.CompressedArray) else "dense",
                tuple(x.shape), tuple(type(t).__name__ for t in getattr(x, "terms", ())))
            for p, x in leaves_with_paths(tree)}

  dp, dr = desc(planned), desc(real)
  assert dp.keys() == dr.keys()
  for p in dr:
    if dr[p][0] == "QuantizedArray" and dp[p][2] == ("QuantizedArray", "SparseOutliers"):
      continue  # SpQR found no outliers in this layer and stored the bare grid
    assert dp[p] == dr[p], p
  assert any(isinstance(x, formats.CompressedArray) for _, x in leaves_with_paths(real))
