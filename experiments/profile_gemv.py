"""1-row products on XLA CPU (issue 16 item 5, CPU): what a decode-step matmul costs per formulation.

Part 1 (cache-hot, one 576x1536 4-bit g64 weight, medians of 15 interleaved): dense f32, dense
bf16, an int8 x int8 dot on ready int8 codes, ``formats.dot`` (tiled), int8 activations with
per-group int32 partial sums, bf16 tiles, per-group scale folding in f32.
Part 2 (cache-cold: 30 distinct 576x1536 weights summed in one jit, 106 MB dense): dense f32 vs
tiled 4-bit vs decode-then-matmul 4-bit vs tiled 2-bit.

Measured 2026-12-06 on the shared 2-core host at load ~5 (ms): part 1 dense 0.29, dense bf16
0.51, int8 dot only 0.51, tiled 0.40, int8 groups 0.53, bf16 tiles 0.47, f32 groups 0.53;
part 2 dense 8.0, tiled 4-bit 9.8, decode-then-matmul 4-bit 53.4, tiled 2-bit 14.5.
Usage: ``python experiments/profile_gemv.py``.
"""
import time, numpy as np, jax, jax.numpy as jnp
from compressjax import formats
from compressjax.formats import packing, tiled
import sys; sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from bench_prefill import leaf
K, N = 576, 1536
w = leaf(K, N, 4); d = w.materialize()
x = jnp.asarray(np.random.default_rng(1).standard_normal((1, K)), jnp.float32)
G = K // 64
def int8_groups(x, w):
  c = (packing.unpack(w.packed, 4, K).astype(jnp.int8) - 8).reshape(G, 64, N)
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.
  xq = jnp.round(x / amax).astype(jnp.int8).reshape(x.shape[0], G, 64)
  part = jnp.einsum("mgk,gkn->mgn", xq, c, preferred_element_type=jnp.int32)
  return jnp.einsum("mgn,gn->mn", part.astype(jnp.float32), w.scale.astype(jnp.float32)) * amax
def int8_full(x, w):
  # int8 codes dot without groups (per-channel proxy): speed of XLA CPU int8 dot
  c = (packing.unpack(w.packed, 4, K).astype(jnp.int8) - 8)
  xq = jnp.round(x * 10).astype(jnp.int8)
  return jnp.matmul(xq, c, preferred_element_type=jnp.int32).astype(jnp.float32)
def bf16_tiled(x, w):
  return tiled.tiled_dot(x, w, compute_dtype=jnp.bfloat16)
def f32_groups(x, w):
  c = (packing.unpack(w.packed, 4, K).astype(jnp.float32) - 8).reshape(G, 64, N)
  part = jnp.einsum("mgk,gkn->mgn", x.reshape(x.shape[0], G, 64), c)
  return jnp.einsum("mgn,gn->mn", part, w.scale.astype(jnp.float32))
d16 = d.astype(jnp.bfloat16)
c8 = (packing.unpack(w.packed, 4, K).astype(jnp.int8) - 8)
fns = {"dense": (lambda x, d: x @ d, d), "dense_bf16": (lambda x, d: (x.astype(jnp.bfloat16) @ d).astype(jnp.float32), d16),
       "int8_dot_only": (lambda x, c: jnp.matmul(jnp.round(x*10).astype(jnp.int8), c, preferred_element_type=jnp.int32), c8),
       "auto": (formats.dot, w), "int8_groups": (int8_groups, w), "int8_full": (int8_full, w), "bf16_tiled": (bf16_tiled, w),
       "f32_groups": (f32_groups, w)}
jf = {k: jax.jit(f) for k, (f, a) in fns.items()}
for k, (f, a) in fns.items():
  jax.block_until_ready(jf[k](x, a))
ts = {k: [] for k in fns}
for _ in range(15):
  for k, (f, a) in fns.items():
    t = time.perf_counter(); jax.block_until_ready(jf[k](x, a)); ts[k].append(time.perf_counter() - t)
print("hot 576x1536, 1 row, ms:", {k: round(1e3 * np.median(v), 3) for k, v in ts.items()})

# Part 2: cache-cold chain.
K, N, L = 576, 1536, 30
ws = [leaf(K, N, 4, seed=i) for i in range(L)]
w2 = [leaf(K, N, 2, seed=i) for i in range(L)]
ds = [w.materialize() for w in ws]
x = jnp.asarray(np.random.default_rng(1).standard_normal((1, K)), jnp.float32)
def chain(dot):
  def f(x, ws):
    acc = 0.
    for w in ws:  # independent products over L distinct weights (cold cache: 106 MB dense)
      acc = acc + dot(x, w)
    return acc
  return jax.jit(f)
fns = {"dense": (chain(lambda x, d: x @ d), ds), "q4_tiled": (chain(formats.dot), ws),
       "q4_old": (chain(lambda x, w: x @ w.materialize()), ws), "q2_tiled": (chain(formats.dot), w2)}
for k, (f, a) in fns.items():
  jax.block_until_ready(f(x, a))
ts = {k: [] for k in fns}
for _ in range(9):
  for k, (f, a) in fns.items():
    t = time.perf_counter(); jax.block_until_ready(f(x, a)); ts[k].append(time.perf_counter() - t)
print("30 x 576x1536, 1 row, ms:", {k: round(1e3 * np.median(v), 2) for k, v in ts.items()})
