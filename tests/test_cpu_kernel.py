"""The C++ CPU kernel (``compressjax.kernels.cpu``, an XLA FFI custom call) against the reference.

Tolerance: the kernel sums the same float32 products in another order (per group, then scaled),
so ``|y - ref| <= 1e-5 * (|x| @ |W|) + 1e-6`` elementwise, with ``ref = x @ W`` in float64.
The build is not optional here: CI has g++, so a build failure FAILS these tests (never a skip).
"""

import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
from compressjax.kernels import cpu
from compressjax.kernels.cpu import builder


@pytest.fixture(scope="module", autouse=True)
def _built():
  try:
    cpu.load()
  except cpu.CpuKernelBuildError as e:
    pytest.fail(f"the CPU kernel must build on CI (g++ is installed): {e}", pytrace=False)


def _quantized(rng, k, n, bits, gs, symmetric, sdtype=jnp.float16):
  codes = jnp.asarray(rng.integers(0, 2**bits, (k, n)), jnp.int32)
  scale = jnp.asarray(rng.uniform(0.01, 0.1, (k // gs, n)), sdtype)
  zero = None if symmetric else jnp.asarray(rng.normal(size=(k // gs, n)) * 0.1, sdtype)
  return formats.QuantizedArray.from_codes(codes, scale, zero, bits=bits, group_size=gs,
                                           symmetric=symmetric)


def _check(y, x, w):
  wd = np.asarray(w.materialize(), np.float64)
  xd = np.asarray(x, np.float64).reshape(-1, w.shape[0])
  ref = (xd @ wd).reshape(y.shape)
  bound = (np.abs(xd) @ np.abs(wd)).reshape(y.shape)
  assert y.dtype == jnp.float32 and y.shape == ref.shape
  err = np.abs(np.asarray(y, np.float64) - ref)
  assert np.all(err <= 1e-5 * bound + 1e-6), (err.max(), (err - 1e-5 * bound).max())


def _uses_kernel(f, *args) -> bool:
  # A fresh function each time: traces are cached per function, and the choice is made at trace
  # time (an environment change does not retrace an already-traced function).
  return "ffi_call" in str(jax.make_jaxpr(lambda *a: f(*a))(*args))


# (bits, group_size, symmetric, rows, K, N, scale dtype). K and N are not multiples of 8/16/32
# where the layout allows; 3-bit groups straddle the 10-code words (g24, g40); N = 130, 200 split
# over two threads (>= 8 column blocks) and end in a scalar tail.
CASES = [
    (2, 32, True, 1, 96, 7, jnp.float16),
    (2, 16, False, 16, 48, 130, jnp.float32),
    (3, 24, True, 3, 72, 37, jnp.float16),
    (3, 40, False, 5, 120, 200, jnp.bfloat16),
    (3, 64, True, 1, 192, 16, jnp.float32),
    (4, 64, True, 1, 192, 130, jnp.float16),
    (4, 8, False, 7, 40, 33, jnp.float16),
    (4, 96, True, 12, 96, 1, jnp.bfloat16),
    (8, 12, True, 2, 36, 50, jnp.float16),
    (8, 128, False, 9, 256, 144, jnp.float32),
]


@pytest.mark.parametrize("bits,gs,sym,rows,k,n,sdtype", CASES)
def test_kernel_matches_reference(bits, gs, sym, rows, k, n, sdtype):
  rng = np.random.default_rng(bits * 1000 + k + n)
  w = _quantized(rng, k, n, bits, gs, sym, sdtype)
  x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
  y = cpu.quant_gemv(x, w)
  _check(y, x, w)
  _check(cpu.quant_gemv(x, w, threads=0), x, w)  # all of XLA's intra-op threads
  _check(cpu.quant_gemv(x, w, threads=2), x, w)
  _check(formats.dot(x, w, implementation="xla"), x, w)  # the fallback meets the same bound


def test_scalar_fallback_matches_reference():
  lib = builder.load(variant="scalar")
  assert not lib.simd
  flags = set(builder._cpu_flags().split())  # pylint: disable=protected-access
  if {"avx2", "fma"} <= flags:  # -march=native must have taken the AVX2/FMA path
    assert builder.load().simd
  rng = np.random.default_rng(3)
  for bits, gs, sym, rows, k, n in [(3, 40, False, 3, 120, 37), (4, 32, True, 2, 64, 20)]:
    w = _quantized(rng, k, n, bits, gs, sym)
    x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
    _check(cpu.quant_gemv(x, w, variant="scalar"), x, w)


def test_dispatch_picks_kernel_and_falls_back(monkeypatch):
  rng = np.random.default_rng(0)
  w = _quantized(rng, 64, 40, 4, 32, False)
  x = jnp.asarray(rng.normal(size=(2, 3, 64)), jnp.float32)  # 6 rows, leading dims reshaped
  assert jax.default_backend() == "cpu"
  assert _uses_kernel(formats.dot, x, w)
  y = jax.jit(formats.dot)(x, w)
  assert y.shape == (2, 3, 40)
  _check(y, x, w)
  big = jnp.asarray(rng.normal(size=(cpu.MAX_ROWS + 1, 64)), jnp.float32)
  assert not _uses_kernel(formats.dot, big, w)  # above the row threshold: XLA path
  assert not _uses_kernel(formats.dot, x.astype(jnp.bfloat16), w)  # not float32
  assert not _uses_kernel(lambda x, w: formats.dot(x, w, implementation="xla"), x, w)
  assert not _uses_kernel(lambda x, w: formats.dot(x, w, prefer="xla"), x, w)
  with pytest.raises(NotImplementedError):
    formats.dot(big, w, implementation="cpu")
  monkeypatch.setenv("COMPRESSJAX_CPU_KERNEL", "0")
  assert not _uses_kernel(formats.dot, x, w)


def test_grad_equals_reference():
  rng = np.random.default_rng(1)
  for sym in (True, False):
    w = _quantized(rng, 96, 24, 3, 32, sym, jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 96)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(3, 24)), jnp.float32)

    def loss(x, w, impl):
      return jnp.sum(formats.dot(x, w, implementation=impl) * ct)

    gx, gw = jax.grad(loss, argnums=(0, 1), allow_int=True)(x, w, "cpu")
    rx, rw = jax.grad(loss, argnums=(0, 1), allow_int=True)(x, w, "xla")
    np.testing.assert_allclose(gx, rx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gw.scale, rw.scale, rtol=1e-6, atol=1e-6)
    if not sym:
      np.testing.assert_allclose(gw.zero, rw.zero, rtol=1e-6, atol=1e-6)


def test_vmap_folds_batch_into_rows_and_falls_back():
  rng = np.random.default_rng(2)
  w = _quantized(rng, 64, 20, 2, 32, True)
  f = jax.vmap(lambda x: formats.dot(x, w))
  small = jnp.asarray(rng.normal(size=(3, 2, 64)), jnp.float32)  # 6 rows: kernel
  assert _uses_kernel(f, small)
  _check(f(small), small, w)
  large = jnp.asarray(rng.normal(size=(10, 2, 64)), jnp.float32)  # 20 rows: XLA path
  assert not _uses_kernel(f, large)
  _check(f(large), large, w)
  # A batched weight (stacked leaves) goes to the reference.
  ws = jax.tree.map(lambda *a: jnp.stack(a), w, _quantized(rng, 64, 20, 2, 32, True))
  xs = jnp.asarray(rng.normal(size=(2, 1, 64)), jnp.float32)
  ys = jax.vmap(lambda x, w: formats.dot(x, w))(xs, ws)
  for i in range(2):
    _check(ys[i], xs[i], jax.tree.map(lambda a, i=i: a[i], ws))


def _fake_compiler(tmp_path, body):
  script = tmp_path / "fakecxx"
  script.write_text("#!/bin/sh\n" + body)
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return str(script)


def test_build_cache_is_reused(tmp_path):
  real = builder.load().path
  count = tmp_path / "count"
  # Copies the real library to the output (last argument) and counts its calls.
  cxx = _fake_compiler(tmp_path, f'echo x >> {count}\nfor a; do out="$a"; done\n'
                                 f'cp {real} "$out"\n')
  d = tmp_path / "cache"
  p1 = builder.build(cxx=cxx, directory=d)
  p2 = builder.build(cxx=cxx, directory=d)
  assert p1 == p2 and p1.exists() and count.read_text().count("x") == 1
  assert sorted(os.listdir(d)) == [p1.name]  # no temporary left behind
  assert builder.build() == real  # the default cache holds the library already loaded


def test_broken_compiler_gives_clear_error(tmp_path):
  with pytest.raises(cpu.CpuKernelBuildError, match="/nonexistent/g\\+\\+"):
    builder.build(cxx="/nonexistent/g++", directory=tmp_path / "a")
  cxx = _fake_compiler(tmp_path, 'echo "fatal: unsupported -march" >&2\nexit 3\n')
  with pytest.raises(cpu.CpuKernelBuildError) as e:
    builder.build(cxx=cxx, directory=tmp_path / "b")
  msg = str(e.value)
  assert "exit status 3" in msg and "fatal: unsupported -march" in msg and cxx in msg
  assert "quant_gemv.cc" in msg and "COMPRESSJAX_CPU_KERNEL=0" in msg
  assert os.listdir(tmp_path / "b") == []  # the temporary output is removed


def test_threads_from_environment(monkeypatch):
  """``$COMPRESSJAX_CPU_KERNEL_THREADS`` sets the automatic dispatch's threads (0: XLA's pool,
  same result up to summation order); anything but an integer >= 0 is refused by name."""
  monkeypatch.delenv("COMPRESSJAX_CPU_KERNEL_THREADS", raising=False)
  assert cpu.default_threads() == cpu.DEFAULT_THREADS
  monkeypatch.setenv("COMPRESSJAX_CPU_KERNEL_THREADS", "0")
  assert cpu.default_threads() == 0
  w = _quantized(np.random.default_rng(1), 64, 48, 4, 32, symmetric=False)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 64)), jnp.float32)
  _check(cpu.cpu_matmul(x, w), x, w)
  monkeypatch.setenv("COMPRESSJAX_CPU_KERNEL_THREADS", "two")
  with pytest.raises(ValueError, match="COMPRESSJAX_CPU_KERNEL_THREADS"):
    cpu.default_threads()


def test_unwritable_cache_directory_is_a_build_error(tmp_path):
  """A cache folder that cannot be created is a CpuKernelBuildError naming it (so automatic
  dispatch falls back to the XLA path), not a bare OSError."""
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(builder.CpuKernelBuildError, match="cache directory"):
    builder.build(directory=blocker / "sub")
