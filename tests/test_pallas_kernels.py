"""Pallas kernels in interpret mode (CPU CI): against their references, ``x @ w.materialize()``,
the dispatch rules, gradients and a model-wide choice.

Tolerances: products accumulate in float32 over K <= 512 terms of magnitude <= ~1000, so
``|err| <= 1e-5 * max|y| + 1e-4`` for float32 activations; bf16 activations round the inputs and
the output, ``2e-2`` relative to ``max|y|``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compressjax import formats
from compressjax.formats import packing
from compressjax.kernels import cpu as cpu_kernels
import pallas_kernels as pk
from pallas_kernels import _common

import tiny


def _quantized(rng, k, n, bits, gs, symmetric, dtype=jnp.float32):
  codes = jnp.asarray(rng.integers(0, 2**bits, (k, n)), jnp.int32)
  scale = jnp.asarray(rng.uniform(0.01, 0.1, (k // gs, n)), jnp.float16)
  zero = None if symmetric else jnp.asarray(rng.normal(size=(k // gs, n)) * 0.1, jnp.float16)
  return formats.QuantizedArray.from_codes(codes, scale, zero, bits=bits, group_size=gs,
                                           symmetric=symmetric, dtype=dtype)


def _aqlm(rng, k, n, m, nbits):
  codes = jnp.asarray(rng.integers(0, 2**nbits, (k // 8, n, m)), jnp.int32)
  cb = jnp.asarray(rng.normal(size=(m, 2**nbits, 8)), jnp.float16)
  scales = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float16)
  return formats.AdditiveCodebookArray.from_codes(codes, cb, scales, nbits=nbits)


def _e8p(rng, k, n):
  codes = jnp.asarray(rng.integers(0, 2**16, (k // 8, n)), jnp.uint16)
  return formats.E8PArray(codes, jnp.asarray(0.37, jnp.float32), dtype=jnp.float32)


def _check(y, want, tol):
  assert y.shape == want.shape and y.dtype == want.dtype, (y.shape, y.dtype, want.dtype)
  y, want = np.asarray(y, np.float32), np.asarray(want, np.float32)
  err = np.max(np.abs(y - want))
  assert err <= tol * np.max(np.abs(want)) + 1e-4, (err, np.max(np.abs(want)))


# (bits, group_size, symmetric, rows, K, N). The interpret config has block_m=8, block_n=128,
# block_k=256: rows 1, 3, 17 (17 spans 3 row blocks), N = 3, 40, 130, 200 (ragged column
# blocks), one group per step (g64..g256); two steps per group (asymmetric g512: the offset
# term is added once per group, shared code) in the 3-bit cases below.
QUANT_CASES = [
    (2, 64, True, 1, 128, 130),
    (4, 128, False, 17, 256, 200),
    (8, 256, True, 3, 512, 3),
]

# 3-bit codes, 10 per word (packing layout 2): no K here is a multiple of 10 (the last word is
# part padding). Steps of S codes read windows of P words, (S, P) = (32, 4) for g32 and for
# g64 at K=64 (7 words < 8: S halved), (64, 8) for g64, (128, 16) for g128, (256, 32) for
# g512 (two steps per group, asymmetric).
QUANT3_CASES = [
    (32, False, 3, 96, 40),
    (64, True, 17, 192, 130),
    (64, False, 1, 64, 7),
    (128, True, 3, 384, 16),
    (512, False, 1, 512, 8),
]


@pytest.mark.parametrize("bits,gs,symmetric,rows,k,n",
                         QUANT_CASES + [(3,) + c for c in QUANT3_CASES])
def test_quant_matmul_matches_reference_and_materialize(bits, gs, symmetric, rows, k, n):
  rng = np.random.default_rng(bits * 1000 + gs + rows + k)
  w = _quantized(rng, k, n, bits, gs, symmetric)
  x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
  assert pk.quant_matmul.__globals__["supports"](x, w)
  y = pk.quant_matmul(x, w, interpret=True)
  _check(y, pk.quant_matmul_ref(x, w), 1e-5)
  _check(y, x @ w.materialize(), 1e-5)


def test_word_step_windows_cover_every_step():
  """Each step's codes lie in its window of words, windows stay inside the array."""
  word_step = pk.quant_matmul.__globals__["word_step"]
  assert word_step(32, 256, 10) == (32, 4)
  assert word_step(64, 256, 20) == (64, 8)
  assert word_step(128, 256, 13) == (64, 8)  # 16 words > 13: S halved
  assert word_step(128, 256, 64) == (128, 16)
  assert word_step(1024, 512, 103) == (512, 64)
  for gs, k in [(32, 96), (64, 64), (128, 640), (512, 1024), (96, 288)]:
    n_words = -(-k // 10)
    step, window = word_step(gs, 256, n_words)
    assert gs % step == 0 and window & (window - 1) == 0 and window <= n_words
    for lo in range(0, k, step):
      first = min(lo // 10, n_words - window)
      assert 10 * first <= lo and lo + step <= 10 * (first + window), (gs, k, lo)


def test_unpack_word_plane_matches_packing():
  rng = np.random.default_rng(5)
  codes = jnp.asarray(rng.integers(0, 8, (97, 3)), jnp.uint8)
  packed = packing.pack(codes, 3)  # (10, 3) words, codes 97..99 are zero padding
  for c in range(10):
    plane = pk.quant_matmul_ref.__globals__["unpack_word_plane"](packed, c, 3)
    want = np.pad(np.asarray(codes), ((0, 3), (0, 0)))[c::10]
    np.testing.assert_array_equal(np.asarray(plane), want)


def test_quant_matmul_bf16_and_leading_batch_dims():
  rng = np.random.default_rng(7)
  w = _quantized(rng, 128, 136, 4, 64, False, dtype=jnp.bfloat16)
  x = jnp.asarray(rng.normal(size=(2, 3, 128)), jnp.bfloat16)
  y = pk.quant_matmul(x, w, interpret=True)
  want = jnp.einsum("abk,kn->abn", x.astype(jnp.float32), w.materialize().astype(jnp.float32))
  assert y.shape == (2, 3, 136) and y.dtype == jnp.bfloat16
  _check(y.astype(jnp.float32), want, 2e-2)


@pytest.mark.parametrize("m,nbits,rows,k,n", [(2, 8, 3, 64, 200), (1, 16, 17, 32, 40)])
def test_aqlm_matmul_matches_reference_and_materialize(m, nbits, rows, k, n):
  rng = np.random.default_rng(m * 100 + rows)
  w = _aqlm(rng, k, n, m, nbits)
  x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
  y = pk.aqlm_matmul(x, w, interpret=True)
  _check(y, pk.aqlm_matmul_ref(x, w), 1e-5)
  _check(y, x @ w.materialize(), 1e-5)


@pytest.mark.parametrize("rows,k,n", [(1, 256, 130), (17, 64, 24)])
def test_e8p_matmul_matches_reference_and_materialize(rows, k, n):
  rng = np.random.default_rng(rows)
  w = _e8p(rng, k, n)
  x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
  y = pk.e8p_matmul(x, w, interpret=True)
  _check(y, pk.e8p_matmul_ref(x, w), 1e-5)
  _check(y, x @ w.materialize(), 1e-5)


def test_unpack_plane_matches_packing_for_every_width():
  rng = np.random.default_rng(0)
  for bits in (2, 3, 4, 5, 8):
    codes = jnp.asarray(rng.integers(0, 2**bits, (64, 5)), jnp.uint8)
    # unpack_plane reads the bitstream (packing layout 1, = pack() except for 3-bit codes,
    # which are now 10 per word and unpacked with unpack_word_plane).
    packed = packing.pack_stream(codes, bits).reshape(2, bits, 5)
    for c in (0, 10, 11, 21, 31):
      plane = pk.quant_matmul_ref.__globals__["unpack_plane"](
          [packed[:, i] for i in range(bits)], c, bits)
      np.testing.assert_array_equal(np.asarray(plane), np.asarray(codes)[c::32])


def test_dispatch_rules_on_cpu():
  rng = np.random.default_rng(1)
  w = _quantized(rng, 128, 130, 2, 64, True)
  x = jnp.asarray(rng.normal(size=(1, 128)), jnp.float32)
  names = [i.name for i in formats.implementations(formats.QuantizedArray)]
  assert names == ["pallas", "cpu", "xla", "pallas_interpret", "pallas_mgpu"], names
  for fmt in (formats.AdditiveCodebookArray, formats.E8PArray):
    assert {"pallas", "pallas_interpret"} <= {i.name for i in formats.implementations(fmt)}
  if jax.default_backend() == "cpu":
    # "pallas" declines on CPU, the automatic choice falls back to the C++ kernel ("cpu", for
    # float32 decode rows) or "xla", forcing it says why.
    with pytest.raises(NotImplementedError, match="cannot be used"):
      formats.dot(x, w, implementation="pallas")
    auto = "cpu" if cpu_kernels.can_use(x, w) else "xla"
    np.testing.assert_array_equal(formats.dot(x, w, prefer="pallas"),
                                  formats.dot(x, w, implementation=auto))
  _check(formats.dot(x, w, implementation="pallas_interpret"), x @ w.materialize(), 1e-5)
  _check(formats.dot(x, w, prefer="pallas_interpret"), x @ w.materialize(), 1e-5)
  # Unsupported grouping (16 % 32 != 0): preferred kernel declines, forcing it raises.
  w16 = _quantized(rng, 128, 16, 4, 16, True)
  _check(formats.dot(x, w16, prefer="pallas_interpret"), x @ w16.materialize(), 1e-5)
  with pytest.raises(NotImplementedError):
    formats.dot(x, w16, implementation="pallas_interpret")
  with pytest.raises(ValueError, match="prefer='palas'"):
    formats.dot(x, w, prefer="palas")


def _grads(fn, x, w, fields):
  def loss(x, *vals):
    ww = dataclasses.replace(w, **dict(zip(fields, vals)))
    return jnp.sum(jnp.sin(fn(x, ww)))
  return jax.grad(loss, argnums=tuple(range(1 + len(fields))))(
      x, *[getattr(w, f) for f in fields])


@pytest.mark.parametrize("kind", ["quant", pytest.param("quant3", marks=pytest.mark.slow),
                                  pytest.param("aqlm", marks=pytest.mark.slow), "e8p"])
def test_gradients_match_xla_path(kind):  # quant3/aqlm: ~25 s each alone, with -m slow
  rng = np.random.default_rng(3)
  if kind == "quant":
    w, fields, rows = _quantized(rng, 128, 40, 4, 32, False), ("scale", "zero"), 3
  elif kind == "quant3":  # K = 96: 10 words, the last one part padding
    w, fields, rows = _quantized(rng, 96, 24, 3, 32, False), ("scale", "zero"), 3
  elif kind == "aqlm":
    w, fields, rows = _aqlm(rng, 64, 200, 2, 8), ("codebooks", "scales"), 3
  else:
    w, fields, rows = _e8p(rng, 64, 24), ("scale",), 17
  x = jnp.asarray(rng.normal(size=(rows, w.shape[0])), jnp.float32)
  got = _grads(lambda x, w: formats.dot(x, w, implementation="pallas_interpret"), x, w, fields)
  want = _grads(lambda x, w: formats.dot(x, w, implementation="xla"), x, w, fields)
  for g, h in zip(got, want):
    assert g.shape == h.shape and g.dtype == h.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32),
                               rtol=2e-3, atol=2e-3 * float(np.max(np.abs(np.asarray(h, np.float32)))))


def _quantized_tiny_model(**overrides):
  from compressjax import transforms as T  # pylint: disable=g-import-not-at-top
  model = tiny.tiny_model(seed=0, num_layers=1, **overrides)
  state, _ = T.apply(T.rtn(bits=4, group_size=32, symmetric=False), nnx.state(model, nnx.Param))
  nnx.update(model, state)
  return model


def _counting(name, fn):
  """Re-registers implementation ``name`` of QuantizedArray as ``fn`` that counts its calls."""
  impl = {i.name: i for i in formats.implementations(formats.QuantizedArray)}[name]
  calls = []
  formats.register_matmul(formats.QuantizedArray, name,
                          lambda x, w: calls.append(x.shape) or fn(impl)(x, w),
                          can_use=impl.can_use, priority=impl.priority)
  return calls


def test_model_config_routes_every_linear_to_the_preferred_matmul():
  base = _quantized_tiny_model()
  fast = _quantized_tiny_model(matmul_implementation="pallas_interpret")
  assert fast.cfg.to_dict() == base.cfg.to_dict()  # a run-time choice, not architecture
  tokens = jnp.asarray([[1, 5, 9, 200]], jnp.int32)
  # Routing only (the kernel itself is tested above): the preferred entry runs the XLA math.
  calls = _counting("pallas_interpret", lambda impl: formats.quantized_matmul_xla)
  try:
    got = fast(tokens)
    assert len(calls) == 7, calls  # q, k, v, o, gate, up, down of the one layer
    del calls[:]
    base(tokens)
    assert not calls  # the default model never takes the interpret kernel
    # The XLA model: the default one takes the C++ kernel on CPU (another summation order).
    want = _quantized_tiny_model(matmul_implementation="xla")(tokens)
  finally:
    pk.register()
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_model_with_interpret_kernels_matches_xla_model():
  base = _quantized_tiny_model()
  fast = _quantized_tiny_model(matmul_implementation="pallas_interpret")
  tokens = jnp.asarray([[1, 5, 9, 200]], jnp.int32)
  _check(fast(tokens), base(tokens), 1e-5)


def test_step_size_is_a_power_of_two_inside_one_group():
  assert _common.step_size(128, 256) == 128
  assert _common.step_size(1024, 256) == 256
  assert _common.step_size(11008, 512) == 256  # per-channel K = 11008 = 2**8 * 43
  assert _common.step_size(96, 512) == 32
