"""Rule language, chaining, abstract planning and the RTN transform on trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny
from compressjax import formats, transforms as T
from compressjax.io import model_params


def _params():
  rng = np.random.default_rng(0)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
      "embed": {"embedding": mk(32, 64)},
      "layers": {i: {"attn": {"q_proj": {"kernel": mk(64, 64)}},
                     "mlp": {"up_proj": {"kernel": mk(64, 128)}, "down_proj": {"kernel": mk(128, 64)}},
                     "attn_norm": {"scale": mk(64)}} for i in range(2)},
  }


def test_default_selection_hits_only_block_linears():
  out, state = T.apply(T.rtn(bits=4, group_size=32), _params())
  paths = state.paths
  assert len(paths) == 6 and all("_proj/kernel" in p for p in paths)
  assert isinstance(out["layers"][1]["mlp"]["down_proj"]["kernel"], formats.QuantizedArray)
  assert isinstance(out["embed"]["embedding"], jax.Array)
  assert isinstance(out["layers"][0]["attn_norm"]["scale"], jax.Array)


def test_select_first_match_wins_and_reports_assignment():
  t = T.select(
      (r"layers/0/.*", None),                               # keep layer 0 dense
      (r".*down_proj/kernel", T.rtn(bits=8)),               # down projections at 8 bits
      (r".*_proj/kernel", T.rtn(bits=3, group_size=32)),    # everything else at 3 bits
  )
  out, state = T.apply(t, _params())
  L0, L1 = out["layers"][0], out["layers"][1]
  assert isinstance(L0["mlp"]["down_proj"]["kernel"], jax.Array)
  assert L1["mlp"]["down_proj"]["kernel"].bits == 8
  assert L1["mlp"]["up_proj"]["kernel"].bits == 3
  assert L1["attn"]["q_proj"]["kernel"].bits == 3
  assert state.assignment["layers/0/mlp/up_proj/kernel"] == 0
  assert state.assignment["layers/1/mlp/down_proj/kernel"] == 1
  assert "embed/embedding" not in state.assignment


def test_rule_that_matches_nothing_is_an_error_naming_it():
  t = T.select((r".*q_projj/kernel", T.rtn(bits=4)))  # a typo
  with pytest.raises(T.UnmatchedRuleError, match="q_projj"):
    T.apply(t, _params())
  # A rule shadowed entirely by an earlier one also matches nothing.
  t = T.select((r".*_proj/kernel", T.rtn(bits=8)), (r".*up_proj/kernel", T.rtn(bits=4)))
  with pytest.raises(T.UnmatchedRuleError, match="up_proj"):
    T.apply(t, _params())
  with pytest.warns(UserWarning, match="matched no parameter"):
    T.apply(T.select((r"nope", None), on_unmatched="warn"), _params())


def test_predicate_and_list_selectors():
  only_wide = lambda path, leaf: path.endswith("kernel") and leaf.shape[1] == 128
  out, state = T.apply(T.rtn(bits=4, where=only_wide), _params())
  assert state.paths == ("layers/0/mlp/up_proj/kernel", "layers/1/mlp/up_proj/kernel")
  out, state = T.apply(T.rtn(bits=4, where=[r".*q_proj/kernel", only_wide]), _params())
  assert len(state.paths) == 4
  with pytest.raises(ValueError, match="regular expression"):
    T.as_predicate("(")
  with pytest.raises(TypeError, match="selector"):
    T.as_predicate(3)


def test_transforms_are_pure():
  params = _params()
  before = jax.tree.map(np.asarray, params)
  T.apply(T.rtn(bits=2, group_size=32), params)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))


def test_chain_plans_later_steps_on_earlier_outputs():
  # The second step selects what the first left dense; its plan sees the first's output.
  t = T.chain(T.rtn(bits=8, where=r".*down_proj/kernel"),
              T.rtn(bits=4, group_size=32, where=lambda p, x: isinstance(x, jax.ShapeDtypeStruct)
                    and p.endswith("_proj/kernel")))
  out, state = T.apply(t, _params())
  assert out["layers"][0]["mlp"]["down_proj"]["kernel"].bits == 8
  assert out["layers"][0]["mlp"]["up_proj"]["kernel"].bits == 4
  assert len(state.inner[1].paths) == 4
  # Quantizing an already-compressed leaf is an error naming the path.
  with pytest.raises(ValueError, match=r"parameter 'layers/0/\w+/\w+_proj/kernel'.*already compressed"):
    T.apply(T.chain(T.rtn(bits=8), T.rtn(bits=4)), _params())


def test_plan_on_abstract_tree_matches_real_shapes():
  params = _params()
  abstract = T.to_abstract(params)
  t = T.rtn(bits=3, group_size=32, symmetric=False)
  planned = T.plan(t, abstract)
  real, _ = T.apply(t, params)
  k_plan = planned["layers"][0]["mlp"]["up_proj"]["kernel"]
  k_real = real["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(k_plan, formats.QuantizedArray)
  shapes = lambda t: [(x.shape, x.dtype) for x in jax.tree.leaves(t)]
  assert shapes(k_plan) == shapes(k_real) and len(shapes(k_real)) == 3  # packed, scale, zero
  assert (k_plan.bits, k_plan.group_size, k_plan.shape) == (k_real.bits, k_real.group_size, k_real.shape)
  assert k_plan.nbytes == k_real.nbytes


def test_plan_a_large_model_without_weights():
  # An abstract 4096-wide, 32-layer tree: planned instantly, no memory allocated.
  big = {"layers": {i: {"mlp": {"up_proj": {"kernel": jax.ShapeDtypeStruct((4096, 14336), jnp.bfloat16)}}}
                    for i in range(32)}}
  planned = T.plan(T.rtn(bits=4, group_size=128), big)
  k = planned["layers"][31]["mlp"]["up_proj"]["kernel"]
  assert k.packed.shape == (4096 * 4 // 32, 14336)
  assert k.scale.shape == (32, 14336)


def test_rtn_bad_inputs_name_the_parameter():
  with pytest.raises(ValueError, match="bits"):
    T.rtn(bits=5)
  with pytest.raises(ValueError, match="group_size"):
    T.rtn(bits=4, group_size=0)
  with pytest.raises(ValueError, match=r"layers/0/attn/q_proj/kernel.*group_size=96.*K=64"):
    T.apply(T.rtn(bits=4, group_size=96), _params())  # 96 divides neither 64 nor 128


def test_nnx_state_in_nnx_state_out():
  model = tiny.tiny_model()
  state = nnx.state(model, nnx.Param)
  new_state, _ = T.apply(T.rtn(bits=4, group_size=32), state)
  assert isinstance(new_state, nnx.State)
  k = new_state["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
  assert isinstance(k, formats.QuantizedArray)
  # The caller's state is untouched.
  assert isinstance(state["layers"][0]["mlp"]["up_proj"]["kernel"].get_value(), jax.Array)
  nnx.update(model, new_state)
  assert model(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 300)


def test_rtn_output_error_decreases_with_bits_on_the_tiny_model():
  model = tiny.tiny_model(seed=7)
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 16)), jnp.int32)
  ref = model(toks)
  errs = []
  from compressjax.io import build_model
  for bits in (2, 3, 4, 8):
    q, _ = T.apply(T.rtn(bits=bits, group_size=32), model_params(model))
    errs.append(float(jnp.mean((build_model(model.cfg, q)(toks) - ref) ** 2) / jnp.mean(ref**2)))
  assert errs == sorted(errs, reverse=True), errs
  assert errs[-1] < 1e-3 < errs[0]  # relative logit error: 8 bits is near lossless, 2 bits is not


def test_a_transform_that_selects_nothing_is_an_error_not_a_no_op():
  only_embed = {"embed": {"embedding": jnp.ones((32, 64))}}
  with pytest.raises(T.UnmatchedRuleError, match="rtn.*selects none"):
    T.apply(T.rtn(bits=4), only_embed)
  # Inside a rule the default selection is the rule's: a non-standard path is quantized...
  out, _ = T.apply(T.select((r"embed/embedding", T.rtn(bits=8))), only_embed)
  assert isinstance(out["embed"]["embedding"], formats.QuantizedArray)
  # ...while an explicit `where` still applies on top of the rule and must select something.
  with pytest.raises(T.UnmatchedRuleError, match="selects none"):
    T.apply(T.select((r"embed/embedding", T.rtn(bits=8, where=r".*kernel"))), only_embed)
