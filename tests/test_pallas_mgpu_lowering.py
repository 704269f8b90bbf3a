"""CPU checks of the Mosaic GPU (Hopper) 2/3/4/8-bit kernel: ``cuda`` lowering and its arithmetic.

``jit(...).trace(...).lower(lowering_platforms=("cuda",))`` runs Pallas' Mosaic GPU lowering
(register layouts, shared-memory transforms, TMA tilings, ``wgmma`` shapes, shared-memory
budget) and must emit the ``mosaic_gpu`` custom call. Compiling to SASS and running need a
Hopper GPU (``tests/test_pallas_gpu.py``); jax 0.10.2's Mosaic GPU interpreter rejects the
kernel's BlockSpec windows, so the kernel itself cannot run here. What runs here instead is
:func:`pallas_kernels.quant_matmul_mgpu.emulate`: the kernel's own plane dequantization, scale
tiles, column masks and step geometry in ``jax.numpy``, against the reference.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
from compressjax.formats import packing
import pallas_kernels as pk
from pallas_kernels import quant_matmul_mgpu as qm


def _weight(k, n, group, symmetric, bits=4, seed=0):
  rng = np.random.default_rng(seed)
  scale = jnp.asarray(rng.uniform(0.01, 0.1, (k // group, n)), jnp.float16)
  zero = None if symmetric else jnp.asarray(rng.normal(size=(k // group, n)) * 0.1, jnp.float16)
  return formats.QuantizedArray.from_codes(
      jnp.asarray(rng.integers(0, 2**bits, (k, n))), scale, zero, bits=bits, group_size=group,
      symmetric=symmetric, dtype=jnp.bfloat16)


def _lowered(x, w):
  return jax.jit(qm.quant_matmul_mgpu).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


# 4-bit: reference-model shapes (K=576 -> 1536, 1536 -> 576: a ragged last K step at g64) and a
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
  text = _lowered(x, w)
  assert "stablehlo.custom_call @mosaic_gpu" in text, text[:2000]
  assert "triton" not in text


# 2, 3 and 8 bits (6 in the default suite, ~0.5 s each, the rest slow): rows 1, 8, 128 and a ragged 300; K = 576 (2
# bits: 36 words, 2-row TMA tiles, a ragged step; 3 bits: 58 words, words straddling g64 groups),
# 1536, 4096; N = 96 (a ragged 64-column block), 576, 1536; groups 32..256; sym and asym.
_SLOW = pytest.mark.slow
NEW_CASES = [
    (2, 1, 576, 96, 64, True), pytest.param(2, 8, 1536, 576, 128, False, marks=_SLOW),
    pytest.param(2, 128, 4096, 256, 32, True, marks=_SLOW), (2, 300, 576, 128, 64, False),
    (3, 1, 576, 1536, 64, True), pytest.param(3, 8, 4096, 96, 128, False, marks=_SLOW),
    (3, 128, 1536, 128, 32, True), pytest.param(3, 300, 1280, 64, 256, False, marks=_SLOW),
    pytest.param(8, 1, 576, 1536, 64, False, marks=_SLOW), (8, 8, 1536, 96, 128, True),
    pytest.param(8, 128, 4096, 128, 256, True, marks=_SLOW), (8, 300, 512, 64, 32, False),
]


@pytest.mark.parametrize("bits,rows,k,n,group,symmetric", NEW_CASES)
def test_new_widths_lower_for_cuda(bits, rows, k, n, group, symmetric):
  w = _weight(k, n, group, symmetric, bits)
  x = jnp.ones((rows, k), jnp.bfloat16)
  assert qm.supports(x, w), qm.plan(bits, rows, k, group)
  text = _lowered(x, w)
  assert "stablehlo.custom_call @mosaic_gpu" in text, text[:2000]
  assert f"quant_matmul_mgpu_{bits}b_g{group}" in text


@pytest.mark.slow
@pytest.mark.parametrize("bits,group,rows,kn", list(itertools.product(
    (2, 3, 4, 8), (32, 64, 128, 256), (1, 8, 128, 300),
    ((576, 1536), (1536, 576), (4096, 96), (640, 160)))))
def test_full_grid_lowers_for_cuda(bits, group, rows, kn):
  k, n = kn
  if k % group:
    pytest.skip(f"group {group} does not divide K={k}")
  w = _weight(k, n, group, rows % 2 == 0, bits)
  x = jnp.ones((rows, k), jnp.bfloat16)
  if not qm.supports(x, w):
    pytest.skip(f"no plan: {bits}-bit g{group} K={k} (see supports)")
  assert "stablehlo.custom_call @mosaic_gpu" in _lowered(x, w)


# The kernel's arithmetic on CPU (emulate), against the reference and the dense weight (~3 s
# each to compile on 2 cores: 3 in the default suite, 2/3/8 bits, ragged K and N, sym and asym).
EMU_CASES = [
    (2, 3, 576, 96, 64, True), pytest.param(2, 1, 256, 64, 256, False, marks=_SLOW),
    pytest.param(2, 9, 1536, 64, 128, False, marks=_SLOW),
    (3, 5, 576, 64, 64, True), pytest.param(3, 2, 640, 96, 128, False, marks=_SLOW),
    pytest.param(3, 1, 1536, 64, 32, True, marks=_SLOW),
    pytest.param(3, 3, 512, 32, 256, False, marks=_SLOW),
    pytest.param(3, 1, 320, 64, 160, True, marks=_SLOW),
    pytest.param(4, 9, 576, 128, 64, True, marks=_SLOW),
    pytest.param(4, 1, 512, 64, 512, False, marks=_SLOW),
    (8, 1, 576, 96, 64, False), pytest.param(8, 17, 1024, 64, 32, True, marks=_SLOW),
    pytest.param(8, 2, 512, 64, 512, True, marks=_SLOW),
]


@pytest.mark.parametrize("bits,rows,k,n,group,symmetric", EMU_CASES)
def test_emulated_kernel_matches_reference(bits, rows, k, n, group, symmetric):
  w = _weight(k, n, group, symmetric, bits, seed=bits + rows)
  x = jnp.asarray(np.random.default_rng(rows).normal(size=(rows, k)), jnp.float32)
  p = qm.plan(bits, rows, k, group)
  assert p is not None
  y = np.asarray(qm.emulate(x, w), np.float32)
  ref = np.asarray(pk.quant_matmul_ref(x, w), np.float32)
  dense = np.asarray(x @ w.materialize().astype(jnp.float32))
  # bf16 operands (dequantized weight rounded once, activations), f32 accumulation.
  assert np.max(np.abs(y - ref)) / np.max(np.abs(ref)) < 1e-2
  assert np.max(np.abs(y - dense)) / np.max(np.abs(dense)) < 1e-2


def test_emulation_is_exact_on_exact_inputs():
  """With power-of-2 scales and small integer activations every bf16 operand and product is
  exact, so the emulated kernel must equal the reference exactly (3 bits: straddling words)."""
  rng = np.random.default_rng(0)
  for bits, k, g in ((3, 576, 64),):
    scale = jnp.asarray(2.0 ** rng.integers(-3, 2, (k // g, 64)), jnp.float32)
    w = formats.QuantizedArray.from_codes(jnp.asarray(rng.integers(0, 2**bits, (k, 64))),
                                          scale, None, bits=bits, group_size=g, symmetric=True)
    x = jnp.asarray(rng.integers(-2, 3, (3, k)), jnp.float32)
    np.testing.assert_array_equal(qm.emulate(x, w), pk.quant_matmul_ref(x, w))


def test_column_masks_select_each_codes_group():
  # 3 bits, g64: a step of 32 words (320 codes, 5 groups); word 6 holds codes 60..69.
  m = qm.column_masks(3, 32, 64)
  gs, cpw = 5, 10
  lo, hi, sel = m[:gs], m[gs:2 * gs], m[2 * gs:]
  assert m.shape == (2 * gs + cpw, 32)
  np.testing.assert_array_equal(lo.sum(0), 1)
  np.testing.assert_array_equal(hi.sum(0), 1)
  assert lo[0, 6] == 1 and hi[1, 6] == 1
  assert list(sel[:, 6]) == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
  for r in range(32):  # every code's group is lo's or hi's, as sel says
    for c in range(cpw):
      grp = (cpw * r + c) // 64
      assert (hi if sel[c, r] else lo)[grp, r] == 1
  # 2/4/8 bits: words never straddle; one mask row per group.
  m2 = qm.column_masks(2, 32, 64)
  assert m2.shape == (8, 32) and (m2.sum(0) == 1).all()
  assert qm.column_masks(4, 64, 512) is None  # the step lies inside one group


def test_plans():
  assert qm.step_codes(8, 4096, 64) == 512      # 4 bits: 8 groups per step (column masks)
  assert qm.step_codes(128, 4096, 128) == 256   # the (128, tk) activation tile fits 64 KiB
  assert qm.step_codes(8, 4096, 1024) == 512    # inside one group
  assert qm.step_codes(8, 576, 64) == 512       # K=576: one ragged step of 512 + 64
  assert qm.step_codes(8, 4096, 64, bits=2) == 512 and qm.step_codes(128, 4096, 64, bits=2) == 256
  assert qm.step_codes(8, 4096, 64, bits=8) == 512  # 128 words
  p = qm.plan(3, 128, 4096, 128)  # 64 words = 640 codes = 5 groups; bm shrinks to fit 64 KiB
  assert (p.kw, p.tk, p.gs, p.bm, p.straddle, p.tile_rows) == (64, 640, 5, 32, True, 2)
  assert qm.plan(3, 1, 1600, 160).straddle is False  # g160: words never straddle
  assert qm.plan(2, 1, 576, 64).tile_rows == 2      # 36 words
  assert qm.plan(3, 1, 11008, 128) is None          # 1101 words: odd, no tiled TMA view
  assert qm.plan(3, 1, 4096, 512) is None           # 3 bits g512: 2560-code steps, too big
  assert qm.plan(2, 1, 4096, 8) is None             # 2 bits: group % 16 != 0


def test_unsupported_shapes_are_refused():
  x = jnp.ones((1, 512), jnp.bfloat16)
  assert not qm.supports(x, _weight(512, 100, 128, True))  # N not a multiple of 32
  assert qm.supports(x, _weight(512, 96, 128, True))       # ragged 64-column block: TMA
  with pytest.raises(NotImplementedError, match="QuantizedArray"):
    qm.quant_matmul_mgpu(x, _weight(512, 100, 128, True))
  w = formats.QuantizedArray.from_codes(jnp.zeros((512, 64), jnp.int32),
                                        jnp.ones((1, 64), jnp.float32), None, bits=3,
                                        group_size=512, symmetric=True)
  assert not qm.supports(x, w)


def test_dispatch_prefers_mgpu_on_hopper_and_falls_back(monkeypatch):
  names = [i.name for i in formats.dispatch.implementations(formats.QuantizedArray)]
  assert "pallas_mgpu" in names and names.index("pallas_mgpu") > names.index("xla")
  x = jnp.ones((1, 576), jnp.bfloat16)
  dot = lambda x, w: formats.dot(x, w, prefer="pallas_mgpu")
  w = _weight(576, 128, 64, True, bits=3)
  # Here (CPU): the predicate refuses, prefer= falls back to "xla" (same numbers).
  assert not qm.can_use(x, w)
  np.testing.assert_array_equal(jax.jit(dot)(x, w),
                                formats.dot(x, w, implementation="xla"))
  # As on a Hopper GPU: prefer= picks the kernel for a supported weight ...
  monkeypatch.setattr(qm, "on_hopper", lambda: True)
  dot = lambda x, w: formats.dot(x, w, prefer="pallas_mgpu")  # a new function: no jit cache hit
  for bits in (2, 3, 8):
    wb = _weight(576, 128, 64, True, bits=bits)
    text = jax.jit(dot).trace(x, wb).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.custom_call @mosaic_gpu" in text and f"mgpu_{bits}b" in text
  # ... and falls back to "xla" for one it does not support (N % 32 != 0).
  text = jax.jit(dot).trace(x, _weight(576, 100, 64, True, 2)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" not in text


def test_packed_layout_is_what_the_kernel_reads():
  """Word ``r`` of a column holds codes ``cpw r + p`` in bits ``bits p ..`` for every width."""
  rng = np.random.default_rng(1)
  for bits in (2, 3, 4, 8):
    cpw = packing.codes_per_word(bits)
    codes = rng.integers(0, 2**bits, (8 * cpw, 3))
    words = packing.pack(jnp.asarray(codes), bits, axis=0)
    for p in range(cpw):
      q = (words >> np.uint32(bits * p)) & np.uint32(2**bits - 1)
      np.testing.assert_array_equal(q, codes[p::cpw])
