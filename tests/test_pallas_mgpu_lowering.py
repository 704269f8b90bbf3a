"""Lowering checks of the Mosaic GPU (Hopper) 4-bit kernel for ``cuda`` without a GPU.

``jit(...).trace(...).lower(lowering_platforms=("cuda",))`` runs Pallas' Mosaic GPU lowering
(register layouts, shared-memory transforms, ``wgmma`` shapes, shared-memory budget) and must
emit the ``mosaic_gpu`` custom call. Compiling to SASS and running need a Hopper GPU
(``tests/test_pallas_gpu.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
from pallas_kernels import quant_matmul_mgpu as qm


def _weight(k, n, group, symmetric):
  rng = np.random.default_rng(0)
  zero = None if symmetric else jnp.zeros((k // group, n), jnp.float16)
  return formats.QuantizedArray.from_codes(
      jnp.asarray(rng.integers(0, 16, (k, n))), jnp.ones((k // group, n), jnp.float16), zero,
      bits=4, group_size=group, symmetric=symmetric, dtype=jnp.bfloat16)


# Reference-model shapes (K=576 -> 1536, 1536 -> 576: a ragged last K step at g64) and a
# 7B-ish 4096 x 4096; rows 1 and 8 (decode), 128 (one full row block), 300 (three blocks).
CASES = [(rows, 576, 1536, 64, True) for rows in (1, 8, 128)] + [
    (1, 1536, 576, 64, True), (1, 1536, 576, 128, False), (8, 4096, 4096, 128, True),
    (128, 4096, 4096, 64, False), (1, 4096, 4096, 64, False), (300, 512, 256, 128, True),
    (8, 512, 256, 256, True)]


@pytest.mark.parametrize("rows,k,n,group,symmetric", CASES)
def test_lowers_for_cuda_through_mosaic_gpu(rows, k, n, group, symmetric):
  w = _weight(k, n, group, symmetric)
  x = jnp.ones((rows, k), jnp.bfloat16)
  assert qm.supports(x, w)
  text = jax.jit(qm.quant_matmul_mgpu).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.custom_call @mosaic_gpu" in text, text[:2000]
  assert "triton" not in text


def test_step_stays_inside_or_holds_whole_groups():
  assert qm.step_codes(8, 4096, 64) == 512      # 8 groups per step (column masks)
  assert qm.step_codes(128, 4096, 128) == 256   # the (128, tk) activation tile fits 64 KiB
  assert qm.step_codes(8, 4096, 1024) == 512    # inside one group
  assert qm.step_codes(8, 576, 64) == 512       # K=576: one ragged step of 512 + 64


def test_unsupported_shapes_are_refused():
  x = jnp.ones((1, 512), jnp.bfloat16)
  assert not qm.supports(x, _weight(512, 96, 128, True))  # N not a multiple of 64
  w3 = formats.QuantizedArray.from_codes(jnp.zeros((512, 256), jnp.int32),
                                         jnp.ones((4, 256), jnp.float16), None, bits=3,
                                         group_size=128, symmetric=True, dtype=jnp.bfloat16)
  assert not qm.supports(x, w3)
  with pytest.raises(NotImplementedError, match="N % 64"):
    qm.quant_matmul_mgpu(x, _weight(512, 96, 128, True))


def test_registered_on_request_only():
  names = [i.name for i in formats.dispatch.implementations(formats.QuantizedArray)]
  assert "pallas_mgpu" in names
  w = _weight(512, 256, 128, True)
  x = jnp.ones((1, 512), jnp.bfloat16)
  # Never chosen automatically (here: CPU, and below "xla" in priority everywhere).
  assert names.index("pallas_mgpu") > names.index("xla")
  text = jax.jit(lambda x, w: formats.dot(x, w, implementation="pallas_mgpu")).trace(
      x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.custom_call @mosaic_gpu" in text
