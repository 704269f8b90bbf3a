"""Streamed output with several processes (issue 12, items 5 and 6): two processes on localhost
(``jax.distributed``, gloo CPU collectives, 2 devices each) write a compressed checkpoint block
by block (:class:`compressjax.checkpoint_stream.StreamWriter`), each process the shards it holds
of every finished block, process 0 the manifests and the rename.

Checked array by array, exactly: streamed on a 4-device mesh spanning both processes (GPTQ's
output columns split over both) == the same run kept and saved with ``checkpoint.save``; killed
after the first block (in both processes) and resumed from the resume directory == the
uninterrupted run, the destination untouched by the killed run and the resume directory's parts
hard-linked, not written twice; streamed without a mesh (every process computes the whole
model, as ``compressjax compress`` runs) == one process's unstreamed run. Restored in both
processes (in full, and straight into the saved layout, each process reading its own columns)
and in one process."""

import os
import textwrap

import jax
import numpy as np
import pytest

import tiny
from compressjax import calibration, checkpoint, transforms as T
from compressjax.transforms.selection import leaves_with_paths
from conftest import run_two_processes

WORKER = textwrap.dedent("""
    import os, sys
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    import tiny
    from compressjax import calibration, checkpoint, checkpoint_stream, formats, transforms as T
    from compressjax.transforms.selection import leaves_with_paths
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    mesh = jax.make_mesh((4,), ("data",))  # spans both processes
    w = np.random.default_rng(0).integers(0, 300, (20, 24)).astype(np.int32)
    gptq = T.gptq(bits=4, group_size=32)
    at = lambda name: os.path.join(out, name)  # the same paths in both processes

    def run(transform=gptq, **kw):
      return calibration.run_sequential(tiny.tiny_model(seed=2), w, transform, batch_size=8,
                                        progress=False, **kw)

    def gathered(a):
      if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
      return np.asarray(a)

    def same(a, b):
      fa, ta = jax.tree_util.tree_flatten(a)
      fb, tb = jax.tree_util.tree_flatten(b)
      assert ta == tb and len(fa) > 20, (ta, tb)
      for x, y in zip(fa, fb):
        x, y = gathered(x), gathered(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)

    # 1. Kept and saved by both processes: the reference of the mesh runs.
    q, _ = run(mesh=mesh)
    checkpoint.save(at("saved"), q)
    # 2. Streamed on the mesh: each process writes its columns of every finished block.
    with checkpoint_stream.StreamWriter(at("streamed")) as sw:
      ph, _ = run(mesh=mesh, output=sw)
      assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(ph["layers"]))
      assert not os.path.exists(at("streamed"))
      sw.commit(metadata={"process": pid})
    # 3. Killed after block 0 in both processes, then resumed (streamed, with a resume directory).
    class Killed(Exception):
      pass
    def dies_at_block_1(params, state, stats=None):
      if stats and any(p.startswith("layers/1/") for p in stats):
        raise Killed()
      return gptq.update(params, state, stats)
    resume = at("resume")
    try:
      with checkpoint_stream.StreamWriter(at("resumed")) as sw:
        run(gptq._replace(update=dies_at_block_1), mesh=mesh, resume_dir=resume, output=sw)
      raise AssertionError("not killed")
    except Killed:
      pass
    multihost_utils.sync_global_devices("aborted")  # process 0 removed the temporary directory
    assert not os.path.exists(at("resumed")), os.listdir(out)
    assert not [e for e in os.listdir(out) if e.startswith(".resumed.")], os.listdir(out)
    assert os.listdir(os.path.join(resume, "blocks")) == ["00000"]
    with checkpoint_stream.StreamWriter(at("resumed")) as sw:
      run(mesh=mesh, resume_dir=resume, output=sw)
      sw.commit()
    # 4. No mesh: every process computes the whole model (as `compressjax compress` runs).
    with checkpoint_stream.StreamWriter(at("whole")) as sw:
      run(output=sw)
      restored_before_commit, _ = sw.restore()
      sw.commit()

    # Restored in both processes, in full: exactly the arrays of the kept run.
    saved, _ = checkpoint.restore(at("saved"))
    same(q, saved)
    got, meta = checkpoint.restore(at("streamed"))
    assert meta == {"process": 0}, meta  # process 0's metadata
    same(saved, got)
    same(saved, checkpoint.restore(at("resumed"))[0])
    same(restored_before_commit, checkpoint.restore(at("whole"))[0])
    # Straight into the saved layout: each process reads its own columns of the split leaves.
    shardings, split = {}, 0
    for p, v in leaves_with_paths(q):
      if isinstance(v, formats.CompressedArray) and not v.packed.is_fully_addressable:
        checkpoint._set(shardings, p, jax.tree.map(lambda a: a.sharding, v))
        split += 1
    assert split == 14, split  # every linear layer's columns are split over both processes
    placed, _ = checkpoint.restore(at("streamed"), shardings=shardings)
    for p, v in leaves_with_paths(shardings):
      r = {k: x for k, x in leaves_with_paths(placed)}[p]
      for a, s in zip(jax.tree.leaves(r), jax.tree.leaves(v)):
        assert a.sharding == s and len(a.addressable_shards) == 2, (p, a.sharding)
    same(saved, placed)
    print("WORKER_OK", pid)
""")


def _same(a, b):
  fa, ta = jax.tree_util.tree_flatten(a)
  fb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb and len(fa) > 20
  for x, y in zip(fa, fb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # four engine runs in two processes (+ one in this one): heavier than ~40 s
def test_two_processes_stream_like_one(tmp_path):
  out = str(tmp_path)
  run_two_processes(WORKER, out)
  assert sorted(os.listdir(out)) == ["resume", "resumed", "saved", "streamed", "whole"]
  for name in ("streamed", "resumed", "whole"):
    assert sorted(os.listdir(tmp_path / name)) == ["arrays", "blocks", "manifest.json",
                                                   "outside"], name
    assert sorted(os.listdir(tmp_path / name / "blocks")) == ["00000", "00001"], name
  # One process reads what two wrote: the same arrays, exactly.
  saved = checkpoint.restore(out + "/saved")[0]
  _same(saved, checkpoint.restore(out + "/streamed")[0])
  _same(saved, checkpoint.restore(out + "/resumed")[0])
  ref, _ = calibration.run_sequential(tiny.tiny_model(seed=2),
                                      np.random.default_rng(0).integers(0, 300, (20, 24))
                                      .astype(np.int32), T.gptq(bits=4, group_size=32),
                                      batch_size=8, progress=False)
  _same(ref, checkpoint.restore(out + "/whole")[0])  # streamed by two == kept by one
  # Same descriptions and checksums as the saved tree; the streamed leaves lie in parts.
  ms = checkpoint.read_manifest(out + "/saved")["leaves"]
  mt = checkpoint.read_manifest(out + "/streamed")["leaves"]
  assert list(ms) == list(mt)
  for p in ms:
    a, b = dict(ms[p]), dict(mt[p])
    assert b["part"].startswith("blocks/") == p.startswith("layers/"), p
    for e in (a, b):
      e.pop("part", None), e.pop("index")
    assert a == b, p
  # The resumed output's parts are the resume directory's files (hard links: written once).
  for i in range(2):
    part, src = tmp_path / "resumed" / "blocks" / f"{i:05d}", tmp_path / "resume" / "blocks" / f"{i:05d}"
    files = [os.path.relpath(os.path.join(r, f), part) for r, _, fs in os.walk(part) for f in fs]
    assert files
    for f in files:
      a, b = os.stat(part / f), os.stat(src / f)
      assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev), f
