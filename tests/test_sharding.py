"""Compressed models shard over a device mesh (8 fake CPU devices, in a subprocess)."""

import textwrap

from conftest import run_script

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
  run_script(SCRIPT, "SHARDED_OK")


SPECS_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    from flax import nnx
    import tiny
    from compressjax import formats, transforms as T
    from compressjax.io import build_model, model_params
    from compressjax.model import Llama, LlamaConfig

    COLUMN = re.compile(r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel")
    ROW = re.compile(r".*(o_proj|down_proj)/kernel")
    def megatron(path, shape):  # the dense layout: column- and row-parallel linears
      if COLUMN.fullmatch(path):
        return P(None, "model")
      if ROW.fullmatch(path):
        return P("model", None)
      return P()

    # 1. Planning a Llama-2-70B-shaped compressed tree on abstract arrays (nothing allocated).
    mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    cfg = LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                      num_heads=64, num_kv_heads=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    abstract = model_params(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    planned = T.plan(T.gptq(bits=4, group_size=128), abstract)
    sh = formats.tree_shardings(planned, megatron, mesh)
    q = planned["layers"][7]["attn"]["q_proj"]["kernel"]
    qs = sh["layers"][7]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, formats.QuantizedArray) and q.shape == (8192, 8192)
    assert q.packed.shape == (1024, 8192) and q.scale.shape == (64, 8192) and q.zero is None
    assert qs.packed.shard_shape(q.packed.shape) == (1024, 1024)
    assert qs.scale.shard_shape(q.scale.shape) == (64, 1024)
    d = planned["layers"][7]["mlp"]["down_proj"]["kernel"]
    ds = sh["layers"][7]["mlp"]["down_proj"]["kernel"]
    assert d.shape == (28672, 8192) and d.packed.shape == (3584, 8192)
    assert ds.packed.shard_shape(d.packed.shape) == (448, 8192)  # row-parallel: K split
    assert ds.scale.shard_shape(d.scale.shape) == (28, 8192)
    k = planned["layers"][0]["attn"]["k_proj"]["kernel"]
    assert sh["layers"][0]["attn"]["k_proj"]["kernel"].packed.shard_shape(k.packed.shape) == (
        1024, 128)
    per_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    linear = 80 * per_layer
    assert linear == 68_451_041_280
    lin_bytes = sum(formats.array_nbytes(c) for l in planned["layers"].values()
                    for name in ("attn", "mlp") for lin in l[name]
                    for c in jax.tree.leaves(l[name][lin]["kernel"]))
    assert lin_bytes == linear // 2 + (linear // 128) * 2, lin_bytes  # 4-bit codes + f16 scales
    # Bytes per device: every linear's share is exactly an eighth.
    dev_bytes = sum(np.prod(s.shard_shape(c.shape)) * c.dtype.itemsize
                    for l, ls in zip(planned["layers"].values(), sh["layers"].values())
                    for name in ("attn", "mlp") for lin in l[name]
                    for c, s in zip(jax.tree.leaves(l[name][lin]["kernel"]),
                                    jax.tree.leaves(ls[name][lin]["kernel"])))
    assert dev_bytes * 8 == lin_bytes, (dev_bytes, lin_bytes)

    # 2. A real compressed model placed by the derived shardings computes the same logits, and
    #    its leaves keep their shardings through jit.
    model = tiny.tiny_model(seed=5)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 300, (4, 16)), jnp.int32)
    for recipe in (T.rtn(bits=4, group_size=32), T.chain(T.magnitude(0.5, pattern="2:4"),
                                                         T.rtn(bits=4, group_size=32)),
                   T.svd(rank=8)):
      qp, _ = T.apply(recipe, model_params(model))
      ref = build_model(model.cfg, qp)(toks)
      placed = jax.device_put(qp, formats.tree_shardings(qp, megatron, mesh))
      up = placed["layers"][0]["mlp"]["up_proj"]["kernel"]
      kids = [c for c in jax.tree.leaves(up) if c.ndim == 2 and c.shape[1] == 128]
      assert kids and all(c.sharding.spec[-1] == "model" for c in kids), up
      same = jax.jit(lambda p: jax.tree.map(lambda a: a, p))(placed)
      for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(placed)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
      out = jax.jit(lambda p, t: build_model(model.cfg, p)(t))(placed, toks)
      np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)
    print("SPECS_OK")
""")


def test_compressed_leaves_take_partition_specs_from_the_dense_spec():
  run_script(SPECS_SCRIPT, "SPECS_OK")


CKPT_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P, AxisType
    import tiny
    from compressjax import checkpoint, formats, transforms as T
    from compressjax.io import model_params

    out = sys.argv[1]
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    spec = lambda path, shape: P(None, "model") if path.endswith("kernel") else P()
    qp, _ = T.apply(T.rtn(bits=4, group_size=32), model_params(tiny.tiny_model(seed=1)))
    sh = formats.tree_shardings(qp, spec, mesh)
    placed = jax.device_put(qp, sh)
    checkpoint.save(os.path.join(out, "ck"), placed)
    man = checkpoint.read_manifest(os.path.join(out, "ck"))
    entry = man["leaves"]["layers/0/mlp/up_proj/kernel"]
    shards = entry["crc32"]["packed"]["shards"]
    assert len(shards) == 4, shards  # one checksum per distinct shard, no whole-array gather
    ref = jax.tree.leaves(qp)
    # Into the same layout (each device reads its shard) ...
    back, _ = checkpoint.restore(os.path.join(out, "ck"), shardings=sh)
    for a, b, s in zip(jax.tree.leaves(back), ref, jax.tree.leaves(sh)):
      assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... into another one (checked region by region), and onto one device.
    other = formats.tree_shardings(qp, lambda p, s: P("model", None) if p.endswith("kernel")
                                   else P(), mesh)
    for shardings in (other, None):
      back, _ = checkpoint.restore(os.path.join(out, "ck"), shardings=shardings)
      for a, b in zip(jax.tree.leaves(back), ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A wrong shard checksum is caught.
    k = sorted(shards)[1]
    entry["crc32"]["packed"]["shards"][k] ^= 1
    with open(os.path.join(out, "ck", "manifest.json"), "w") as f:
      json.dump(man, f)
    for shardings in (sh, None):
      try:
        checkpoint.restore(os.path.join(out, "ck"), shardings=shardings)
        raise AssertionError("a corrupted shard was not caught")
      except checkpoint.CheckpointError as e:
        assert "fails its checksum" in str(e) and k in str(e), e
    try:
      checkpoint.restore(os.path.join(out, "ck"), shardings={"nope": sh["embed"]})
      raise AssertionError("an unknown shardings path was accepted")
    except checkpoint.CheckpointError as e:
      assert "nope" in str(e), e
    try:  # a dense sharding for a compressed leaf: its arrays do not match the stored ones
      checkpoint.restore(os.path.join(out, "ck"), shardings={"layers": {0: {"mlp": {"up_proj": {
          "kernel": sh["embed"]["embedding"]}}}}})
      raise AssertionError("shardings of another format were accepted")
    except checkpoint.CheckpointError as e:
      assert "another format" in str(e), e
    entry["crc32"]["packed"]["shards"] = {}
    with open(os.path.join(out, "ck", "manifest.json"), "w") as f:
      json.dump(man, f)
    try:
      checkpoint.restore(os.path.join(out, "ck"))
      raise AssertionError("an entry without shard checksums was accepted")
    except checkpoint.CheckpointError as e:
      assert "no per-shard checksums" in str(e), e
    print("CKPT_OK")
""")


def test_sharded_checkpoints_save_per_shard_and_restore_into_a_layout(tmp_path):
  run_script(CKPT_SCRIPT.replace("sys.argv[1]", repr(str(tmp_path))), "CKPT_OK")
