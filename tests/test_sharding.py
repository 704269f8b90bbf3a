"""Compressed models shard over a device mesh (8 fake CPU devices, in a subprocess)."""

import os
import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flax import nnx
    import tiny
    from compressjax import formats, transforms as T
    from compressjax.io import build_model, model_params

    assert jax.device_count() == 8, jax.devices()
    model = tiny.tiny_model(seed=5)
    q, _ = T.apply(T.rtn(bits=4, group_size=32), model_params(model))
    qmodel = build_model(model.cfg, q)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 300, (8, 16)), jnp.int32)
    graphdef, state = nnx.split(qmodel)
    f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    ref = f(state, toks)

    # Auto axes: the compiler propagates shardings through the model. (Explicit axes would need
    # sharding annotations on every reshape of the model; not supported yet.)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    def spec(x):
        # Packed codes, scales and zeros are (rows, N): shard the output dimension N.
        if x.ndim == 2 and x.shape[1] % 4 == 0 and x.shape[0] != 300:
            return NamedSharding(mesh, P(None, "model"))
        return NamedSharding(mesh, P())
    sharded = jax.tree.map(lambda x: jax.device_put(x, spec(x)), state)
    kernel = sharded["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert isinstance(kernel, formats.QuantizedArray)
    assert len(kernel.packed.sharding.device_set) == 8
    assert kernel.packed.addressable_shards[0].data.shape == (8, 32)  # (64*4/32, 128/4)
    toks_s = jax.device_put(toks, NamedSharding(mesh, P("data", None)))
    with jax.set_mesh(mesh):
        out = f(sharded, toks_s)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)
    print("SHARDED_OK")
""")


def test_compressed_model_runs_sharded_over_a_mesh():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stderr[-4000:]
