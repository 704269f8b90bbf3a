"""3-bit layouts for a tiled unpack path (issue 16 item 2): measured, format not changed yet.

Unpack 1536x1536 3-bit codes + a float32 reduction, jitted, median of 9, shared 2-core CPU
(2026-12-06): straddling bitstream (today, 884736 B) 5.24 ms; bit-planes (3 words per 32 codes,
884736 B) 4.93 ms; per-word (10 codes per uint32, 2 bits unused, 946176 B = +6.9%) 1.16 ms.
Per-word packing unpacks ~4.5x faster (one shift+mask per code, no cross-word gather).
"""
import time, numpy as np, jax, jax.numpy as jnp
from compressjax.formats import packing
rng = np.random.default_rng(0)
K, N = 1536, 1536
codes = rng.integers(0, 8, (K, N)).astype(np.uint8)
stream = packing.pack(jnp.asarray(codes), 3, 0)
# bit-planes: per 32 codes, 3 words, word b holds bit b of the 32 codes
c = codes.reshape(K // 32, 32, N).astype(np.uint32)
planes = np.stack([((c >> b) & 1) << np.arange(32, dtype=np.uint32)[None, :, None] for b in range(3)], 1).sum(2).astype(np.uint32)  # (K/32, 3, N)
planes = jnp.asarray(planes.reshape(-1, N))
# per-word: 10 codes per uint32
Kp = -(-K // 10) * 10
cp = np.zeros((Kp, N), np.uint32); cp[:K] = codes
pw = jnp.asarray((cp.reshape(Kp // 10, 10, N) << (3 * np.arange(10, dtype=np.uint32))[None, :, None]).sum(1).astype(np.uint32))
def u_stream(p): return packing._unpack(p, 3, K, 0)
def u_planes(p):
  p = p.reshape(K // 32, 3, 1, N); sh = jnp.arange(32, dtype=jnp.uint32)[None, :, None]
  return (((p[:, 0] >> sh) & 1) | (((p[:, 1] >> sh) & 1) << 1) | (((p[:, 2] >> sh) & 1) << 2)).astype(jnp.uint8).reshape(K, N)
def u_word(p):
  sh = (3 * jnp.arange(10, dtype=jnp.uint32))[None, :, None]
  return ((p[:, None, :] >> sh) & 7).astype(jnp.uint8).reshape(Kp, N)[:K]
for name, f, p in [("stream", u_stream, stream), ("bitplanes", u_planes, planes), ("perword", u_word, pw)]:
  g = jax.jit(lambda p: f(p).astype(jnp.float32).sum(0))
  assert (np.asarray(jax.jit(f)(p)) == codes).all(), name
  g(p).block_until_ready(); ts=[]
  for _ in range(9):
    t=time.perf_counter(); g(p).block_until_ready(); ts.append(time.perf_counter()-t)
  print(name, "bytes", p.nbytes, "unpack+reduce ms", round(1e3*np.median(ts),3))
