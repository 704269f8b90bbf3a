"""E8P/RVQ BlockLDLQ, SpQR and OWQ with the output columns split over 8 simulated CPU devices.

Like ``tests/test_mesh_solvers.py`` (GPTQ, SparseGPT), one subprocess (the device count is fixed
when JAX starts) runs each core solver on one device and split over a mesh, on tiny shapes, and
the engine (``run_sequential`` split vs ``shard_solvers=False`` on the same mesh) on a one-block
model. Claims checked:

* E8P (2 bits), E8P12RVQ3B and RVQ4B, also with tune passes: codes **identical** and the layer
  scale **bit-for-bit** equal (the scale is computed from all columns' gathered sums of
  squares); the loss (a sum over devices) within ``rtol = 1e-5``; the codes split
  ``P(None, axis)``.
* SpQR (bilevel statistics grouped along the outputs, outliers): codes, both statistics levels
  and the outliers **identical** (the outlier threshold is computed from all columns); the
  packed codes split ``P(None, axis)``.
* OWQ: the same kept rows (chosen from the whole ``W`` before the split), codes, scales and kept
  values **identical**.
* The engine (one kernel each: ``incoherence + e8p`` on ``up_proj``, ``spqr`` on ``q_proj``;
  OWQ goes through the same wiring as SpQR, ``transforms.quantize._hessian_leafwise``):
  identical leaves split or not, and the split leaves keep ``P(None, axes)`` on their codes.

Only the ``("a", "b")`` split of 8 devices and the 3-bit RVQ mode are run (the 4-bit mode is the
same recursion with another rounding rule), to keep the test short.
"""

import textwrap

import pytest

from conftest import run_script

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import tiny
    from compressjax import transforms as T
    from compressjax.quantize import e8p_core, obs_core, spqr_core

    assert jax.device_count() == 8
    X = jax.random.normal(jax.random.key(0), (256, 64)) * jnp.linspace(0.2, 2.0, 64)
    H = 2 * X.T @ X / 256
    W = jax.random.normal(jax.random.key(1), (64, 32)).at[5, 7].set(12.0)
    mesh = jax.make_mesh((2, 4), ("a", "b"))  # Explicit axes by default
    eq = lambda a, b, m="": np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=m)

    def leaves_equal(x, y, m=""):
      lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
      assert jax.tree.structure(x) == jax.tree.structure(y), m
      for a, b in zip(lx, ly):
        eq(a, b, m)

    axis, size = ("a", "b"), 8  # columns over both axes of an Explicit mesh: 4 per device
    Ws = jax.device_put(W, NamedSharding(mesh, P(None, axis)))
    split = obs_core.column_split(Ws)
    assert split is not None and split.size == size

    # E8P (blocksize 32: two lazy blocks; one tune pass) and the 3-bit RVQ mode.
    kw = dict(blocksize=32, tune_iters=1)
    c1, s1, i1 = e8p_core.e8p_quantize(W, H, **kw)
    cs, ss, i_s = e8p_core.e8p_quantize(Ws, H, split=split, **kw)
    eq(cs, c1, "e8p codes"); eq(ss, s1, "e8p scale")
    np.testing.assert_allclose(float(i_s["loss"]), float(i1["loss"]), rtol=1e-5)
    assert cs.sharding.spec == P(None, axis) and len(cs.sharding.device_set) == 8
    assert cs.addressable_shards[0].data.shape == (8, 4)
    r1 = e8p_core.rvq_quantize(W, H, bits=3, blocksize=32)
    rs = e8p_core.rvq_quantize(Ws, H, bits=3, blocksize=32, split=split)
    for a, b in zip(rs[:3], r1[:3]):
      eq(a, b, "rvq3")
    assert rs[0].sharding.spec == P(None, axis) and rs[1].sharding.spec == P(None, axis)

    # SpQR: second-level groups of 4 output columns (32 / 8 devices = 4: whole groups).
    skw = dict(bits=3, group_size=16, stats_group_size=4, outlier_threshold=0.2, blocksize=32)
    l1, j1 = spqr_core.spqr_quantize(W, H, **skw)
    ls, js = spqr_core.spqr_quantize(Ws, H, split=split, **skw)
    assert type(l1).__name__ == "SumArray" and l1.terms[1].nnz > 0, l1
    leaves_equal(ls, l1, "spqr")
    assert int(js["outliers"]) == int(j1["outliers"])
    assert ls.terms[0].packed.sharding.spec == P(None, axis)
    eq(ls.materialize(), l1.materialize())
    try:  # 4 columns per device cannot hold whole groups of 8
      spqr_core.spqr_quantize(Ws, H, split=split, **dict(skw, stats_group_size=8))
      raise AssertionError("no error")
    except ValueError as e:
      assert "in multiples of 8" in str(e) and "32 output columns" in str(e), e

    # OWQ: kept rows chosen from all outputs, then the split.
    okw = dict(bits=3, n_keep=3, blocksize=32)
    o1, k1 = spqr_core.owq_quantize(W, H, **okw)
    os_, ks = spqr_core.owq_quantize(Ws, H, split=split, **okw)
    assert ks["kept_rows"] == k1["kept_rows"], (ks["kept_rows"], k1["kept_rows"])
    leaves_equal(os_, o1, "owq")
    assert os_.terms[0].packed.sharding.spec == P(None, axis)
    assert os_.terms[1].values.sharding.spec == P(None, axis)

    # The engine on a mesh (one block; the claim is per layer): split vs shard_solvers=False,
    # one kernel per solver (each kernel shape compiles its own split solver).
    emesh = jax.make_mesh((8,), ("data",))
    up, q = ".*mlp/up_proj/kernel", ".*attn/q_proj/kernel"
    t = T.chain(T.incoherence(seed=0, where=up), T.e8p(blocksize=32, where=up),
                T.spqr(bits=3, group_size=16, stats_group_size=4, where=q))
    res = tiny.engine_split_and_whole(t, emesh)
    assert res[True].keys() == res[False].keys() and len(res[True]) == 2, res[True].keys()
    for p, leaf in res[True].items():
      leaves_equal(leaf, res[False][p], p)
      kind = type(getattr(leaf, "inner", leaf)).__name__
      codes = leaf.inner.codes if kind == "E8PArray" else leaf.terms[0].packed
      assert codes.sharding.spec == P(None, ("data",)), (p, codes.sharding)
      assert codes.addressable_shards[0].data.shape[1] == leaf.shape[1] // 8, p
      ref = res[False][p]
      ref_codes = ref.inner.codes if kind == "E8PArray" else ref.terms[0].packed
      assert len(ref_codes.sharding.device_set) == 1 or ref_codes.sharding.is_fully_replicated
    print("MESH_SOLVERS_MORE_OK")
""")


@pytest.mark.slow  # ~50 s; GPTQ/SparseGPT splits stay in the default suite
def test_split_lattice_spqr_owq_equal_one_device():
  run_script(SCRIPT, "MESH_SOLVERS_MORE_OK", timeout=600)
