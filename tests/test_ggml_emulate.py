"""ggml CPU arithmetic emulation (compressjax.io.ggml_emulate) against a scalar NumPy transcription
of llama.cpp's x86 ``quantize_row_q8_0`` / ``quantize_row_q8_1`` and ``ggml_vec_dot_q4_0_q8_0`` /
``ggml_vec_dot_q4_1_q8_1`` / ``ggml_vec_dot_q8_0_q8_0`` (llama-cpp-python 0.3.36's vendored
``ggml/src/ggml-cpu/arch/x86/quants.c``). Runs without llama.cpp.

Claims checked: the quantized activations (``qs``, fp16 ``d``, fp16 ``s``) are bit-exact; the
dot products agree within float32 summation-order rounding: ``|ours - ref| <= 8 * eps_f32 *
sum_b |term_b|`` (the terms being each block's ``d_w * d_x * isum`` and ``m_w * s_x``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import formats
from compressjax.formats import QuantizedArray
from compressjax.io import ggml_emulate as ge

F32 = np.float32


@pytest.fixture(autouse=True, scope="module")
def _ggml_registered():
  """The "ggml" implementation exists only while these tests run (other modules' tests list
  the registered implementations)."""
  ge.register()
  yield
  ge.unregister()


def ref_quantize_q8(x):
  """Scalar transcription of x86 ``quantize_row_q8_0``/``_q8_1`` for one row ``x`` (K,)."""
  x = np.asarray(x, F32)
  qs, ds, ss = [], [], []
  for b in range(len(x) // 32):
    blk = x[32 * b:32 * b + 32]
    amax = F32(0)
    for v in blk:  # _mm256_max_ps over |x|
      amax = max(amax, F32(abs(v)))
    d = F32(amax / F32(127))
    inv = F32(F32(127) / amax) if amax != 0 else F32(0)
    q = np.array([np.rint(F32(v * inv)) for v in blk], F32)  # _MM_ROUND_NEAREST: half to even
    qs.append(q.astype(np.int32))
    ds.append(np.float16(d))
    ss.append(np.float16(F32(d * F32(int(q.astype(np.int64).sum())))))
  return qs, ds, ss


def ref_vec_dot(x, codes, scale, zero, qtype):
  """Scalar ``ggml_vec_dot_{q4_0_q8_0, q4_1_q8_1, q8_0_q8_0}`` of row ``x`` with one column."""
  qs, ds, ss = ref_quantize_q8(x)
  off = {"Q4_0": 8, "Q4_1": 0, "Q8_0": 128}[qtype]
  acc, summs, mag = F32(0), F32(0), 0.0
  for b, (qx, dx) in enumerate(zip(qs, ds)):
    qw = codes[32 * b:32 * b + 32].astype(np.int32) - off
    isum = int((qw * qx).sum())
    d = F32(F32(np.float16(scale[b])) * F32(dx))
    acc = F32(acc + F32(d * F32(isum)))
    mag += abs(float(d) * isum)
    if qtype == "Q4_1":
      summs = F32(summs + F32(F32(np.float16(zero[b])) * F32(ss[b])))
      mag += abs(float(zero[b]) * float(ss[b]))
  return F32(acc + summs), mag


def _leaf(qtype, k, n, seed):
  rng = np.random.default_rng(seed)
  bits = 8 if qtype == "Q8_0" else 4
  codes = rng.integers(0, 2 ** bits, (k, n)).astype(np.uint8)
  scale = (rng.uniform(0.5, 2.0, (k // 32, n)) * 0.01).astype(np.float16)
  zero = None if qtype != "Q4_1" else (-8 * scale.astype(F32) * rng.uniform(0.5, 1.5, scale.shape)
                                       ).astype(np.float16)
  w = QuantizedArray.from_codes(jnp.asarray(codes), jnp.asarray(scale),
                                None if zero is None else jnp.asarray(zero), bits=bits,
                                group_size=32, symmetric=qtype != "Q4_1", dtype=jnp.float32)
  return w, codes, scale, zero


def _activations(t, k, seed):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((t, k)) * rng.uniform(0.1, 10, (t, 1))).astype(F32)
  x[0, :32] = 0.0  # an all-zero block: d = 0, q = 0
  # Exact ties: amax = 127 makes 127/amax = 1, so x * id = v.5 exactly; ggml's AVX2 path rounds
  # half to even (2.5 -> 2, -3.5 -> -4), the scalar reference's roundf would not.
  x[1, 32:64] = np.array([127.0, 2.5, -3.5, 0.5, -0.5, 1.5] + [0.25] * 26, F32)
  return x


def test_quantize_q8_bit_exact():
  x = _activations(4, 128, 0)
  q, d, s = (np.asarray(a) for a in ge.quantize_q8(jnp.asarray(x), with_sum=True))
  for t in range(x.shape[0]):
    rq, rd, rs = ref_quantize_q8(x[t])
    np.testing.assert_array_equal(q[t].astype(np.int32), np.stack(rq))
    np.testing.assert_array_equal(d[t], np.asarray(rd, F32))
    np.testing.assert_array_equal(s[t], np.asarray(rs, F32))
  assert q[1, 1, 1:6].tolist() == [2.0, -4.0, 0.0, -0.0, 2.0]  # half to even
  assert not np.any(q[0, 0]) and d[0, 0] == 0


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_ggml_dot_matches_reference(qtype):
  t, k, n = 3, 128, 6
  w, codes, scale, zero = _leaf(qtype, k, n, seed=1)
  assert ge.ggml_type(w) == qtype
  x = _activations(t, k, 2)
  y = np.asarray(formats.dot(jnp.asarray(x), w, implementation="ggml"))
  assert y.shape == (t, n) and y.dtype == np.float32
  eps = np.finfo(F32).eps
  for i in range(t):
    for j in range(n):
      ref, mag = ref_vec_dot(x[i], codes[:, j], scale[:, j], None if zero is None else zero[:, j],
                             qtype)
      assert abs(float(y[i, j]) - float(ref)) <= 8 * eps * mag + 1e-30, (i, j, y[i, j], ref)
  # The emulation differs from the exact float product by the activation quantization only.
  exact = x @ np.asarray(w.materialize())
  assert np.abs(y - exact).max() < 0.05 * np.abs(exact).max()
  assert np.abs(y - exact).max() > 0


def test_dispatch_never_picks_ggml_automatically():
  w, *_ = _leaf("Q4_0", 64, 4, seed=3)
  x = jnp.asarray(_activations(2, 64, 4))
  from compressjax.kernels import cpu as cpu_kernels  # pylint: disable=g-import-not-at-top
  auto = "cpu" if cpu_kernels.can_use(x, w) else "xla"  # the C++ kernel on CPU, float32 x
  np.testing.assert_array_equal(np.asarray(formats.dot(x, w)),
                                np.asarray(formats.dot(x, w, implementation=auto)))
  np.testing.assert_array_equal(np.asarray(formats.dot(x, w, prefer="ggml")),
                                np.asarray(formats.dot(x, w, implementation="ggml")))
  w3 = QuantizedArray.from_codes(jnp.zeros((64, 4), jnp.uint8), jnp.ones((2, 4), jnp.float16),
                                 None, bits=3, group_size=32, symmetric=True)
  with pytest.raises(NotImplementedError, match="ggml"):
    formats.dot(x, w3, implementation="ggml")


def test_ggml_attention_rounds_to_float16():
  rng = np.random.default_rng(5)
  b, t, h, kv, hd = 1, 5, 4, 2, 8
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, hd)), jnp.float32) for n in (h, kv, kv))
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  from compressjax import model as model_lib  # pylint: disable=g-import-not-at-top
  ours = np.asarray(ge.ggml_attention(q, k, v, pos, pos, None))
  plain = np.asarray(model_lib._attention(q, k, v, pos, pos, None))  # pylint: disable=protected-access
  assert 0 < np.abs(ours - plain).max() < 5e-3
  # With float16-representable inputs only the probabilities' rounding remains.
  f16 = lambda a: a.astype(jnp.float16).astype(jnp.float32)
  ours16 = np.asarray(ge.ggml_attention(f16(q), f16(k), f16(v), pos, pos, None))
  np.testing.assert_array_equal(ours16, ours)
  with ge.emulate_attention():
    assert model_lib._attention is ge.ggml_attention  # pylint: disable=protected-access
  assert model_lib._attention is not ge.ggml_attention  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# Bit-exact claims (issue 15): transcriptions of the AVX2 kernels llama.cpp runs on x86, with the
# FMA of ``_mm256_fmadd_ps`` computed exactly (float64 product and sum, one rounding to float32).
# ---------------------------------------------------------------------------------------------

F64 = np.float64


def _fma_ref(a, b, c):
  return F32(F64(F32(a)) * F64(F32(b)) + F64(F32(c)))


def ref_vec_dot_exact(x, codes, scale, zero, qtype):
  """x86 AVX2 ``ggml_vec_dot_q4_1_q8_1`` / ``_q8_0_q8_0`` (8 lanes of 4 products each, fmadd,
  ``hsum_float_8``, Q4_1's ``summs`` FMA) and, for Q4_0, the repacked ``Q4_0_8x8`` gemv (one
  float lane per column: fmadd of the whole block's integer sum)."""
  qs, ds, ss = ref_quantize_q8(x)
  off = {"Q4_0": 8, "Q4_1": 0, "Q8_0": 128}[qtype]
  lanes = 1 if qtype == "Q4_0" else 8
  acc = [F32(0)] * lanes
  summs = F32(0)
  for b, (qx, dx) in enumerate(zip(qs, ds)):
    qw = codes[32 * b:32 * b + 32].astype(np.int64) - off
    d = F32(F32(np.float16(scale[b])) * F32(dx))
    part = (qw * qx.astype(np.int64)).reshape(lanes, 32 // lanes).sum(-1)
    acc = [_fma_ref(d, F32(p), a) for p, a in zip(part, acc)]
    if qtype == "Q4_1":
      summs = _fma_ref(F32(np.float16(zero[b])), F32(ss[b]), summs)
  if lanes == 1:
    return acc[0]
  r = [F32(acc[4 + i] + acc[i]) for i in range(4)]
  h = F32(F32(r[0] + r[2]) + F32(r[1] + r[3]))
  return F32(h + summs)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_ggml_dot_bit_exact(qtype):
  """The emulated product equals the kernel's float32 result bit for bit (checked against
  llama.cpp's own tensors by experiments/bisect_ggml.py --dump)."""
  t, k, n = 3, 128, 6
  w, codes, scale, zero = _leaf(qtype, k, n, seed=11)
  x = _activations(t, k, 12)
  y = np.asarray(ge.ggml_dot(jnp.asarray(x), w))
  ref = np.array([[ref_vec_dot_exact(x[i], codes[:, j], scale[:, j],
                                     None if zero is None else zero[:, j], qtype)
                   for j in range(n)] for i in range(t)], F32)
  np.testing.assert_array_equal(y, ref)


def ref_rms_norm(x, w, eps):
  """``ggml_compute_forward_rms_norm_f32`` then ``mul``: double sum of float squares."""
  out = []
  for row in x:
    s = 0.0
    for v in row:
      s += float(F32(v * v))
    mean = F32(s / len(row))
    scale = F32(F32(1.0) / F32(np.sqrt(F32(mean + F32(eps)))))
    out.append((row * scale).astype(F32) * w)
  return np.asarray(out, F32)


def test_ggml_rms_norm_bit_exact():
  rng = np.random.default_rng(13)
  x = (rng.standard_normal((4, 96)) * rng.uniform(0.01, 30, (4, 1))).astype(F32)
  w = rng.uniform(0.1, 3, 96).astype(F32)
  y = np.asarray(ge.ggml_rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5))
  np.testing.assert_array_equal(y, ref_rms_norm(x, w, 1e-5))


def test_ggml_rms_norm_bit_exact_under_jit():
  """Jitted, XLA turns ``1 / sqrt`` into ``rsqrt`` (rounded differently in ~1/3 of the cases; the
  cause of the jitted check's last llama.cpp gap) unless something stops it."""
  rng = np.random.default_rng(14)
  x = (rng.standard_normal((64, 96)) * rng.uniform(0.01, 30, (64, 1))).astype(F32)
  w = rng.uniform(0.1, 3, 96).astype(F32)
  fn = jax.jit(ge.ggml_rms_norm, static_argnums=2)
  assert "rsqrt" not in fn.lower(x, w, 1e-5).compile().as_text()
  np.testing.assert_array_equal(np.asarray(fn(x, w, 1e-5)), ref_rms_norm(x, w, 1e-5))


def ref_expf(x):
  """Scalar transcription of AVX2 ``ggml_v_expf`` (vec.h)."""
  h = float.fromhex
  i32 = lambda v: np.frombuffer(np.float32(v).tobytes(), np.int32)[0]
  f32 = lambda i: np.frombuffer(np.int32(i).tobytes(), F32)[0]
  x = F32(x)
  r = F32(h("0x1.8p23"))
  z = _fma_ref(x, h("0x1.715476p+0"), r)
  n = F32(z - r)
  b = _fma_ref(-n, h("0x1.7f7d1cp-20"), _fma_ref(-n, h("0x1.62e4p-1"), x))
  wrap = lambda v: (v + 2 ** 31) % 2 ** 32 - 2 ** 31  # int32 arithmetic wraps
  e = wrap(int(i32(z)) << 23)
  k = f32(wrap(e + int(i32(F32(1)))))
  u = F32(b * b)
  j = _fma_ref(_fma_ref(_fma_ref(h("0x1.0e4020p-7"), b, h("0x1.573e2ep-5")), u,
                        _fma_ref(h("0x1.555e66p-3"), b, h("0x1.fffdb6p-2"))),
               u, F32(F32(h("0x1.ffffecp-1")) * b))
  if not abs(n) > 126:
    return _fma_ref(j, k, k)
  g = -2113929216 if n <= 0 else 0  # 0x82000000 as int32
  s1 = f32(wrap(g + 0x7f000000))
  s2 = f32(wrap(e - g))
  with np.errstate(over="ignore", under="ignore"):  # exp overflows to inf / underflows to 0
    if abs(n) > 192:
      return F32(s1 * s1)
    return F32(_fma_ref(s2, j, s2) * s1)


def test_ggml_expf_and_swiglu_bit_exact():
  rng = np.random.default_rng(14)
  x = np.concatenate([rng.standard_normal(400) * 6, rng.uniform(-100, 100, 100),
                      [0.0, -0.0, 88.0, -87.5, 1e-8]]).astype(F32)
  ours = np.asarray(ge.ggml_expf(jnp.asarray(x)))
  ref = np.array([ref_expf(v) for v in x], F32)
  # XLA's CPU backend flushes float32 subnormals to zero (exp(x) for x < -87.3); ggml keeps them.
  sub = (ref != 0) & (np.abs(ref) < np.finfo(F32).tiny)
  assert sub.sum() < 10 and np.all(ours[sub] == 0)
  np.testing.assert_array_equal(ours[~sub], ref[~sub])
  mid = np.abs(x) < 80
  np.testing.assert_allclose(ours[mid], np.exp(x[mid].astype(F64)), rtol=3e-7)
  up = rng.standard_normal(x.shape).astype(F32)
  sw = np.asarray(ge.ggml_swiglu(jnp.asarray(x), jnp.asarray(up)))
  ref = np.array([F32(F32(v / F32(F32(1) + ref_expf(F32(0) - v))) * u) for v, u in zip(x, up)],
                 F32)
  np.testing.assert_array_equal(sw, ref)  # x / (1 + subnormal) == x: no flush shows here


def test_emulate_ggml_swaps_norm_and_activation():
  from compressjax import model as model_lib  # pylint: disable=g-import-not-at-top
  saved = (model_lib._rms_norm, model_lib._swiglu)  # pylint: disable=protected-access
  with ge.emulate_ggml():
    assert model_lib._rms_norm is ge.ggml_rms_norm  # pylint: disable=protected-access
    assert model_lib._swiglu is ge.ggml_swiglu  # pylint: disable=protected-access
  assert (model_lib._rms_norm, model_lib._swiglu) == saved  # pylint: disable=protected-access


def test_ggml_rope_bit_exact():
  """ggml's RoPE: float32 theta recurrence, libm cosf/sinf, FMA-contracted pair rotation
  (the variant that reproduced llama.cpp's roped Q of a real GGUF bit for bit)."""
  import ctypes  # pylint: disable=g-import-not-at-top
  libm = ctypes.CDLL("libm.so.6")
  for fn, nargs in (("sinf", 1), ("cosf", 1), ("powf", 2)):
    getattr(libm, fn).restype = ctypes.c_float
    getattr(libm, fn).argtypes = [ctypes.c_float] * nargs
  from compressjax.model import LlamaConfig  # pylint: disable=g-import-not-at-top
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=1, rope_theta=10000.0)
  hd = cfg.head_dim
  rng = np.random.default_rng(15)
  x = rng.standard_normal((1, 7, 2, hd)).astype(F32)
  pos = np.array([[0, 1, 2, 5, 17, 100, 1000]])
  cos, sin = ge.ggml_rope_cos_sin(cfg, jnp.asarray(pos), 7)
  y = np.asarray(ge.ggml_apply_rope(jnp.asarray(x), cos, sin))
  ts = F32(libm.powf(F32(10000.0), F32(-2.0 / hd)))
  for ti, p in enumerate(pos[0]):
    theta = F32(p)
    for i in range(hd // 2):
      c, s = F32(libm.cosf(theta)), F32(libm.sinf(theta))
      for hh in range(2):
        x0, x1 = x[0, ti, hh, i], x[0, ti, hh, i + hd // 2]
        assert y[0, ti, hh, i] == _fma_ref(x0, c, -F32(x1 * s))
        assert y[0, ti, hh, i + hd // 2] == _fma_ref(x0, s, F32(x1 * c))
      theta = F32(theta * ts)


def ref_f16_lane_dot(a, b):
  """tinyBLAS F16 on AVX2 for one pair of float16 rows: lane ``l`` of 8 float32 lanes adds the
  exact products ``a[k] * b[k]``, ``k = l, l + 8, ...`` in order, then ``hsum_float_8``."""
  acc = np.zeros(8, F32)
  for c in range(len(a) // 8):
    acc = (acc + (a[8 * c:8 * c + 8].astype(F32) * b[8 * c:8 * c + 8].astype(F32))).astype(F32)
  r = (acc[4:8] + acc[0:4]).astype(F32)
  return F32(F32(r[0] + r[2]) + F32(r[1] + r[3]))


def test_ggml_kq_dot_adds_in_llamacpp_head_order():
  """K.Q of one head: llama.cpp's rows are GGUF-permuted (``gguf.permute_qk``), so its lanes sum
  other elements than our half-split layout would; the emulation reorders first (the gap found
  on a 17-token prompt: same values, differently rounded sums)."""
  from compressjax.io import gguf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(21)
  hd, n = 64, 4000
  q = rng.standard_normal((n, hd)).astype(np.float16)
  k = (rng.standard_normal((n, hd)) * 3).astype(np.float16)
  ref = np.asarray([ref_f16_lane_dot(gguf.permute_qk(q[i], 1), gguf.permute_qk(k[i], 1))
                    for i in range(n)], F32)
  qj, kj = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
  ours = np.asarray(ge._lane_dot(ge._ggml_head_order(qj), ge._ggml_head_order(kj)))  # pylint: disable=protected-access
  np.testing.assert_array_equal(ours, ref)
  unordered = np.asarray(ge._lane_dot(qj, kj))  # pylint: disable=protected-access
  assert (unordered != ref).sum() > 0  # the order matters: the test can fail


def test_ggml_f32_dot_is_tinyblas_lane_order():
  """F32 x F32 (a tied float32 head): tinyBLAS' 8 FMA lanes over ``K`` then ``hsum_float_8``."""
  rng = np.random.default_rng(22)
  t, k, n = 3, 64, 24
  x = rng.standard_normal((t, k)).astype(F32)
  w = rng.standard_normal((k, n)).astype(F32)
  ref = np.zeros((t, n), F32)
  for r in range(t):
    for c in range(n):
      acc = [F32(0)] * 8
      for step in range(k // 8):
        acc = [_fma_ref(w[8 * step + l, c], x[r, 8 * step + l], acc[l]) for l in range(8)]
      h = [F32(acc[i + 4] + acc[i]) for i in range(4)]
      ref[r, c] = F32(F32(h[0] + h[2]) + F32(h[1] + h[3]))
  ours = np.asarray(ge.ggml_f32_dot(jnp.asarray(x), jnp.asarray(w)))
  np.testing.assert_array_equal(ours, ref)
  assert (np.asarray(jnp.asarray(x) @ jnp.asarray(w)) != ref).any()  # the order matters
  with pytest.raises(ValueError, match="multiple of 8"):
    ge.ggml_f32_dot(jnp.ones((1, 12)), jnp.ones((12, 4)))


def ref_vec_dot_avx2(a, b, fma):
  """``ggml_vec_dot_f16`` / ``_f32`` on AVX2: 4 accumulators of 8 lanes per 32 elements
  (``fmadd``), ``GGML_F32x8_REDUCE``, leftovers added in double."""
  n = len(a)
  m = n - n % 32
  acc = [[F32(0)] * 8 for _ in range(4)]
  for i in range(0, m, 32):
    for j in range(4):
      for l in range(8):
        e = i + 8 * j + l
        acc[j][l] = _fma_ref(a[e], b[e], acc[j][l]) if fma else F32(acc[j][l] + F32(a[e] * b[e]))
  s0 = [F32(F32(acc[0][l] + acc[2][l]) + F32(acc[1][l] + acc[3][l])) for l in range(8)]
  t0 = [F32(s0[l] + s0[l + 4]) for l in range(4)]
  res = F32(F32(t0[0] + t0[1]) + F32(t0[2] + t0[3]))
  tot = F64(res)
  for e in range(m, n):
    tot += F64(F32(a[e] * b[e]))
  return F32(tot)


def test_ggml_one_row_products_take_vec_dot_order():
  """One activation row: llama.cpp's ``llamafile_sgemm`` refuses ``n < 2``, so K.Q and V.p take
  ``ggml_vec_dot_f16`` and a float32 head ``ggml_vec_dot_f32`` (the gap found in decode steps
  after a batched prompt: exact at every position of a 48-token generation once emulated)."""
  rng = np.random.default_rng(23)
  for n in (64, 72):  # 72: eight leftovers after two 32-element steps
    a = rng.standard_normal((300, n)).astype(np.float16).astype(F32)
    b = (rng.standard_normal((300, n)) * 4).astype(np.float16).astype(F32)
    ref = np.asarray([ref_vec_dot_avx2(a[i], b[i], False) for i in range(300)], F32)
    ours = np.asarray(ge._vec_dot(jnp.asarray(a), jnp.asarray(b)))  # pylint: disable=protected-access
    np.testing.assert_array_equal(ours, ref)
    assert (np.asarray(ge._lane_dot(jnp.asarray(a[:, :64]), jnp.asarray(b[:, :64])))  # pylint: disable=protected-access
            != np.asarray([ref_vec_dot_avx2(a[i, :64], b[i, :64], False) for i in range(300)])).any()
  x = rng.standard_normal((1, 96)).astype(F32)
  w = rng.standard_normal((96, 40)).astype(F32)
  ref = np.asarray([[ref_vec_dot_avx2(w[:, c], x[0], True) for c in range(40)]], F32)
  np.testing.assert_array_equal(np.asarray(ge.ggml_f32_dot(jnp.asarray(x), jnp.asarray(w))), ref)
  with pytest.raises(ValueError, match="multiple of 32"):
    ge.ggml_f32_dot(jnp.ones((1, 40)), jnp.ones((40, 4)))


def test_div_is_correctly_rounded_under_jit():
  """XLA turns a division by a broadcast scalar into a product with its reciprocal (~4% of values
  one ulp off; it flipped ``fp16(d * sum q)`` of one block in a decode step of the reference
  model, ``d = amax / 127``). ``_div`` (used by the Q8 quantizer and RMSNorm) divides exactly."""
  rng = np.random.default_rng(24)
  a = (np.abs(rng.standard_normal(100000)) * 0.3).astype(F32)
  ref = a / F32(127)
  plain = np.asarray(jax.jit(lambda v: v / jnp.float32(127))(a))
  assert (plain != ref).sum() > 100  # the rewrite this guards against
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: ge._div(v, jnp.float32(127)))(a)), ref)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(ge._div(jnp.asarray(a), 127.0)), ref)  # pylint: disable=protected-access
