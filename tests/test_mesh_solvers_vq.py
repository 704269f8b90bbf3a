"""GPTVQ and AQLM with the output columns split over 8 simulated CPU devices.

Like ``tests/test_mesh_solvers.py`` (GPTQ, SparseGPT) and ``tests/test_mesh_solvers_more.py``,
one subprocess (the device count is fixed when JAX starts) runs each core solver on one device
and split over a mesh, on tiny shapes, and the engine (``run_sequential`` split vs
``shard_solvers=False`` on the same mesh) on a one-block model. Their codebooks are shared
across output columns: the split all-reduces the k-means sums (GPTVQ, AQLM), the GPTVQ M-step
gradient and AQLM's codebook normal equations, and runs GPTVQ's Mahalanobis initialisation on
the gathered rows (``gptvq_core`` / ``aqlm_core`` docstrings). Claims checked:

* GPTVQ with every device's columns holding whole codebooks (``out_block`` 4, 4 columns per
  device): codes, ``int8`` codebooks and scales **identical** (each centroid's sums come from
  one device).
* GPTVQ with codebooks straddling devices (``out_block`` 16 over 6 columns per device, with the
  M-step; and one codebook for all outputs): codes **identical**, ``int8`` codebooks and
  ``float16`` scales identical on these shapes (the sums are added in another order: float32
  rounding could move a centroid across a rounding boundary; stated tolerance for the losses
  ``rtol = 1e-5``).
* AQLM (2 codebooks of 64, beam 2, 2 rounds): codes **identical**, codebooks and scales within
  ``rtol = 1e-3`` of their ``float16`` values (one ``float16`` ulp is ~1e-3), relative errors
  within ``rtol = 1e-4``.
* Split results: GPTVQ's codes and AQLM's codes and scales split ``P(None, axes)`` /
  ``P(axes)``; the codebooks replicated (GPTVQ's split by output block where the blocks divide).
* The engine (``gptvq`` on ``up_proj``, ``aqlm`` on ``q_proj``): the same leaves split or not
  (codes identical, floats within the tolerances above) and the split leaves keep their codes
  split over the devices.
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
    from compressjax import formats, transforms as T
    from compressjax.quantize import aqlm_core, gptvq_core, obs_core

    assert jax.device_count() == 8
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    K = 64
    X = jax.random.normal(k2, (512, K)) @ (jax.random.normal(k1, (K, K)) * 0.3 + jnp.eye(K))
    H = 2 * X.T @ X / 512
    mesh = jax.make_mesh((2, 4), ("a", "b"))  # Explicit axes by default
    axis = ("a", "b")
    eq = lambda a, b, m="": np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=m)
    close = lambda a, b, rtol, m="": np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=rtol * float(
            np.max(np.abs(np.asarray(b, np.float64)))), err_msg=m)

    def split_of(W):
      Ws = jax.device_put(W, NamedSharding(mesh, P(None, axis)))
      split = obs_core.column_split(Ws)
      assert split is not None and split.size == 8
      return Ws, split

    # GPTVQ: whole codebooks per device, codebooks straddling devices (+ M-step), one codebook.
    for N, kw in [(32, dict(dim=2, bits=2, group_size=32, out_block=4, blocksize=32)),
                  (48, dict(dim=2, bits=2, group_size=32, out_block=16, blocksize=32,
                            m_step_iters=3)),
                  (32, dict(dim=4, bits=1.5, group_size=64, out_block=None, blocksize=32))]:
      W = jax.random.normal(k3, (K, N))
      Ws, split = split_of(W)
      c1, q1, s1, i1 = gptvq_core.gptvq_quantize(W, H, **kw)
      cs, qs, ss, i_s = gptvq_core.gptvq_quantize(Ws, H, split=split, **kw)
      m = f"gptvq N={N} {kw}"
      eq(cs, c1, m); eq(qs, q1, m); eq(ss, s1, m)
      for k in ("loss", "output_loss", "output_loss_before_m_step"):
        np.testing.assert_allclose(float(i_s[k]), float(i1[k]), rtol=1e-5, err_msg=m + k)
      assert cs.sharding.spec == P(None, axis) and len(cs.sharding.device_set) == 8, m
      assert cs.addressable_shards[0].data.shape == (K // kw["dim"], N // 8), m
    try:  # columns that do not split evenly: a clear error
      gptvq_core.gptvq_quantize(jnp.ones((64, 60)), H, dim=2, bits=2, blocksize=32,
                                split=split)
      raise AssertionError("no error")
    except ValueError as e:
      assert "GPTVQ" in str(e) and "60 output columns" in str(e), e

    # AQLM.
    W = jax.random.normal(k3, (K, 32))
    Ws, split = split_of(W)
    akw = dict(num_codebooks=2, nbits=6, in_group_size=8, iterations=2, kmeans_iters=4,
               cg_iters=4, beam_size=2)
    b1, C1, s1, i1 = aqlm_core.aqlm_quantize(W, H, **akw)
    bs, Cs, ss, i_s = aqlm_core.aqlm_quantize(Ws, H, split=split, **akw)
    eq(bs, b1, "aqlm codes")
    close(Cs, C1, 1e-3, "aqlm codebooks"); close(ss, s1, 1e-3, "aqlm scales")
    close(i_s["rel_err"], i1["rel_err"], 1e-4, "aqlm rel_err")
    pad = lambda a: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
    assert pad(bs) == (None, axis, None) and pad(ss) == (axis,), (bs.sharding, ss.sharding)
    assert bs.addressable_shards[0].data.shape == (8, 4, 2)

    # The engine on a mesh (one block; the claim is per layer): split vs shard_solvers=False.
    emesh = jax.make_mesh((8,), ("data",))
    up, q = ".*mlp/up_proj/kernel", ".*attn/q_proj/kernel"
    t = T.chain(T.gptvq(dim=2, bits=2, group_size=32, out_block=32, blocksize=32, where=up),
                T.aqlm(num_codebooks=1, nbits=6, in_group_size=8, iterations=1, kmeans_iters=3,
                       cg_iters=3, where=q))
    res = tiny.engine_split_and_whole(t, emesh)
    assert res[True].keys() == res[False].keys() and len(res[True]) == 2, res[True].keys()
    for p, leaf in res[True].items():
      ref = res[False][p]
      axes = lambda e: (e,) if isinstance(e, str) else tuple(e or ())  # 'data' or ('data',)
      eq(leaf.code_values(), ref.code_values(), p)
      codes = leaf.codes
      if isinstance(leaf, formats.VQArray):
        eq(leaf.codebook, ref.codebook, p); eq(leaf.scale, ref.scale, p)
      else:
        close(leaf.codebooks, ref.codebooks, 1e-3, p); close(leaf.scales, ref.scales, 1e-3, p)
        assert axes(leaf.scales.sharding.spec[0]) == ("data",), (p, leaf.scales.sharding)
      assert axes(codes.sharding.spec[1]) == ("data",), (p, codes.sharding)
      assert codes.addressable_shards[0].data.shape[1] == leaf.shape[1] // 8, p
    print("MESH_SOLVERS_VQ_OK")
""")


@pytest.mark.slow  # ~50 s; GPTQ/SparseGPT splits stay in the default suite
def test_split_gptvq_aqlm_equal_one_device():
  run_script(SCRIPT, "MESH_SOLVERS_VQ_OK", timeout=600)
