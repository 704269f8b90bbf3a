"""Pallas kernels compiled for the real device (GPU or TPU): skipped on CPU, with the reason.

Run on the GPU machine by ``experiments/gpu_kernels.sh``. Same cases as the interpret tests,
at bf16 and float32, against the pure-jnp references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
import pallas_kernels as pk

_BACKEND = jax.default_backend()
pytestmark = pytest.mark.skipif(
    _BACKEND not in ("gpu", "cuda", "rocm", "tpu"),
    reason=f"needs a GPU or TPU (default backend is {_BACKEND!r}); the same kernels run in "
           f"interpret mode in tests/test_pallas_kernels.py")


def _rel_err(y, want):
  y, want = np.asarray(y, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(y - want)) / (np.max(np.abs(want)) + 1e-6))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("bits,gs,symmetric", [(2, 64, True), (3, 128, False), (4, 128, False),
                                               (4, 32, True), (8, 128, True)])
@pytest.mark.parametrize("rows", [1, 17, 128])
def test_quant_matmul_on_device(bits, gs, symmetric, rows, dtype, tol):
  rng = np.random.default_rng(bits + rows)
  k, n = 1024, 1000
  codes = jnp.asarray(rng.integers(0, 2**bits, (k, n)))
  scale = jnp.asarray(rng.uniform(0.01, 0.1, (k // gs, n)), jnp.float16)
  zero = None if symmetric else jnp.asarray(rng.normal(size=(k // gs, n)) * 0.1, jnp.float16)
  w = formats.QuantizedArray.from_codes(codes, scale, zero, bits=bits, group_size=gs,
                                        symmetric=symmetric, dtype=dtype)
  x = jnp.asarray(rng.normal(size=(rows, k)), dtype)
  y = jax.jit(lambda x, w: formats.dot(x, w, implementation="pallas"))(x, w)
  assert _rel_err(y, pk.quant_matmul_ref(x, w)) < tol


@pytest.mark.parametrize("m,nbits", [(2, 8), (1, 16)])
@pytest.mark.parametrize("rows", [1, 17])
def test_aqlm_matmul_on_device(m, nbits, rows):
  rng = np.random.default_rng(m + rows)
  k, n = 1024, 1000
  w = formats.AdditiveCodebookArray.from_codes(
      jnp.asarray(rng.integers(0, 2**nbits, (k // 8, n, m))),
      jnp.asarray(rng.normal(size=(m, 2**nbits, 8)), jnp.float16),
      jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float16), nbits=nbits)
  x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
  y = jax.jit(lambda x, w: formats.dot(x, w, implementation="pallas"))(x, w)
  assert _rel_err(y, pk.aqlm_matmul_ref(x, w)) < 1e-4


@pytest.mark.parametrize("rows", [1, 17])
def test_e8p_matmul_on_device(rows):
  rng = np.random.default_rng(rows)
  w = formats.E8PArray(jnp.asarray(rng.integers(0, 2**16, (128, 1000)), jnp.uint16),
                       jnp.asarray(0.5, jnp.float32), dtype=jnp.float32)
  x = jnp.asarray(rng.normal(size=(rows, 1024)), jnp.float32)
  y = jax.jit(lambda x, w: formats.dot(x, w, implementation="pallas"))(x, w)
  assert _rel_err(y, pk.e8p_matmul_ref(x, w)) < 1e-4


def test_gradient_on_device():
  rng = np.random.default_rng(0)
  w = formats.QuantizedArray.from_codes(
      jnp.asarray(rng.integers(0, 16, (256, 128))), jnp.ones((2, 128), jnp.float32), None,
      bits=4, group_size=128, symmetric=True)
  x = jnp.asarray(rng.normal(size=(4, 256)), jnp.float32)
  g = lambda impl: jax.grad(lambda x: jnp.sum(formats.dot(x, w, implementation=impl) ** 2))(x)
  np.testing.assert_allclose(g("pallas"), g("xla"), rtol=1e-3, atol=1e-3)


def _hopper() -> bool:
  dev = jax.devices()[0]
  return getattr(dev, "compute_capability", None) in ("9.0", "9.0a") or any(
      h in dev.device_kind for h in ("H100", "H200", "H800", "GH200"))


# The Mosaic GPU (Hopper) 4-bit kernel: dequantized weights are rounded to bf16 before the
# tensor cores, activations are multiplied in bf16 (f32 accumulation): relative error (max
# |y - ref| / max |ref|) below 2e-2 at any input dtype. K=576 with g64 has a ragged last step
# (TMA zero fill), rows 300 three row blocks.
@pytest.mark.parametrize("k,n,gs,symmetric", [(576, 1536, 64, True), (1536, 576, 128, False),
                                              (4096, 4096, 128, True)])
@pytest.mark.parametrize("rows", [1, 8, 128, 300])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_quant_matmul_mgpu_on_device(k, n, gs, symmetric, rows, dtype):
  if not _hopper():
    pytest.skip(f"Mosaic GPU wgmma needs a Hopper GPU (got {jax.devices()[0].device_kind!r})")
  import time  # pylint: disable=g-import-not-at-top
  from pallas_kernels import quant_matmul_mgpu as qm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(rows + k)
  scale = jnp.asarray(rng.uniform(0.01, 0.1, (k // gs, n)), jnp.float16)
  zero = None if symmetric else jnp.asarray(rng.normal(size=(k // gs, n)) * 0.1, jnp.float16)
  w = formats.QuantizedArray.from_codes(jnp.asarray(rng.integers(0, 16, (k, n))), scale, zero,
                                        bits=4, group_size=gs, symmetric=symmetric, dtype=dtype)
  x = jnp.asarray(rng.normal(size=(rows, k)), dtype)
  f = jax.jit(lambda x, w: formats.dot(x, w, implementation="pallas_mgpu"))
  y = f(x, w)
  err = _rel_err(y, pk.quant_matmul_ref(x, w))
  dense = jax.jit(jnp.matmul)
  wd = w.materialize().astype(jnp.bfloat16)
  xb = x.astype(jnp.bfloat16)
  times = {}
  for name, fn, args in (("mgpu", f, (x, w)), ("dense_bf16", dense, (xb, wd))):
    fn(*args).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
      out = fn(*args)
    out.block_until_ready()
    times[name] = (time.perf_counter() - t0) / 10 * 1e3
  print(f"mgpu K={k} N={n} g{gs} rows={rows} {jnp.dtype(dtype).name}: rel_err={err:.2e} "
        f"ms={times['mgpu']:.4f} dense_bf16_ms={times['dense_bf16']:.4f}")
  assert err < 2e-2
  assert qm.supports(x, w)


# The same Mosaic GPU kernel at 2, 3 and 8 bits (lowers on CPU; not yet run on a GPU when
# written). K=576: ragged last step (2 bits: 36 words, 2-row TMA tiles; 3 bits: 58 words and
# words straddling g64 groups); N=96: a ragged 64-column block; 3-bit g128 at K=4096: 5 groups
# per 640-code step. Checked against the reference and against emulate() (the kernel's own
# arithmetic in jax.numpy), at the bf16 tolerance of the 4-bit test.
@pytest.mark.parametrize("bits,k,n,gs,symmetric", [
    (2, 576, 1536, 64, True), (2, 4096, 96, 128, False), (3, 576, 1536, 64, True),
    (3, 4096, 4096, 128, False), (3, 1536, 96, 32, True), (8, 576, 1536, 64, False),
    (8, 4096, 4096, 128, True)])
@pytest.mark.parametrize("rows", [1, 8, 128, 300])
def test_quant_matmul_mgpu_new_widths_on_device(bits, k, n, gs, symmetric, rows):
  if not _hopper():
    pytest.skip(f"Mosaic GPU wgmma needs a Hopper GPU (got {jax.devices()[0].device_kind!r})")
  from pallas_kernels import quant_matmul_mgpu as qm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(rows + k + bits)
  scale = jnp.asarray(rng.uniform(0.01, 0.1, (k // gs, n)), jnp.float16)
  zero = None if symmetric else jnp.asarray(rng.normal(size=(k // gs, n)) * 0.1, jnp.float16)
  w = formats.QuantizedArray.from_codes(jnp.asarray(rng.integers(0, 2**bits, (k, n))), scale,
                                        zero, bits=bits, group_size=gs, symmetric=symmetric,
                                        dtype=jnp.bfloat16)
  x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
  assert qm.can_use(x, w)
  y = jax.jit(lambda x, w: formats.dot(x, w, prefer="pallas_mgpu"))(x, w)
  err = _rel_err(y, pk.quant_matmul_ref(x, w))
  err_emu = _rel_err(y, qm.emulate(x, w))
  print(f"mgpu {bits}b K={k} N={n} g{gs} rows={rows}: rel_err={err:.2e} vs_emulate={err_emu:.2e}")
  assert err < 2e-2
  assert err_emu < 1e-2
