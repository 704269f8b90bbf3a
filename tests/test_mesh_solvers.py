"""GPTQ and SparseGPT with the output columns split over 8 simulated CPU devices.

One subprocess (the device count is fixed when JAX starts) checks the core solvers and the
engine. The per-column recursion is the same on every device; the lazy batch update is a
matmul whose accumulation order XLA may choose differently for ``N / 8`` columns, so:
GPTQ's codes and scales must be **identical** to one device's; SparseGPT's masks identical and
its reconstructed values within ``rtol = 1e-6`` (measured: at most ~3e-7 relative, a few ulp);
the solver loss (a sum over devices) within ``rtol = 1e-5``.
"""

import textwrap

from conftest import run_script

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import tiny
    from compressjax import calibration, formats, transforms as T
    from compressjax.prune import sparsegpt_core
    from compressjax.quantize import gptq_core, obs_core
    from compressjax.transforms.selection import leaves_with_paths

    assert jax.device_count() == 8
    X = jax.random.normal(jax.random.key(0), (512, 96))
    H = 2 * X.T @ X / 512
    W = jax.random.normal(jax.random.key(1), (96, 64))
    mesh = jax.make_mesh((2, 4), ("a", "b"))  # Explicit axes by default
    cases = {"b": ([dict(bits=4, symmetric=False, blocksize=32)], [None]),
             ("a", "b"): ([dict(bits=3, group_size=32, act_order=True, static_groups=True)],
                          ["2:4"])}
    for axis, size in (("b", 4), (("a", "b"), 8)):
      Ws = jax.device_put(W, NamedSharding(mesh, P(None, axis)))
      split = obs_core.column_split(Ws)
      assert split is not None and split.size == size and split.axis == axis, split
      for kw in cases[axis][0]:
        q1, i1 = gptq_core.gptq_quantize(W, H, **kw)
        qs, i_s = gptq_core.gptq_quantize(Ws, H, split=split, **kw)
        np.testing.assert_array_equal(np.asarray(qs.packed), np.asarray(q1.packed))
        np.testing.assert_array_equal(np.asarray(qs.scale), np.asarray(q1.scale))
        np.testing.assert_array_equal(np.asarray(qs.materialize()), np.asarray(q1.materialize()))
        np.testing.assert_allclose(float(i_s["loss"]), float(i1["loss"]), rtol=1e-5)
        for child in (qs.packed, qs.scale) + (() if qs.zero is None else (qs.zero,)):
          assert child.sharding.spec == P(None, axis), (kw, child.sharding)
          assert len(child.sharding.device_set) == 8
        assert qs.packed.addressable_shards[0].data.shape[1] == 64 // size
      for pat in cases[axis][1]:
        a = sparsegpt_core.sparsegpt_prune(W, H, pattern=pat, blocksize=32)
        b = sparsegpt_core.sparsegpt_prune(Ws, H, pattern=pat, blocksize=32, split=split)
        np.testing.assert_array_equal(np.asarray(b[1]), np.asarray(a[1]))  # masks: identical
        np.testing.assert_allclose(np.asarray(b[0]), np.asarray(a[0]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(float(b[2]["loss"]), float(a[2]["loss"]), rtol=1e-5)
        assert b[0].sharding.spec == P(None, axis) and b[1].sharding.spec == P(None, axis)
    # Columns that do not split evenly: a clear error naming the sizes.
    bad = jax.device_put(jnp.ones((96, 60)), NamedSharding(mesh, P(None, "b")))
    try:
      gptq_core.gptq_quantize(jnp.ones((96, 60)), H, bits=4, split=obs_core.ColumnSplit(
          jax.make_mesh((8,), ("d",)), "d"))
      raise AssertionError("no error")
    except ValueError as e:
      assert "60 output columns" in str(e) and "size 8" in str(e), e
    assert obs_core.column_split(W) is None  # one device: no split
    assert obs_core.column_split(jax.device_put(W, NamedSharding(mesh, P("b", None)))) is None

    # The engine on a mesh: the solvers see the split and return split leaves; the result equals
    # the same run with shard_solvers=False (same summed statistics, every device solving all).
    model = tiny.tiny_model(seed=2)
    w = np.random.default_rng(0).integers(0, 300, (16, 24)).astype(np.int32)
    emesh = jax.make_mesh((8,), ("data",))
    seen = []
    def spy(path, leaf, st):
      seen.append((path, st.columns))
      return leaf
    calibration.run_sequential(model, w, T.leafwise(spy, with_stats=True, name="spy"),
                               batch_size=8, progress=False, mesh=emesh)
    assert seen and all(c is not None and c.size == 8 for _, c in seen
                        if not _.endswith(("k_proj/kernel", "v_proj/kernel"))), seen
    recipes = {"gptq": T.gptq(bits=4, group_size=32, act_order=True, static_groups=True),
               "sparsegpt": T.sparsegpt(0.5)}
    for name, t in recipes.items():
      res = {}
      for on in (True, False):
        q, _ = calibration.run_sequential(model, w, t, batch_size=8, progress=False, mesh=emesh,
                                          shard_solvers=on)
        res[on] = {p: v for p, v in leaves_with_paths(q) if isinstance(v, formats.CompressedArray)}
      assert res[True].keys() == res[False].keys() and len(res[True]) == 14
      n_split = 0
      for p, leaf in res[True].items():
        ref = res[False][p]
        a, r = np.asarray(leaf.materialize()), np.asarray(ref.materialize())
        if name == "gptq":
          np.testing.assert_array_equal(a, r, err_msg=p)
        else:
          np.testing.assert_array_equal(a == 0, r == 0, err_msg=p)
          np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5, err_msg=p)
        first = jax.tree.leaves(leaf)[0]
        if leaf.shape[1] % 8 == 0:
          n_split += 1
          assert len(first.sharding.device_set) == 8, (p, first.sharding)
          if name == "gptq":
            assert leaf.packed.sharding.spec == P(None, ("data",)), (p, leaf.packed.sharding)
      assert n_split >= 10, n_split
    print("MESH_SOLVERS_OK")
""")


def test_split_solvers_equal_one_device():
  run_script(SCRIPT, "MESH_SOLVERS_OK", timeout=900)
