"""3-bit code layout 2 (10 codes per uint32): old (layout-1 bitstream) checkpoints convert on restore.

The old checkpoint is written by this library's own code with the old packing put back
(``packing.pack`` / ``packed_length`` of the bitstream, ``FORMAT_VERSION = 2``), so every format
that packs 3-bit codes is covered the way it was really stored.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import checkpoint, formats
from compressjax.formats import packing

K, N = 80, 8  # 80 codes: 8 words per column now, 9 (3 blocks of 32) as a bitstream


def _leaves():
  rng = np.random.default_rng(0)
  codes = jnp.asarray(rng.integers(0, 8, (K, N)), jnp.uint8)
  scale = jnp.asarray(rng.uniform(0.5, 1.0, (K // 16, N)), jnp.float16)
  zero = jnp.asarray(rng.normal(size=(K // 16, N)), jnp.float16)
  q = formats.QuantizedArray.from_codes(codes, scale, zero, bits=3, group_size=16,
                                        symmetric=False)
  keep = jnp.asarray(rng.random((K, N)) < 0.3)
  bm = formats.BitmaskSparse.from_codes(codes, keep, scale, None, bits=3, group_size=16,
                                        symmetric=True)
  w = jnp.asarray(rng.normal(size=(K, N)), jnp.float32)
  blk = np.argsort(rng.random((K // 8, 8, N)), axis=1) < 4  # 4:8, 3-bit indices
  nm = formats.NMSparse.from_dense(w, jnp.asarray(blk.reshape(K, N)), n=4, m=8)
  vcodes = rng.integers(0, 8, (K // 2, N))
  cb = jnp.asarray(rng.normal(size=(K // 16, 2, 8, 2)), jnp.float16)
  vq = formats.VQArray.from_codes(vcodes, cb, jnp.ones((K // 16, 2), jnp.float16), dim=2,
                                  group_size=16, out_block=4)
  acodes = rng.integers(0, 8, (K // 8, N, 2))
  acb = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float16)
  add = formats.AdditiveCodebookArray.from_codes(acodes, acb, jnp.ones((N,), jnp.float16),
                                                 nbits=3)
  q4 = formats.QuantizedArray.from_codes(codes, scale, None, bits=4, group_size=16,
                                         symmetric=True)
  return {"q": q, "sum": formats.SumArray((q4, bm), shape=(K, N), dtype=jnp.float32), "nm": nm, "vq": vq, "add": add,
          "dense": w}


def _write_old(path, monkeypatch):
  """A version-2 checkpoint exactly as the code before layout 2 wrote it."""
  with monkeypatch.context() as m:
    m.setattr(packing, "pack", packing.pack_stream)
    m.setattr(packing, "packed_length", packing.stream_length)
    m.setattr(packing, "unpack", packing.unpack_stream)
    m.setattr(checkpoint, "FORMAT_VERSION", 2)
    old = _leaves()
    assert old["q"].packed.shape == (9, N)  # the bitstream
    checkpoint.save(path, old)
    dense = {k: np.asarray(_dense(v)) for k, v in old.items()}
  with open(os.path.join(path, "manifest.json")) as f:
    assert json.load(f)["format_version"] == 2
  return dense


def _dense(x):
  return x.materialize() if isinstance(x, formats.CompressedArray) else x


def test_new_layout_bytes():
  q = formats.QuantizedArray.from_codes(jnp.zeros((K, N), jnp.uint8), jnp.ones((5, N)), None,
                                        bits=3, group_size=16, symmetric=True)
  assert q.packed.shape == (8, N) and packing.packed_length(1536, 3) == 154
  # 3.2 bits per code: 1530 codes in 153 words.
  assert formats.QuantizedArray.from_codes(
      jnp.zeros((1530, 4), jnp.uint8), jnp.ones((1, 4), jnp.float32), None, bits=3,
      group_size=1530, symmetric=True).packed.nbytes == 153 * 4 * 4


def test_old_checkpoint_is_converted_on_restore(tmp_path, monkeypatch):
  old = _write_old(str(tmp_path / "old"), monkeypatch)
  new = _leaves()
  restored, _ = checkpoint.restore(str(tmp_path / "old"))
  for name in new:
    got, want = restored[name], new[name]
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), name
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    np.testing.assert_array_equal(np.asarray(_dense(got)), old[name], err_msg=name)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, K)), jnp.float32)
  np.testing.assert_allclose(np.asarray(formats.dot(x, restored["q"])),
                             np.asarray(x @ new["q"].materialize()), rtol=1e-5, atol=1e-5)
  # Saved again, it is a version-3 checkpoint in the new layout.
  checkpoint.save(str(tmp_path / "new"), restored)
  assert checkpoint.read_manifest(str(tmp_path / "new"))["format_version"] == 3
  again, _ = checkpoint.restore(str(tmp_path / "new"))
  assert again["q"].packed.shape == (8, N)


def test_unreadable_versions_and_bad_old_leaves_are_refused(tmp_path, monkeypatch):
  path = str(tmp_path / "old")
  _write_old(path, monkeypatch)
  mpath = os.path.join(path, "manifest.json")
  with open(mpath) as f:
    manifest = json.load(f)
  manifest["format_version"] = 1
  with open(mpath, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(checkpoint.CheckpointError, match=r"format_version 1 is not readable"):
    checkpoint.restore(path)
  # A version-3 manifest over layout-1 words: the shapes do not fit the new layout.
  manifest["format_version"] = 3
  with open(mpath, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(ValueError, match=r"must (have shape|be uint32)"):
    checkpoint.restore(path)


def test_upgrade_names_the_child_with_a_wrong_word_count():
  from compressjax.formats import legacy
  static = dict(bits=3, group_size=16, shape=(K, N), symmetric=True, dtype=np.float32)
  fields = dict(packed=np.zeros((8, N), np.uint32), scale=np.ones((5, N), np.float32), zero=None)
  with pytest.raises(ValueError, match=r"ckpt\.packed: a layout-1 3-bit bitstream of 80 codes "
                                       r"has 9 words"):
    legacy.upgrade_fields(formats.QuantizedArray, static, fields, layout=1, where="ckpt")
  with pytest.raises(ValueError, match="layout 7"):
    legacy.upgrade_fields(formats.QuantizedArray, static, fields, layout=7, where="ckpt")
