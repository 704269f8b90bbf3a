"""Untrusted files never run code: the calibration resume state is data only."""

import json
import os
import pickle
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import tiny
from compressjax import calibration, checkpoint, transforms as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _windows(n=4, t=16, seed=0):
  return np.random.default_rng(seed).integers(0, 300, (n, t)).astype(np.int32)


def _assert_identical(a, b, at="state"):
  """Equal values of the same types: NamedTuple class, tuple vs list, dict key types,
  numpy vs jax arrays with dtype and shape."""
  assert type(a) is type(b), f"{at}: {type(a)} != {type(b)}"
  if isinstance(a, dict):
    assert list(a) == list(b), f"{at}: keys {list(a)} != {list(b)}"
    for k in a:
      assert type(k) is type(next(kb for kb in b if kb == k)), f"{at}: key type of {k!r}"
      _assert_identical(a[k], b[k], f"{at}[{k!r}]")
  elif isinstance(a, (tuple, list)):
    assert len(a) == len(b), at
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_identical(x, y, f"{at}[{i}]")
  elif isinstance(a, (np.ndarray, np.generic, jax.Array)):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{at}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=at)
  else:
    assert a == b or (a != a and b != b), f"{at}: {a!r} != {b!r}"  # NaN == NaN here


class _Prefixes:
  def block_prefix(self, i):
    return f"layers/{i}/"


def _through_resume_dir(tmp_path, state, block=None):
  block = block if block is not None else {"w": jnp.ones((2, 2))}
  d = str(tmp_path / "resume")
  calibration._save_resume(d, "fp", 0, np.zeros((1, 2, 3), np.float32), block, state)
  nxt, x, back, done = calibration._try_resume(d, "fp", None, None, _Prefixes())
  assert nxt == 1 and x.shape == (1, 2, 3) and sorted(done) == ["layers/0/" + p for p in block]
  return back


def _recipes(cfg):
  return {
      "chain(awq, gptq)": T.chain(T.awq(4, 32, n_grid=4), T.gptq(4, 32, blocksize=16)),
      "select(rtn, gptq, keep)": T.select((r".*down_proj/kernel", T.rtn(3, 32)),
                                          (r".*q_proj/kernel", T.gptq(4, 32, blocksize=16)),
                                          (r".*", None)),
      "chain(structured, sparsegpt)": T.chain(
          T.structured(0.3, prune_heads=True, head_dim=cfg.head_dim,
                       num_kv_heads=cfg.num_kv_heads, multiple_of=16),
          T.sparsegpt(0.5)),
  }


@pytest.mark.parametrize("name", ["chain(awq, gptq)", "select(rtn, gptq, keep)",
                                  "chain(structured, sparsegpt)"])
def test_transform_states_round_trip_through_the_resume_dir(tmp_path, name):
  model = tiny.tiny_model(seed=5, num_layers=1)
  transform = _recipes(model.cfg)[name]
  _, state = calibration.run_sequential(model, _windows(), transform, batch_size=4,
                                        progress=False)
  spec, arrays = checkpoint.encode_pytree(state)
  json.dumps(spec)  # plain JSON
  _assert_identical(state, _through_resume_dir(tmp_path, state))


def test_plain_values_keep_their_types(tmp_path):
  state = T.ChainState((
      {3: np.arange(4, dtype=np.int32), "3": jnp.ones((2, 3), jnp.bfloat16)},
      T.LeafwiseState(("a/kernel", "b/kernel")),
      ["list", 1, 2.5, float("nan"), True, None],
      (np.float32(0.25), np.int64(7), np.ones((0, 2), ml_dtypes.bfloat16)),
      T.StructuredState({"layers/0/mlp/down_proj/kernel": np.array([0, 2], np.int32)}),
      None, {}, (), "s",
  ))
  back = _through_resume_dir(tmp_path, state)
  _assert_identical(state, back)
  assert isinstance(back.inner[0]["3"], jax.Array) and isinstance(back.inner[0][3], np.ndarray)
  assert isinstance(back.inner[2], list) and isinstance(back.inner[3], tuple)


class _MyState(NamedTuple):
  step: int


def test_encode_refuses_what_is_not_data():
  with pytest.raises(TypeError, match=r"\['a'\]\[1\] is a builtins.object"):
    checkpoint.encode_pytree({"a": (1, object())})
  with pytest.raises(TypeError, match=r"_MyState named tuple, which is not registered"):
    checkpoint.encode_pytree(_MyState(1))
  with pytest.raises(TypeError, match="dict key .* is a float"):
    checkpoint.encode_pytree({1.5: 1})
  with pytest.raises(TypeError, match="NamedTuple class"):
    checkpoint.register_state_class(dict)
  checkpoint.register_state_class(_MyState)
  spec, arrays = checkpoint.encode_pytree(_MyState(3))
  assert checkpoint.decode_pytree(spec, arrays) == _MyState(3)


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _rewrite_state(resume, spec):
  mpath = os.path.join(resume, "latest", "manifest.json")
  m = json.load(open(mpath))
  m["metadata"]["state"] = spec
  json.dump(m, open(mpath, "w"))


def test_resume_dir_with_a_pickle_or_unknown_class_is_refused(tmp_path):
  params = {"w": jnp.ones((2, 2))}
  resume = str(tmp_path / "resume")
  calibration._save_resume(resume, "fp", 0, np.zeros((1, 2, 3)), params, T.LeafwiseState(("w",)))
  marker = tmp_path / "unpickled"
  # What the old code wrote: a hex pickle. It is never unpickled.
  _rewrite_state(resume, pickle.dumps(_Exploit(str(marker))).hex())
  with pytest.raises(checkpoint.CheckpointError, match="resume.*not written by encode_pytree"):
    calibration._try_resume(resume, "fp", None, None, _Prefixes())
  assert not marker.exists()
  # A class outside the allow-list, even a real one.
  _rewrite_state(resume, {"encoding": "compressjax.pytree/1",
                          "tree": {"namedtuple": "os:system", "fields": ["touch x"]}})
  with pytest.raises(checkpoint.CheckpointError, match="unknown state class 'os:system'"):
    calibration._try_resume(resume, "fp", None, None, _Prefixes())
  _rewrite_state(resume, {"encoding": "compressjax.pytree/1", "tree": {"__reduce__": [1]}})
  with pytest.raises(checkpoint.CheckpointError, match="unexpected entry"):
    calibration._try_resume(resume, "fp", None, None, _Prefixes())


def test_no_pickle_in_the_library():
  hits = []
  for d, _, files in os.walk(os.path.join(REPO, "compressjax")):
    for n in files:
      if n.endswith(".py"):
        text = open(os.path.join(d, n), encoding="utf-8").read()
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b|pickle\.loads?\(", text,
                     re.M):
          hits.append(n)
  assert not hits
