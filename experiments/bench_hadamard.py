"""Per-call cost of the fast Hadamard transform vs a dense matmul (and vs the dense Hadamard).

Usage: python experiments/bench_hadamard.py  [prints one line per shape; run on an idle machine]
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import formats, transforms as T
from compressjax.quantize import hadamard_core as hc


def _time(f, *args, reps=200):
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(reps):
      y = f(*args)
    jax.block_until_ready(y)
    best = min(best, (time.perf_counter() - t0) / reps)
  return best * 1e6


def main():
  print(f"device: {jax.devices()[0].device_kind}")
  for (m, k, n) in [(8, 576, 1536), (8, 1536, 576)]:
    x = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32) * 0.05
    hdense = jnp.asarray(hc.hadamard_matrix(k), jnp.float32)
    inc = T.apply(T.incoherence(), {"layers": {0: {"mlp": {"up_proj": {"kernel": w}}}}})[0]
    inc = inc["layers"][0]["mlp"]["up_proj"]["kernel"]
    q = T.apply(T.chain(T.incoherence(), T.rtn(bits=2, group_size=64)),
                {"layers": {0: {"mlp": {"up_proj": {"kernel": w}}}}})[0]
    q = q["layers"][0]["mlp"]["up_proj"]["kernel"]
    qplain = T.apply(T.rtn(bits=2, group_size=64),
                     {"layers": {0: {"mlp": {"up_proj": {"kernel": w}}}}})[0]
    qplain = qplain["layers"][0]["mlp"]["up_proj"]["kernel"]
    fast = _time(jax.jit(hc.matmul_hadU), x)
    dense_h = _time(jax.jit(lambda a, b: a @ b), x, hdense)
    dense_w = _time(jax.jit(lambda a, b: a @ b), x, w)
    inc_dot = _time(jax.jit(formats.dot), x, inc)
    q_dot = _time(jax.jit(formats.dot), x, q)
    qp_dot = _time(jax.jit(formats.dot), x, qplain)
    print(f"x ({m},{k}) W ({k},{n}): fast hadU {fast:.1f} us | dense x@H_{k} {dense_h:.1f} us | "
          f"dense x@W {dense_w:.1f} us | dot(Incoherent dense) {inc_dot:.1f} us | "
          f"dot(Incoherent 2-bit) {q_dot:.1f} us | dot(2-bit plain) {qp_dot:.1f} us")
    su, sv = jnp.ones(k), jnp.ones(n)
    hk = jnp.eye(k) + 0.01
    rot_w = _time(hc.incoherent_weight, w, su, sv, reps=5)
    rot_h = _time(hc.incoherent_hessian, hk, su, reps=5)
    print(f"  per-layer preprocessing ({k},{n}): rotate W {rot_w / 1e3:.2f} ms, "
          f"rotate Hessian ({k},{k}) {rot_h / 1e3:.2f} ms")


if __name__ == "__main__":
  main()
