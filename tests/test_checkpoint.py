"""Orbax checkpoints: exact round trip of compressed trees, atomicity, damage detection."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import checkpoint, formats, transforms as T
from compressjax.io import build_model, model_params


@pytest.fixture(scope="module")
def qparams():
  model = tiny.tiny_model(seed=2)
  t = T.select((r".*down_proj/kernel", T.rtn(bits=3, group_size=32, symmetric=False)),
               (r".*_proj/kernel", T.rtn(bits=4, group_size=64)))
  return model, T.apply(t, model_params(model))[0]


def _assert_same(a, b):
  fa, ta = jax.tree_util.tree_flatten(a)
  fb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(fa, fb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_exact_and_model_runs(tmp_path, qparams):
  model, q = qparams
  path = checkpoint.save(str(tmp_path / "ck"), q, metadata={"note": "x"})
  restored, meta = checkpoint.restore(path)
  assert meta == {"note": "x"}
  _assert_same(q, restored)
  k = restored["layers"][1]["mlp"]["down_proj"]["kernel"]
  assert isinstance(k, formats.QuantizedArray) and k.bits == 3 and not k.symmetric
  toks = jnp.arange(10, dtype=jnp.int32)[None]
  np.testing.assert_array_equal(build_model(model.cfg, restored)(toks), build_model(model.cfg, q)(toks))
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries left


def test_refuses_overwrite_and_replaces_atomically(tmp_path, qparams):
  _, q = qparams
  path = str(tmp_path / "ck")
  checkpoint.save(path, q)
  with pytest.raises(FileExistsError, match="ck"):
    checkpoint.save(path, q)
  checkpoint.save(path, {"a": jnp.ones(3)}, overwrite=True)
  restored, _ = checkpoint.restore(path)
  assert list(restored) == ["a"]
  assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_failed_save_leaves_nothing(tmp_path):
  class Boom:
    def save(self, path):
      raise RuntimeError("disk full")
  with pytest.raises(RuntimeError, match="disk full"):
    checkpoint.save(str(tmp_path / "ck"), {"a": jnp.ones(3)}, tokenizer=Boom())
  assert os.listdir(tmp_path) == []


def test_missing_partial_and_corrupted(tmp_path, qparams):
  _, q = qparams
  with pytest.raises(checkpoint.CheckpointError, match="no such directory"):
    checkpoint.restore(str(tmp_path / "nope"))
  path = checkpoint.save(str(tmp_path / "ck"), q)
  # Corrupt one stored value: flip the manifest's checksum of one array.
  mpath = os.path.join(path, "manifest.json")
  m = json.load(open(mpath))
  leaf = m["leaves"]["layers/0/attn/q_proj/kernel"]
  leaf["crc32"]["packed"] ^= 1
  json.dump(m, open(mpath, "w"))
  with pytest.raises(checkpoint.CheckpointError, match="layers/0/attn/q_proj/kernel/packed.*checksum"):
    checkpoint.restore(path)
  # Truncated manifest.
  open(mpath, "w").write("{")
  with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
    checkpoint.restore(path)
  os.remove(mpath)
  with pytest.raises(checkpoint.CheckpointError, match="manifest.json is missing"):
    checkpoint.restore(path)
  # Arrays gone (partial copy).
  path2 = checkpoint.save(str(tmp_path / "ck2"), q)
  import shutil
  shutil.rmtree(os.path.join(path2, "arrays"))
  with pytest.raises(checkpoint.CheckpointError, match="arrays/ is missing"):
    checkpoint.restore(path2)


def test_damaged_array_files_are_detected(tmp_path):
  path = checkpoint.save(str(tmp_path / "ck"), {"w": jnp.arange(4096, dtype=jnp.float32)})
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(path, "arrays")) for f in fs
           if os.path.getsize(os.path.join(r, f)) > 4096]
  assert files, "expected a data file holding the array"
  with open(files[0], "r+b") as f:  # overwrite a stretch in the middle of the data
    f.seek(os.path.getsize(files[0]) // 2)
    f.write(b"\xff" * 64)
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.restore(path)
