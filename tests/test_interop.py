"""Compressed kernels in models that are not compressjax's Llama (compressjax.interop)."""

import functools
import os
import re
import runpy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compressjax import formats, interop, transforms as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = r".*/kernel"
D_IN, D_HID, D_OUT = 64, 128, 32


def _inputs(n, seed):
  """Correlated, unevenly scaled features (as real activations are): where GPTQ helps."""
  rng = np.random.default_rng(seed)
  mix = np.random.default_rng(0).normal(size=(D_IN, D_IN)) * np.geomspace(0.1, 3.0, D_IN)
  return jnp.asarray(rng.normal(size=(n, D_IN)) @ mix / 4, jnp.float32)


class LinenMLP(nn.Module):
  """Two Dense layers and a residual projection; ``hooks`` plugs in compressjax.interop."""
  hooks: bool = True

  @nn.compact
  def __call__(self, x):
    kw = dict(dot_general=interop.dot_general, promote_dtype=interop.promote_dtype) if self.hooks else {}
    h = nn.gelu(nn.Dense(D_HID, name="up", **kw)(x))
    return nn.Dense(D_OUT, name="down", **kw)(h) + nn.Dense(D_OUT, use_bias=False, name="skip", **kw)(x)


def _dense_of(q):
  return jax.tree.map(formats.materialize, q, is_leaf=formats.is_compressed)


def _close(a, b):
  err = float(jnp.max(jnp.abs(a - b)))
  assert err <= 1e-5 * float(jnp.max(jnp.abs(b))), err


@pytest.fixture(scope="module")
def linen_setup():
  model = LinenMLP()
  cal, held = _inputs(512, 1), _inputs(256, 2)
  params = model.init(jax.random.key(0), cal[:1])["params"]
  return model, params, cal, held


def test_linen_dense_runs_compressed_kernels_under_jit_exactly(linen_setup):
  model, params, cal, held = linen_setup
  stats = interop.linen_stats(model, {"params": params}, [cal[:256], cal[256:]])
  assert sorted(stats) == ["down/kernel", "skip/kernel", "up/kernel"]
  assert float(stats["up/kernel"].n) == 512.0
  np.testing.assert_allclose(stats["up/kernel"].hessian, cal.T @ cal, rtol=1e-4, atol=1e-2)
  run = jax.jit(lambda p, x: interop.linen_apply(model, {"params": p}, x))
  stock = jax.jit(lambda p, x: LinenMLP(hooks=False).apply({"params": p}, x))
  ref = stock(params, held)
  _close(run(params, held), ref)  # the hooks change nothing for dense kernels
  err = {}
  for name, t, st in [("rtn", T.rtn(bits=3, group_size=32, where=KERNELS), None),
                      ("gptq", T.gptq(bits=3, group_size=32, where=KERNELS), stats)]:
    q, _ = T.apply(t, params, st)
    assert all(isinstance(q[m]["kernel"], formats.QuantizedArray) for m in ("up", "down", "skip"))
    assert formats.tree_nbytes(q) < formats.tree_nbytes(params) / 4
    y = run(q, held)
    _close(y, stock(_dense_of(q), held))  # compressed leaves == stock Dense on materialized kernels
    err[name] = float(jnp.mean((y - ref) ** 2))
  print("held-out output MSE", err)
  assert err["gptq"] < 0.9 * err["rtn"], err


def test_linen_needs_the_wrapper_and_says_so(linen_setup):
  model, params, _, held = linen_setup
  q, _ = T.apply(T.rtn(bits=4, group_size=32, where=KERNELS), params)
  with pytest.raises(Exception, match="shape"):  # Scope.param's check on the packed codes
    model.apply({"params": q}, held)
  with pytest.raises(TypeError):  # a LinenKernel is no jit argument: wrap inside the function
    jax.jit(lambda v: v)(interop.for_linen(q))


class NnxMLP(nnx.Module):

  def __init__(self, rngs, hooks=True):
    kw = dict(dot_general=interop.dot_general, promote_dtype=interop.nnx_promote_dtype) if hooks else {}
    self.up = nnx.Linear(D_IN, D_HID, rngs=rngs, **kw)
    self.down = nnx.Linear(D_HID, D_OUT, rngs=rngs, **kw)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)))


def test_nnx_linear_runs_compressed_kernels_under_jit_exactly():
  cal, held = _inputs(512, 3), _inputs(256, 4)
  model = NnxMLP(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  stats = interop.nnx_stats(model, [cal])
  assert sorted(stats) == ["down/kernel", "up/kernel"]
  assert model.up.dot_general is interop.dot_general  # restored
  ref = nnx.jit(lambda m, x: m(x))(model, held)
  err = {}
  for name, t, st in [("rtn", T.rtn(bits=3, group_size=32, where=KERNELS), None),
                      ("gptq", T.gptq(bits=3, group_size=32, where=KERNELS), stats)]:
    q, _ = T.apply(t, params, st)
    qmodel = NnxMLP(nnx.Rngs(0))
    nnx.update(qmodel, q)
    assert isinstance(qmodel.up.kernel.get_value(), formats.QuantizedArray)
    y = nnx.jit(lambda m, x: m(x))(qmodel, held)
    dense = NnxMLP(nnx.Rngs(0), hooks=False)
    nnx.update(dense, jax.tree.map(formats.materialize, q, is_leaf=formats.is_compressed))
    _close(y, dense(held))
    err[name] = float(jnp.mean((y - ref) ** 2))
  print("held-out output MSE", err)
  assert err["gptq"] < 0.9 * err["rtn"], err


def test_plain_dot_general():
  x = _inputs(8, 5)[:, None, :].repeat(3, axis=1)  # (8, 3, K): any leading dims
  w = jax.random.normal(jax.random.key(1), (D_IN, D_OUT))
  q, _ = T.apply(T.rtn(bits=4, group_size=32, where=".*"), {"w": w})
  dims = (((2,), (0,)), ((), ()))
  y = jax.jit(lambda x, q: interop.dot_general(x, q, dims))(x, q["w"])
  _close(y, jax.lax.dot_general(x, q["w"].materialize(), dims))
  assert y.dtype == jnp.float32 and y.shape == (8, 3, D_OUT)
  yb = interop.dot_general(x.astype(jnp.bfloat16), q["w"], dims, preferred_element_type=jnp.float32)
  assert yb.dtype == jnp.float32
  assert interop.dot_general(x.astype(jnp.bfloat16), q["w"], dims).dtype == jnp.bfloat16
  np.testing.assert_array_equal(interop.dot_general(x, w, dims), jax.lax.dot_general(x, w, dims))
  for precision in ("highest", jax.lax.Precision.DEFAULT, (None, None), (None, "high")):
    _close(interop.dot_general(x, q["w"], dims, precision=precision), y)
  with pytest.raises(NotImplementedError, match="supports only"):
    interop.dot_general(x, q["w"], (((2,), (1,)), ((), ())))
  with pytest.raises(TypeError, match="only w"):
    q["w"][0]


def _readme_snippet():
  text = open(os.path.join(REPO, "README.md")).read()
  section = text.split("## Use in your own model", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_and_example_run(capsys):
  exec(compile(_readme_snippet(), "README.md", "exec"), {})  # pylint: disable=exec-used
  errors = runpy.run_path(os.path.join(REPO, "examples", "linen_model.py"))["main"]()
  out = capsys.readouterr().out
  assert "gptq" in out and "rtn" in out
  assert errors["gptq"] < 0.9 * errors["rtn"], errors


class Block(nn.Module):
  """A pre-norm residual MLP block (no attention: enough for the engine's interface)."""

  @nn.compact
  def __call__(self, x):
    kw = dict(dot_general=interop.dot_general, promote_dtype=interop.promote_dtype)
    h = nn.Dense(D_HID, name="up", **kw)(nn.LayerNorm(name="norm")(x))
    return x + nn.Dense(D_IN, name="down", **kw)(nn.gelu(h))


class TinyLM(nn.Module):
  vocab: int = 200

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, D_IN, name="embed")(tokens)
    for i in range(2):
      x = Block(name=f"block_{i}")(x)
    return nn.Dense(self.vocab, name="head", dot_general=interop.dot_general,
                    promote_dtype=interop.promote_dtype)(x)


def test_linen_blocks_in_the_calibration_engine():
  from compressjax import calibration
  rng = np.random.default_rng(0)
  nxt = rng.integers(0, 200, (200, 3))  # a bigram chain: text-like token statistics
  tok = np.zeros((40, 32), np.int32)
  tok[:, 0] = rng.integers(0, 200, 40)
  for t in range(1, 32):
    tok[:, t] = nxt[tok[:, t - 1], rng.integers(0, 3, 40)]
  cal, held = tok[:32], jnp.asarray(tok[32:])
  lm = TinyLM()
  params = lm.init(jax.random.key(0), held[:1])["params"]
  engine = interop.LinenBlocks(params, Block(), ["block_0", "block_1"],
                               embed=lambda outside, t: outside["embed/embedding"][t])
  assert sorted(engine.linear_inputs) == ["down/kernel", "up/kernel"]
  run = jax.jit(lambda p, t: interop.linen_apply(lm, {"params": p}, t))
  ref = run(params, held)
  where = r"block_\d+/(up|down)/kernel"
  err = {}
  for name, t in [("rtn", T.rtn(bits=3, group_size=32, where=where)),
                  ("gptq", T.gptq(bits=3, group_size=32, where=where))]:
    q, _ = calibration.run_sequential(engine, cal, t, batch_size=16, progress=False)
    assert isinstance(q["block_1"]["down"]["kernel"], formats.QuantizedArray)
    assert not formats.is_compressed(q["head"]["kernel"])
    y = run(q, held)
    _close(y, run(_dense_of(q), held))
    err[name] = float(jnp.mean((y - ref) ** 2))
  print("held-out output MSE", err)
  assert err["gptq"] < 0.9 * err["rtn"], err
  with pytest.raises(ValueError, match="block_names"):
    interop.LinenBlocks(params, Block(), ["blocks_0"], embed=None)
