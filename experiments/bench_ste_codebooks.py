"""Step cost of straight-through (STE) and PV V-step re-encoding for AQLM, on one layer.

Times, on one ``576 x 1536`` weight (the reference model's MLP up/gate shape) at AQLM 2x8
(``g = 8``), jitted, after compilation, for ``--tokens`` activation rows:

* ``kd``: forward + backward of ``x @ W`` through the stored codes (the P-step / KD step);
* ``ste``: the same with the codes re-encoded from the latent at every forward pass
  (:mod:`compressjax.finetune.ste`, L2 beam search ``--beam``);
* ``encode``: the re-encoding alone (what one PV V-step pays per weight).

Prints wall and process CPU seconds per call (the CPU time is the honest number on a shared
machine).

  python experiments/bench_ste_codebooks.py --tokens 512 --beam 1
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import formats
from compressjax.finetune import ste


def _time(f, *args, reps=3):
  jax.block_until_ready(f(*args))  # compile (arguments, not constants: no constant folding)
  w0, c0 = time.perf_counter(), time.process_time()
  for _ in range(reps):
    jax.block_until_ready(f(*args))
  return (time.perf_counter() - w0) / reps, (time.process_time() - c0) / reps


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=576)
  ap.add_argument("--n", type=int, default=1536)
  ap.add_argument("--tokens", type=int, default=512)
  ap.add_argument("--beam", type=int, default=1)
  ap.add_argument("--reps", type=int, default=3)
  a = ap.parse_args()
  rng = np.random.default_rng(0)
  m, b, g = 2, 8, 8
  leaf = formats.AdditiveCodebookArray.from_codes(
      jnp.asarray(rng.integers(0, 2**b, (a.k // g, a.n, m))),
      jnp.asarray(rng.standard_normal((m, 2**b, g)) * 0.5, jnp.float16),
      jnp.asarray(rng.uniform(0.01, 0.02, a.n), jnp.float16), nbits=b)
  s = ste.to_ste({"w": leaf}, beam_size=a.beam)["w"]
  s = ste.STEWeight(s.latent + 1e-3 * jnp.asarray(rng.standard_normal(s.shape), jnp.float32),
                    s.scale, s.zero, s.codebook, s.codes0, kind=s.kind, meta=s.meta)
  x = jnp.asarray(rng.standard_normal((a.tokens, a.k)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((a.tokens, a.n)), jnp.float32)

  def kd(cb, sc, x, y):
    w = formats.AdditiveCodebookArray(leaf.codes, cb, sc, shape=leaf.shape, dtype=leaf.dtype,
                                      nbits=b)
    return jnp.sum(formats.dot(x, w) * y)

  kd_step = jax.jit(jax.grad(kd, argnums=(0, 1)))
  ste_step = jax.jit(jax.grad(lambda lat, cb, sc, x, y: jnp.sum(formats.dot(x, ste.STEWeight(
      lat, sc, None, cb, s.codes0, kind=s.kind, meta=s.meta)) * y), argnums=(0, 1, 2)))
  encode = jax.jit(lambda lat: s.codes(latent=lat))
  rows = [("kd (stored codes)", _time(kd_step, leaf.codebooks, leaf.scales, x, y, reps=a.reps)),
          ("ste (re-encode each step)", _time(ste_step, s.latent, s.codebook, s.scale, x, y,
                                              reps=a.reps)),
          ("encode only (PV V-step)", _time(encode, s.latent, reps=a.reps))]
  print(f"{a.k}x{a.n} AQLM {m}x{b} g={g}, {a.tokens} tokens, beam {a.beam}, "
        f"devices {jax.devices()}")
  for name, (wall, cpu) in rows:
    print(f"  {name:28s} wall {wall * 1e3:9.1f} ms   cpu {cpu * 1e3:9.1f} ms")


if __name__ == "__main__":
  main()
