"""Compress the Dense kernels of your own Flax Linen model with compressjax and run it compressed.

  python examples/linen_model.py

A two-layer Linen MLP (any model made of ``nn.Dense`` works the same): RTN needs only the
parameters; GPTQ also needs each Dense layer's input statistics, gathered here with
``interop.linen_stats`` on calibration inputs. Both run under ``jax.jit`` with the packed
compressed leaves, and the held-out output error of each against the float model is printed.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compressjax import formats, interop, transforms as T

# nn.Dense with the two compressjax hooks: dense kernels behave exactly as before.
Dense = functools.partial(nn.Dense, dot_general=interop.dot_general,
                          promote_dtype=interop.promote_dtype)


class MLP(nn.Module):
  hidden: int = 128
  out: int = 64

  @nn.compact
  def __call__(self, x):
    return Dense(self.out, name="down")(nn.gelu(Dense(self.hidden, name="up")(x)))


def main():
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(128, 128)) * np.geomspace(0.1, 3.0, 128)  # correlated features
  cal = jnp.asarray(rng.normal(size=(512, 128)) @ mix / 4, jnp.float32)
  held = jnp.asarray(rng.normal(size=(256, 128)) @ mix / 4, jnp.float32)

  model = MLP()
  params = model.init(jax.random.key(0), cal[:1])["params"]
  run = jax.jit(lambda p, x: interop.linen_apply(model, {"params": p}, x))
  ref = run(params, held)

  # Calibration statistics (X^T X etc.) of every Dense input, keyed "up/kernel", "down/kernel".
  stats = interop.linen_stats(model, {"params": params}, [cal[:256], cal[256:]])
  errors = {}
  for name, recipe, st in [("rtn", T.rtn(bits=3, group_size=64, where=r".*/kernel"), None),
                           ("gptq", T.gptq(bits=3, group_size=64, where=r".*/kernel"), stats)]:
    q, _ = T.apply(recipe, params, st)
    err = errors[name] = float(jnp.mean((run(q, held) - ref) ** 2) / jnp.mean(ref ** 2))
    print(f"{name}: {formats.tree_nbytes(q)} bytes (float: {formats.tree_nbytes(params)}), "
          f"held-out relative output error {err:.4f}")
  return errors


if __name__ == "__main__":
  main()
