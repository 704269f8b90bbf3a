"""Two processes on localhost (``jax.distributed``, gloo CPU collectives, 2 devices each) run the
calibration engine data-parallel over a 4-device mesh spanning both, with GPTQ's output columns
split over the 4 devices (so over both processes), killed after the first block and resumed
from the resume point both wrote (each process its own windows and columns), and give the same
compressed model as one process; both save it together and one process restores it."""

import textwrap

import numpy as np

import tiny
from compressjax import calibration, checkpoint, formats, transforms as T
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
    import tiny
    from compressjax import calibration, formats, transforms as T
    from compressjax.transforms.selection import leaves_with_paths
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    mesh = jax.make_mesh((4,), ("data",))  # spans both processes
    w = np.random.default_rng(0).integers(0, 300, (20, 24)).astype(np.int32)
    from jax.experimental import multihost_utils
    from compressjax import checkpoint
    gptq = T.gptq(bits=4, group_size=32)
    class Killed(Exception):
      pass
    def dies_at_block_1(params, state, stats=None):
      if stats and any(p.startswith("layers/1/") for p in stats):
        raise Killed()  # both processes, after block 0 and its resume point were written
      return gptq.update(params, state, stats)
    resume = os.path.join(os.path.dirname(out), "resume")  # the same path in both
    try:
      calibration.run_sequential(tiny.tiny_model(seed=2), w,
                                 gptq._replace(update=dies_at_block_1), batch_size=8,
                                 progress=False, mesh=mesh, resume_dir=resume)
      raise AssertionError("not killed")
    except Killed:
      pass
    assert os.listdir(os.path.join(resume, "blocks")) == ["00000"]
    q, _ = calibration.run_sequential(tiny.tiny_model(seed=2), w, gptq, batch_size=8,
                                      progress=False, mesh=mesh, resume_dir=resume)
    leaves = {p: v for p, v in leaves_with_paths(q) if isinstance(v, formats.CompressedArray)}
    # Block 1's solvers split the output columns over all 4 devices, so over both processes;
    # block 0 comes back whole from the resume point.
    for p, v in leaves.items():
      split = p.startswith("layers/1/")
      assert (not v.packed.is_fully_addressable) == split, (p, v.packed.sharding)
      assert not split or len(v.packed.addressable_shards) == 2, (p, v.packed.sharding)
    arrs = {p.replace("/", "."): np.asarray(
        multihost_utils.process_allgather(v.materialize(), tiled=True)
        if not v.packed.is_fully_addressable else v.materialize()) for p, v in leaves.items()}
    np.savez(out, **arrs)
    # Saved by both processes, each writing its own columns (no gathering).
    checkpoint.save(os.path.join(os.path.dirname(out), "model"), {"layers": q["layers"]})
    print("WORKER_OK", pid, len(arrs))
""")


def test_two_processes_compress_like_one(tmp_path):
  run_two_processes(WORKER, str(tmp_path / "out{i}.npz"), timeout=600)
  got = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
  saved, _ = checkpoint.restore(str(tmp_path / "model"))  # one process reads it all
  saved = {p.replace("/", "."): np.asarray(v.materialize()) for p, v in leaves_with_paths(saved)
           if isinstance(v, formats.CompressedArray)}

  w = np.random.default_rng(0).integers(0, 300, (20, 24)).astype(np.int32)
  q, _ = calibration.run_sequential(tiny.tiny_model(seed=2), w, T.gptq(bits=4, group_size=32),
                                    batch_size=8, progress=False)
  ref = {p.replace("/", "."): np.asarray(v.materialize()) for p, v in leaves_with_paths(q)
         if isinstance(v, formats.CompressedArray)}
  assert len(ref) == 14 and set(got[0].files) == set(got[1].files) == set(ref)
  for k, r in ref.items():
    np.testing.assert_array_equal(got[0][k], got[1][k])  # every process holds the same model
    np.testing.assert_array_equal(saved[k], got[0][k])  # the checkpoint holds it exactly
    # Statistics summed across 4 devices in another order: decisions may flip on ties only.
    assert np.mean(got[0][k] == r) >= 0.995, k
