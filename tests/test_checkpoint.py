"""Orbax checkpoints: exact round trip of compressed trees, atomicity, damage detection."""

import dataclasses
import errno
import json
import os
import sys

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
  with pytest.raises(checkpoint.CheckpointError, match="ck.*failed: RuntimeError: disk full"):
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


# ------------------------------------------------------------------------------------------
# Saving never deletes what it did not write.
# ------------------------------------------------------------------------------------------


def _tree(root):
  """``{relative path: file bytes or None (directory)}`` of everything under ``root``."""
  out = {}
  for d, dirs, files in os.walk(root):
    for n in dirs:
      out[os.path.relpath(os.path.join(d, n), root)] = None
    for n in files:
      with open(os.path.join(d, n), "rb") as f:
        out[os.path.relpath(os.path.join(d, n), root)] = f.read()
  return out


def test_save_refuses_to_replace_foreign_paths(tmp_path):
  params = {"a": jnp.ones(3)}
  # A plain file, even with overwrite=True.
  f = tmp_path / "notes.txt"
  f.write_text("precious")
  with pytest.raises(checkpoint.CheckpointExistsError, match="notes.txt.*existing file"):
    checkpoint.save(str(f), params, overwrite=True)
  assert f.read_text() == "precious"
  # A directory of the user's files, and a model directory.
  for name, files in (("docs", {"a.txt": "x", "sub/b.txt": "y"}),
                      ("model", {"config.json": "{}", "model.safetensors": "w"})):
    d = tmp_path / name
    for rel, text in files.items():
      (d / rel).parent.mkdir(parents=True, exist_ok=True)
      (d / rel).write_text(text)
    before = _tree(str(d))
    with pytest.raises(checkpoint.CheckpointExistsError, match=f"{name}.*not a compressjax"):
      checkpoint.save(str(d), params, overwrite=True)
    assert _tree(str(d)) == before
  # A checkpoint into which the user put a file of their own.
  ck = checkpoint.save(str(tmp_path / "ck"), params)
  (tmp_path / "ck" / "README").write_text("mine")
  with pytest.raises(checkpoint.CheckpointExistsError, match="README"):
    checkpoint.save(ck, params, overwrite=True)
  assert (tmp_path / "ck" / "README").read_text() == "mine"
  # A symbolic link (to a checkpoint) is not replaced either.
  ck2 = checkpoint.save(str(tmp_path / "ck2"), params)
  os.symlink(ck2, tmp_path / "link")
  with pytest.raises(checkpoint.CheckpointExistsError, match="symbolic link"):
    checkpoint.save(str(tmp_path / "link"), params, overwrite=True)
  # An empty directory may be replaced, without overwrite.
  (tmp_path / "empty").mkdir()
  checkpoint.save(str(tmp_path / "empty"), params)
  assert list(checkpoint.restore(str(tmp_path / "empty"))[0]) == ["a"]
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_check_output_path(tmp_path):
  model_dir = tmp_path / "models" / "m"
  model_dir.mkdir(parents=True)
  (model_dir / "config.json").write_text("{}")
  ok = checkpoint.check_output_path(str(tmp_path / "out" / "ck"), overwrite=False,
                                    forbidden=[str(model_dir)])
  assert ok == str(tmp_path / "out" / "ck")
  assert sorted(os.listdir(tmp_path)) == ["models"]  # the check creates nothing
  for target, how in ((model_dir, "is the input"), (model_dir / "ck", "is inside the input"),
                      (tmp_path / "models", "contains the input")):
    with pytest.raises(checkpoint.CheckpointError, match=f"{how} .*m'"):
      checkpoint.check_output_path(str(target), overwrite=True, forbidden=[str(model_dir)])
  # The model directory reached through a symbolic link is still the model directory.
  os.symlink(model_dir, tmp_path / "alias")
  with pytest.raises(checkpoint.CheckpointError, match="is inside the input"):
    checkpoint.check_output_path(str(tmp_path / "alias" / "ck"), overwrite=True,
                                 forbidden=[str(model_dir)])
  # Existing paths follow save's rules.
  with pytest.raises(checkpoint.CheckpointExistsError, match="not a compressjax checkpoint"):
    checkpoint.check_output_path(str(tmp_path / "models"), overwrite=True)
  ck = checkpoint.save(str(tmp_path / "ck"), {"a": jnp.ones(3)})
  with pytest.raises(checkpoint.CheckpointExistsError, match="overwrite=True"):
    checkpoint.check_output_path(ck, overwrite=False)
  assert checkpoint.check_output_path(ck, overwrite=True) == ck
  # A parent that cannot be created, and too little room.
  (tmp_path / "afile").write_text("x")
  with pytest.raises(checkpoint.CheckpointError, match="afile.*not a directory"):
    checkpoint.check_output_path(str(tmp_path / "afile" / "ck"), overwrite=False)
  with pytest.raises(checkpoint.CheckpointError, match=r"bytes free .*need at least"):
    checkpoint.check_output_path(str(tmp_path / "big"), overwrite=False, min_free_bytes=2**62)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_check_output_path_unwritable_parent(tmp_path, monkeypatch):
  import tempfile

  def denied(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")

  monkeypatch.setattr(tempfile, "mkstemp", denied)  # a read-only directory (even for root)
  with pytest.raises(checkpoint.CheckpointError, match=r"ck.*cannot write in .*Permission denied"):
    checkpoint.check_output_path(str(tmp_path / "ck"), overwrite=False)


def test_disk_full_during_save_reports_cause_and_leaves_nothing(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  def full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/x/arrays/d/0.data")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"out/ck.*disk is full .*\d+ bytes free") as info:
    checkpoint.save(str(tmp_path / "out" / "ck"), {"a": jnp.ones(3)})
  assert isinstance(info.value.__cause__, OSError)
  assert sorted(os.listdir(tmp_path)) == before  # no temporaries, no created parent


def test_async_failure_is_unburied_and_old_checkpoint_kept(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  ck = checkpoint.save(str(tmp_path / "ck"), {"old": jnp.ones(3)})
  before = _tree(str(tmp_path))

  def closed_loop(self):  # orbax's background commit fails; the caller sees only this
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
      raise RuntimeError("Event loop is closed") from e

  monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", closed_loop)
  with pytest.raises(checkpoint.CheckpointError, match="disk is full"):
    checkpoint.save(ck, {"new": jnp.ones(3)}, overwrite=True)
  assert _tree(str(tmp_path)) == before
  monkeypatch.undo()
  assert list(checkpoint.restore(ck)[0]) == ["old"]


def test_bad_metadata_is_a_type_error_before_writing(tmp_path):
  with pytest.raises(TypeError, match="metadata is not JSON-serializable"):
    checkpoint.save(str(tmp_path / "ck"), {"a": jnp.ones(3)}, metadata={"f": object()})
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# Restoring runs no code and reads nothing outside the checkpoint.
# ------------------------------------------------------------------------------------------


def test_restore_never_imports_a_module_named_by_the_manifest(tmp_path, monkeypatch):
  path = checkpoint.save(str(tmp_path / "ck"), {"w": formats.Transposed(jnp.ones((2, 3)))})
  marker = tmp_path / "pwned"
  (tmp_path / "ck" / "evil_mod.py").write_text(
      f"open({str(marker)!r}, 'w').write('ran')\nclass Thing: pass\n")
  mpath = os.path.join(path, "manifest.json")
  m = json.load(open(mpath))
  m["leaves"]["w"]["tree"]["class"] = "evil_mod:Thing"
  json.dump(m, open(mpath, "w"))
  monkeypatch.syspath_prepend(path)
  monkeypatch.chdir(path)
  with pytest.raises(checkpoint.CheckpointError, match="unknown compressed format 'evil_mod:Thing'"):
    checkpoint.restore(path)
  assert not marker.exists() and "evil_mod" not in sys.modules
  # A real module, but not a registered format, is refused the same way.
  m["leaves"]["w"]["tree"]["class"] = "os:system"
  json.dump(m, open(mpath, "w"))
  with pytest.raises(checkpoint.CheckpointError, match="unknown compressed format 'os:system'"):
    checkpoint.restore(path)


def test_register_user_format(tmp_path):
  @dataclasses.dataclass(frozen=True, eq=False, repr=False)
  class MyTransposed(formats.Transposed):
    pass

  jax.tree_util.register_dataclass(MyTransposed, data_fields=["inner"], meta_fields=[])
  params = {"w": MyTransposed(jnp.arange(6.0).reshape(2, 3))}
  with pytest.raises(TypeError, match="MyTransposed.*not registered"):
    checkpoint.save(str(tmp_path / "ck"), params)
  with pytest.raises(TypeError, match="CompressedArray subclass"):
    checkpoint.register_format(dict)
  assert checkpoint.register_format(MyTransposed) is MyTransposed
  back, _ = checkpoint.restore(checkpoint.save(str(tmp_path / "ck"), params))
  assert type(back["w"]) is MyTransposed
  np.testing.assert_array_equal(back["w"].materialize(), params["w"].materialize())


def test_restore_refuses_symlinks_leaving_the_checkpoint(tmp_path):
  path = checkpoint.save(str(tmp_path / "ck"), {"a": jnp.ones(3)})
  outside = tmp_path / "outside.json"
  os.replace(os.path.join(path, "manifest.json"), outside)
  os.symlink(outside, os.path.join(path, "manifest.json"))
  with pytest.raises(checkpoint.CheckpointError, match="'manifest.json' resolves to .*outside"):
    checkpoint.restore(path)
  os.remove(os.path.join(path, "manifest.json"))
  os.replace(outside, os.path.join(path, "manifest.json"))
  # An array file replaced by a link to a file elsewhere.
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(path, "arrays")) for f in fs]
  victim = files[0]
  os.replace(victim, tmp_path / "moved")
  os.symlink(tmp_path / "moved", victim)
  with pytest.raises(checkpoint.CheckpointError, match="resolves to .*moved.*outside"):
    checkpoint.restore(path)
  # Links inside the directory are fine; the directory itself may be reached through a link.
  os.remove(victim)
  os.replace(tmp_path / "moved", victim)
  os.symlink(path, tmp_path / "alias")
  assert list(checkpoint.restore(str(tmp_path / "alias"))[0]) == ["a"]


def test_empty_arrays_and_empty_trees_round_trip(tmp_path):
  params = {"e": jnp.zeros((0, 4), jnp.bfloat16), "w": jnp.arange(3.0)}
  _assert_same(params, checkpoint.restore(checkpoint.save(str(tmp_path / "a"), params))[0])
  back, meta = checkpoint.restore(checkpoint.save(str(tmp_path / "b"), {"e": jnp.zeros((0,))},
                                                  metadata={"k": 1}))
  assert back["e"].shape == (0,) and meta == {"k": 1}


def test_64_bit_arrays_are_not_silently_narrowed(tmp_path):
  params = {"i": np.array([2**40, -3], np.int64), "f": np.array([1e-300], np.float64)}
  back, _ = checkpoint.restore(checkpoint.save(str(tmp_path / "ck"), params))
  for k, v in params.items():
    assert back[k].dtype == v.dtype
    np.testing.assert_array_equal(back[k], v)


def test_build_model_with_another_models_parameters_names_them(tmp_path, qparams):
  model, q = qparams
  back, _ = checkpoint.restore(checkpoint.save(str(tmp_path / "ck"), q))
  other = tiny.tiny_config(vocab_size=320)
  with pytest.raises(ValueError, match=r"'embed/embedding' has shape \(300, 64\), expected \(320, 64\)"):
    build_model(other, back)
  with pytest.raises(ValueError, match=r"missing parameters \['layers/2/"):
    build_model(tiny.tiny_config(num_layers=3), back)
  with pytest.raises(ValueError, match=r"unexpected parameters \['layers/1/"):
    build_model(tiny.tiny_config(num_layers=1), back)
  wide = tiny.tiny_config(hidden_size=128)  # compressed leaves are checked by their logical shape
  with pytest.raises(ValueError, match=r"'layers/0/attn/k_proj/kernel' has shape \(64, 32\)"):
    build_model(wide, back)
  # Smaller MLP / fewer query heads (structured pruning) still build.
  pruned = jax.tree.map(lambda x: x, model_params(model))
  for blk in pruned["layers"].values():
    blk["mlp"]["gate_proj"]["kernel"] = blk["mlp"]["gate_proj"]["kernel"][:, :64]
    blk["mlp"]["up_proj"]["kernel"] = blk["mlp"]["up_proj"]["kernel"][:, :64]
    blk["mlp"]["down_proj"]["kernel"] = blk["mlp"]["down_proj"]["kernel"][:64]
  assert build_model(model.cfg, pruned)(jnp.arange(4)[None]).shape == (1, 4, 300)


def test_large_jax_arrays_saved_directly_and_restored_in_batches(tmp_path, monkeypatch):
  """One-device jax arrays of 1 MiB and more go to orbax as they are (no host copy); restore reads
  in batches (here one array each) and gives the same values and dtypes as before."""
  big = jax.random.normal(jax.random.key(0), (512, 1024))  # 2 MiB float32
  params = {"big": big, "codes": jnp.arange(1 << 19, dtype=jnp.uint32).reshape(512, 1024),
            "small": jnp.arange(16.0), "host": np.ones((600, 600), np.float32),
            "bf16": jnp.ones((1024, 1024), jnp.bfloat16)}
  seen = {}
  write = checkpoint._write_arrays

  def spy(arrays_dir, arrays):
    seen.update({k: type(v) for k, v in arrays.items()})
    write(arrays_dir, arrays)

  monkeypatch.setattr(checkpoint, "_write_arrays", spy)
  checkpoint.save(str(tmp_path / "ck"), params)
  assert sorted(t.__name__ for t in seen.values()) == ["ArrayImpl", "ArrayImpl", "ArrayImpl",
                                                        "ndarray", "ndarray"]
  monkeypatch.setattr(checkpoint, "_RESTORE_BATCH_BYTES", 1000)
  got, _ = checkpoint.restore(str(tmp_path / "ck"))
  for k, v in params.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)
  monkeypatch.setattr(checkpoint, "_RESTORE_BATCH_BYTES", 1 << 30)  # one batch
  again, _ = checkpoint.restore(str(tmp_path / "ck"))
  for k in params:
    np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(got[k]), err_msg=k)


@pytest.mark.parametrize("a", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(12, dtype=np.float32).reshape(3, 4).T,
    np.float32(3.5), np.array([True, False, True]), np.zeros((0, 4), np.int8),
    np.arange(6, dtype=np.uint32), jnp.ones((2, 3), jnp.bfloat16)], ids=lambda a: str(a.dtype))
def test_crc_is_the_crc_of_the_c_order_bytes(a):
  """The checksum read in place equals the CRC32 of the array's C-order bytes (what checkpoints
  written before it recorded), so old checkpoints keep verifying."""
  import zlib  # pylint: disable=g-import-not-at-top
  assert checkpoint._crc(a) == zlib.crc32(np.ascontiguousarray(np.asarray(a)).tobytes())
