"""The calibration engine on a model of another family (GPT-2-style, tests/other_family.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

import other_family as g2
from compressjax import calibration, formats, transforms as T


def _windows(n, t=32, seed=0):
  return np.random.default_rng(seed).integers(0, 300, (n, t)).astype(np.int32)


@pytest.fixture(scope="module")
def setup():
  params = g2.init_params(seed=3)
  held = jnp.asarray(_windows(4, seed=1))
  return params, _windows(16), held, g2.logits(params, held)


def _run(params, cal, transform):
  q, _ = calibration.run_sequential(g2.Gpt2Blocks(params), cal, transform, batch_size=8,
                                    progress=False)
  return {**q, "num_heads": params["num_heads"]}


def _err(q, held, ref):
  return float(jnp.mean((g2.logits(q, held) - ref) ** 2))


def test_gptq_and_sparsegpt_beat_their_baselines_on_another_family(setup):
  params, cal, held, ref = setup
  err = {}
  for name, t in {"rtn": T.rtn(bits=3, group_size=32, where=g2.LINEARS),
                  "gptq": T.gptq(bits=3, group_size=32, where=g2.LINEARS),
                  "magnitude": T.magnitude(0.5, where=g2.LINEARS),
                  "sparsegpt": T.sparsegpt(0.5, where=g2.LINEARS)}.items():
    q = _run(params, cal, t)
    kinds = {type(q["blocks"][i][m][lin]["kernel"]).__name__
             for i in range(2) for m, lin in [("attn", "c_attn"), ("attn", "c_proj"),
                                              ("mlp", "c_fc"), ("mlp", "c_proj")]}
    assert len(kinds) == 1 and kinds != {"ArrayImpl"}, (name, kinds)  # every linear compressed
    assert q["wte"] is params["wte"] or np.array_equal(q["wte"], params["wte"])
    err[name] = _err(q, held, ref)
  assert err["gptq"] < err["rtn"], err
  assert err["sparsegpt"] < err["magnitude"], err
  k = _run(params, cal, T.sparsegpt(0.5, where=g2.LINEARS))["blocks"][1]["mlp"]["c_fc"]["kernel"]
  assert abs(float(jnp.mean(formats.materialize(k) == 0)) - 0.5) < 0.01


def test_awq_folds_into_layernorm_scale_and_bias(setup):
  params, cal, held, ref = setup
  fold = T.awq(3, 32, clip=False, where=g2.LINEARS, groups=g2.awq_groups, block_pattern=g2.BLOCK)
  scaled = _run(params, cal, fold)
  # Scales folded into LayerNorm (scale and bias) and the next linear leave the function as is.
  np.testing.assert_allclose(np.asarray(g2.logits(scaled, held)), np.asarray(ref), atol=1e-3,
                             rtol=1e-4)
  ln = scaled["blocks"][0]["ln_1"]
  assert not np.allclose(ln["scale"], params["blocks"][0]["ln_1"]["scale"])
  assert not np.allclose(ln["bias"], params["blocks"][0]["ln_1"]["bias"])
  rtn = T.rtn(bits=3, group_size=32, where=g2.LINEARS)
  e_rtn = _err(_run(params, cal, rtn), held, ref)
  e_awq = _err(_run(params, cal, T.chain(T.awq(3, 32, where=g2.LINEARS, groups=g2.awq_groups,
                                               block_pattern=g2.BLOCK), rtn)), held, ref)
  assert e_awq < e_rtn, (e_awq, e_rtn)
  with pytest.raises(Exception, match="awq: where="):
    T.awq(3, 32, where=g2.LINEARS).init(g2.Gpt2Blocks(params).abstract_params())


def test_structured_pruning_with_another_familys_names(setup):
  params, cal, held, ref = setup
  names = dict(block_pattern=g2.BLOCK, mlp_in=("mlp/c_fc",), mlp_out="mlp/c_proj",
               attn=("attn/c_attn", "attn/c_proj"), multiple_of=32)
  err = {}
  for comp in (False, True):
    q = _run(params, cal, T.structured(0.3, compensate=comp, **names))
    mlp = q["blocks"][0]["mlp"]
    f = mlp["c_fc"]["kernel"].shape[1]
    assert f < 256 and f % 32 == 0
    assert mlp["c_fc"]["bias"].shape == (f,) and mlp["c_proj"]["kernel"].shape == (f, 64)
    err[comp] = _err(q, held, ref)
  assert err[True] < err[False], err
  with pytest.raises(ValueError, match="block_pattern, mlp_out"):
    T.structured(0.3).init(g2.Gpt2Blocks(params).abstract_params())


def test_global_scope_steps_are_refused_for_any_model(setup):
  params, cal, _, _ = setup
  with pytest.raises(ValueError, match="global scope"):
    _run(params, cal, T.magnitude(0.5, scope="global", where=g2.LINEARS))
