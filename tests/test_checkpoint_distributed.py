"""Checkpoints saved by two processes (``jax.distributed`` on localhost, gloo CPU collectives,
2 devices each) without gathering: a ``QuantizedArray`` whose codes and scales are split over
the 4 devices of both processes, a dense kernel split by rows and replicated arrays. Every
process writes its own shards; process 0 writes the manifest (with every shard's CRC32) and
renames the directory into place. The checkpoint restores in one process equal to the
original (exactly), and in both processes straight into the saved layout. A path that may not
be replaced, or a failure in one process only, makes every process raise and writes nothing."""

import json
import os
import textwrap

import jax
import numpy as np

from compressjax import checkpoint, formats
from conftest import run_two_processes

BUILD = textwrap.dedent("""
    import jax, numpy as np
    from compressjax.quantize import quantize_rtn
    def build():
      rng = np.random.default_rng(0)
      w = rng.standard_normal((64, 32)).astype(np.float32)
      return {"layer": {"q": quantize_rtn(w, bits=4, group_size=32, symmetric=False),
                        "dense": rng.standard_normal((8, 16)).astype(np.float32)},
              "norm": rng.standard_normal((16,)).astype(np.float32),
              "step": np.arange(3, dtype=np.int32)}
""")

WORKER = BUILD + textwrap.dedent("""
    import os, sys
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid)
    from jax.sharding import NamedSharding, PartitionSpec as P
    from compressjax import checkpoint
    from compressjax.quantize import obs_core
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    tree = build()
    tree["layer"]["q"] = obs_core.place_leaf(tree["layer"]["q"], obs_core.ColumnSplit(mesh, "d"))
    rows = NamedSharding(mesh, P("d", None))
    host = tree["layer"]["dense"]
    tree["layer"]["dense"] = jax.make_array_from_callback(host.shape, rows, lambda i: host[i])
    rep = NamedSharding(mesh, P())
    tree["norm"] = jax.make_array_from_callback((16,), rep, lambda i: build()["norm"][i])
    q = tree["layer"]["q"]
    assert not q.packed.is_fully_addressable and q.packed.sharding.spec == P(None, "d")
    assert len(q.scale.addressable_shards) == 2 and q.scale.addressable_shards[0].data.shape[1] == 8
    # A path that may not be replaced: every process refuses alike, nothing is written.
    try:
      checkpoint.save(os.path.join(out, "taken"), tree)
      raise AssertionError("no error")
    except checkpoint.CheckpointExistsError as e:
      assert "not a compressjax checkpoint" in str(e), e
    # A failure in one process only (its metadata is no JSON): every process raises, at once.
    try:
      checkpoint.save(os.path.join(out, "half"), tree, metadata={"x": object()} if pid else {})
      raise AssertionError("no error")
    except TypeError as e:
      assert pid == 1 and "JSON" in str(e), e
    except checkpoint.CheckpointError as e:
      assert pid == 0 and "process(es) [1]" in str(e), e
    # Different paths in the two processes: refused in both before anything is written.
    try:
      checkpoint.save(os.path.join(out, f"mine{pid}"), tree)
      raise AssertionError("no error")
    except checkpoint.CheckpointError as e:
      assert "different paths" in str(e), e
    path = os.path.join(out, "ckpt")
    assert checkpoint.save(path, tree, metadata={"who": "both"}) == path
    # Again over it (overwrite=True): the swap of the previous checkpoint runs on process 0.
    checkpoint.save(path, tree, metadata={"who": "both", "again": True}, overwrite=True)
    # Restored by both processes straight into the saved layout: each reads its own shards.
    sh = {"layer": {"q": jax.tree.map(lambda a: a.sharding, q), "dense": rows}}
    got, meta = checkpoint.restore(path, shardings=sh)
    assert meta == {"who": "both", "again": True}, meta
    gq = got["layer"]["q"]
    assert gq.packed.sharding == q.packed.sharding and not gq.packed.is_fully_addressable
    for a, b in zip(jax.tree.leaves(gq) + [got["layer"]["dense"]],
                    jax.tree.leaves(q) + [tree["layer"]["dense"]]):
      for sa, sb in zip(a.addressable_shards, b.addressable_shards):
        assert sa.index == sb.index
        np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(sb.data))
    # Into another layout over both processes (columns instead of rows): the saved row shards
    # are checked on the gathered array.
    cols = NamedSharding(mesh, P(None, "d"))
    got, _ = checkpoint.restore(path, shardings={"layer": {"dense": cols}})
    d = got["layer"]["dense"]
    assert d.sharding == cols and len(d.addressable_shards) == 2
    for sh in d.addressable_shards:
      np.testing.assert_array_equal(np.asarray(sh.data), host[sh.index])
    print("WORKER_OK", pid)
""")


def test_two_processes_save_one_restores(tmp_path):
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "notes.txt").write_text("not a checkpoint")
  run_two_processes(WORKER, str(tmp_path), timeout=300)

  path = str(tmp_path / "ckpt")
  # Nothing left beside it (temporaries, per-process checksum files), nothing in "taken".
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "taken"], os.listdir(tmp_path)
  assert os.listdir(tmp_path / "taken") == ["notes.txt"]
  assert sorted(os.listdir(path)) == ["arrays", "manifest.json"], os.listdir(path)
  with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
    leaves = json.load(f)["leaves"]
  crc = leaves["layer/q"]["crc32"]
  for name in ("packed", "scale", "zero"):  # 4 column shards, from both processes
    rows = 8 if name == "packed" else 2
    assert set(crc[name]["shards"]) == {f"0:{rows},{c}:{c + 8}" for c in (0, 8, 16, 24)}, crc
  assert set(leaves["layer/dense"]["crc32"]["value"]["shards"]) == {
      f"{r}:{r + 2},0:16" for r in (0, 2, 4, 6)}
  assert isinstance(leaves["norm"]["crc32"]["value"], int)  # replicated: one CRC

  ns: dict = {}
  exec(BUILD, ns)  # pylint: disable=exec-used
  ref = ns["build"]()
  got, meta = checkpoint.restore(path)  # one process, no distributed runtime
  assert meta == {"who": "both", "again": True}
  assert isinstance(got["layer"]["q"], formats.QuantizedArray)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(got["layer"]["q"].materialize()),
                                np.asarray(ref["layer"]["q"].materialize()))

  # A corrupted shard written by process 1 is caught when one process restores.
  bad = checkpoint.read_manifest(path)
  shards = bad["leaves"]["layer/q"]["crc32"]["scale"]["shards"]
  shards["0:2,24:32"] ^= 1
  with open(os.path.join(path, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(bad, f)
  try:
    checkpoint.restore(path)
    raise AssertionError("no error")
  except checkpoint.CheckpointError as e:
    assert "layer/q/scale" in str(e) and "0:2,24:32" in str(e), e

