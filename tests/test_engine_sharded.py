"""The calibration engine data-parallel on 8 simulated CPU devices equals the single-device run.

Runs in a subprocess (the device count is fixed when JAX starts). The windows of every batch are
split over the mesh; the statistics are summed across devices by the compiled program, so they
differ from the single-device sums only by the order of float32 additions: the Hessians agree
to a relative 1e-5 on both meshes, and GPTQ's (on the explicit mesh) and SparseGPT's (on the auto
one) decisions (codes, masks) on them agree except for ties that such rounding can flip (at most
0.5% of the entries here).
"""

import textwrap

from conftest import run_script

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType
    import tiny
    from compressjax import calibration, formats, transforms as T
    from compressjax.transforms.selection import leaves_with_paths

    assert jax.device_count() == 8, jax.devices()
    model = tiny.tiny_model(seed=2)
    w = np.random.default_rng(0).integers(0, 300, (20, 24)).astype(np.int32)  # 20: a padded batch
    meshes = {"explicit (8,)": jax.make_mesh((8,), ("data",)),  # Explicit axes by default
              "auto (2, 4) over data": jax.make_mesh((2, 4), ("data", "model"),
                                                     axis_types=(AxisType.Auto,) * 2)}
    assert meshes["explicit (8,)"].axis_types == (AxisType.Explicit,)
    axes = {"explicit (8,)": None, "auto (2, 4) over data": "data"}
    solver = {"explicit (8,)": "gptq", "auto (2, 4) over data": "sparsegpt"}  # one each: CI time

    # The block passes really run on the mesh: record the sharding of the inputs they get.
    seen_shardings = []
    orig_stats = calibration._Passes.stats
    def stats(self, keep):
      f = orig_stats(self, keep)
      def g(block, xs, weights):
        seen_shardings.append(xs.sharding)
        return f(block, xs, weights)
      return g
    calibration._Passes.stats = stats

    def spy_stats(mesh, axis):
      seen = {}
      def spy(path, leaf, st):
        seen[path] = st
        return leaf
      calibration.run_sequential(model, w, T.leafwise(spy, with_stats=True, name="spy"),
                                 batch_size=8, progress=False, mesh=mesh, data_axis=axis)
      return seen

    def run(t, mesh, axis):
      q, _ = calibration.run_sequential(model, w, t, batch_size=8, progress=False, mesh=mesh,
                                        data_axis=axis)
      return {p: v for p, v in leaves_with_paths(q) if isinstance(v, formats.CompressedArray)}

    ref_stats = spy_stats(None, None)
    recipes = {"gptq": T.gptq(bits=4, group_size=32, act_order=True, static_groups=True),
               "sparsegpt": T.sparsegpt(0.5)}
    refs = {k: run(t, None, None) for k, t in recipes.items()}
    for name, mesh in meshes.items():
      seen_shardings.clear()
      st = spy_stats(mesh, axes[name])
      assert seen_shardings and all(len(s.device_set) == 8 for s in seen_shardings), name
      assert seen_shardings[0].spec[1] is not None, seen_shardings[0]  # windows split
      for p, s in st.items():
        r = ref_stats[p]
        np.testing.assert_allclose(s.hessian, r.hessian, rtol=1e-5, atol=1e-5 * float(
            jnp.max(jnp.abs(r.hessian))))
        np.testing.assert_allclose(s.sq_sum, r.sq_sum, rtol=1e-5)
        assert float(s.n) == float(r.n) == 20 * 24, (p, s.n)  # padding windows weigh nothing
      for rname in [solver[name]]:
        got = run(recipes[rname], mesh, axes[name])
        assert got.keys() == refs[rname].keys() and len(got) == 14
        for p, leaf in got.items():
          ref = refs[rname][p]
          if rname == "gptq":
            same = float(jnp.mean(leaf.materialize() == ref.materialize()))
          else:
            same = float(jnp.mean((leaf.materialize() == 0) == (ref.materialize() == 0)))
          assert same >= 0.995, (name, rname, p, same)
          err = float(jnp.linalg.norm(leaf.materialize() - ref.materialize()) /
                      jnp.linalg.norm(ref.materialize()))
          assert err < 0.02, (name, rname, p, err)
    print("ENGINE_SHARDED_OK")
""")


def test_sharded_calibration_gptq_and_sparsegpt_equal_single_device():
  run_script(SCRIPT, "ENGINE_SHARDED_OK", timeout=900)
