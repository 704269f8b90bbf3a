"""Lowering checks of the Pallas kernels for targets that the installed jaxlib can lower for
without the hardware (``jit(...).trace(...).lower(lowering_platforms=...)``).

* ``cuda``: every kernel lowers through Pallas Triton (to Triton IR; compiling that to PTX
  needs the GPU and is exercised by ``test_pallas_gpu.py`` and ``experiments/gpu_kernels.sh``).
* ``tpu``: Mosaic TPU refuses these kernels' block shapes and table gathers; each case is
  attempted, and a refusal is reported as a skip with Mosaic's reason (it is not verified).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
import pallas_kernels as pk
from pallas_kernels import _common


def _weights():
  rng = np.random.default_rng(0)
  k, n = 512, 256
  def q(bits, symmetric):
    zero = None if symmetric else jnp.zeros((k // 128, n), jnp.float16)
    return formats.QuantizedArray.from_codes(
        jnp.asarray(rng.integers(0, 2**bits, (k, n))), jnp.ones((k // 128, n), jnp.float16),
        zero, bits=bits, group_size=128, symmetric=symmetric, dtype=jnp.bfloat16)
  return {
      "quant2": (pk.quant_matmul, q(2, True)),
      "quant3": (pk.quant_matmul, q(3, False)),
      "quant4": (pk.quant_matmul, q(4, False)),
      "quant8": (pk.quant_matmul, q(8, True)),
      "aqlm2x8": (pk.aqlm_matmul, formats.AdditiveCodebookArray.from_codes(
          jnp.asarray(rng.integers(0, 256, (k // 8, n, 2))), jnp.ones((2, 256, 8), jnp.float16),
          jnp.ones(n, jnp.float16), nbits=8)),
      "aqlm1x16": (pk.aqlm_matmul, formats.AdditiveCodebookArray.from_codes(
          jnp.asarray(rng.integers(0, 2**16, (k // 8, n, 1))),
          jnp.ones((1, 2**16, 8), jnp.float16), jnp.ones(n, jnp.float16), nbits=16)),
      "e8p": (pk.e8p_matmul, formats.E8PArray(jnp.zeros((k // 8, n), jnp.uint16),
                                              jnp.asarray(1.0, jnp.float32), dtype=jnp.float32)),
  }


def _lower(name, platform, target, rows):
  fn, w = _weights()[name]
  x = jnp.ones((rows, w.shape[0]), jnp.bfloat16)
  f = jax.jit(lambda x, w: fn(x, w, config=_common.CONFIGS[target], target=target))
  return f.trace(x, w).lower(lowering_platforms=(platform,)).as_text()


NAMES = ["quant2", "quant3", "quant4", "quant8", "aqlm2x8", "aqlm1x16", "e8p"]


# quant3 (10 codes per word, K=512 -> 52 words, g128 -> steps of 128 codes in 16-word windows):
# rows=128 also lowers its (64, 16) @ (16, 128) tensor-core dots.
@pytest.mark.parametrize("name,rows", [(n, 1) for n in NAMES] + [
    ("quant4", 17), ("quant4", 128), ("quant3", 128), ("e8p", 64)])
def test_lowers_for_cuda_through_triton(name, rows):
  # rows=1: broadcast products (decode); rows >= 64: tensor-core dots (gpu block_m = 64);
  # rows=17: padded to a power-of-2 row block (Triton needs power-of-2 tiles).
  text = _lower(name, "cuda", "gpu", rows=rows)
  assert "triton_kernel_call" in text or "__gpu$xla.gpu.triton" in text, text[:2000]


@pytest.mark.parametrize("name", ["quant4", "e8p"])
def test_lowering_for_tpu(name):
  try:
    text = _lower(name, "tpu", "tpu", rows=8)
  except Exception as e:  # pylint: disable=broad-except
    reason = f"Mosaic TPU cannot lower {name} here: {type(e).__name__}: {str(e).splitlines()[0]}"
    print(reason)
    pytest.skip(reason)
  assert "tpu_custom_call" in text
