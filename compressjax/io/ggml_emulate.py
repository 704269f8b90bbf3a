"""Emulation of llama.cpp's CPU (ggml) arithmetic, to compare our outputs with llama.cpp's exactly.

ggml's CPU backend does not multiply a quantized weight by float activations: it first quantizes
the activations per block of 32 along ``K`` into the weight type's ``vec_dot_type`` (``Q8_0`` for
``Q4_0``/``Q8_0`` weights, ``Q8_1`` for ``Q4_1``), then takes integer dot products per block and
scales them in float32. Its attention keeps the KV cache in float16 and converts the other operand
of the ``K·Q`` and ``V·softmax`` products to float16 (the ``vec_dot_type`` of an F16 matrix).
This module reproduces that arithmetic in JAX so that a check of llama.cpp against our model
(``experiments/check_llamacpp.py --emulate-ggml``) compares like with like:

* :func:`quantize_q8` -- activations to ``Q8_0``/``Q8_1`` blocks, as the x86 AVX2 path does;
* :func:`ggml_dot` -- ``x @ W`` for a :class:`~compressjax.formats.QuantizedArray` stored exactly
  as ``Q4_0``/``Q4_1``/``Q8_0``, after :func:`register` available as
  ``formats.dot(..., implementation="ggml")`` (never
  chosen automatically: its priority is below the ``"xla"`` fallback; select it with
  ``implementation=`` / ``prefer=`` or ``LlamaConfig.matmul_implementation="ggml"``);
* :func:`ggml_attention` -- the non-flash attention of llama.cpp with a float16 KV cache, a
  drop-in for the model's attention function (see :func:`emulate_attention`).

* :func:`ggml_rms_norm`, :func:`ggml_swiglu` (with :func:`ggml_expf`), ggml's RoPE
  (:func:`ggml_rope_cos_sin`, :func:`ggml_apply_rope`) and :func:`ggml_softmax` -- the float ops
  between the matmuls, swapped into the model by :func:`emulate_ggml`.

Bit-exactness (issue 15): every op is reproduced bit for bit as llama-cpp-python 0.3.36 builds
it here (x86 AVX2 + FMA + F16C, no AVX512, llamafile sgemm and CPU repack on, flash attention
off), checked tensor by tensor against llama.cpp's own intermediates
(``experiments/bisect_ggml.py --dump``). It has to be: the quantized activations often sit on an
exact rounding tie (``x * 127 / amax == k + 0.5``, frequent when the embedding is itself
quantized), so a one-ulp difference upstream flips an 8-bit value, and over 30 layers such flips
grow into logit differences as large as the whole Q8 activation error. Hence: the FMA lanes and
horizontal adds of the AVX2 vec-dots (Q4_1, Q8_0; tinyBLAS for Q8_0 batches has the same
order), the repacked ``Q4_0_8x8`` column accumulation for Q4_0, the double sum of RMSNorm and
softmax, ggml's polynomial ``expf``, glibc ``cosf``/``sinf`` with ggml's float32 theta
recurrence, and tinyBLAS's F16 lane order in ``K·Q`` and ``V·softmax``. FMAs are computed through
float64 (exact product, one extra rounding: differs from a true FMA in ~2**-29 of cases); XLA's
CPU backend flushes float32 subnormals, which only ``expf`` of inputs below -87.3 produce.

References:
  llama.cpp ``ggml/src/ggml-cpu/arch/x86/quants.c`` (``quantize_row_q8_0``,
  ``quantize_row_q8_1``, ``ggml_vec_dot_q4_0_q8_0``, ``ggml_vec_dot_q4_1_q8_1``,
  ``ggml_vec_dot_q8_0_q8_0``), ``ggml/src/ggml-common.h`` (``block_q8_0``, ``block_q8_1``),
  ``src/llama-graph.cpp`` (``build_attn_mha``), as vendored by llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp

from compressjax.formats import dispatch
from compressjax.formats import quantized

__all__ = ["QK", "can_use_ggml", "emulate_attention", "emulate_ggml", "ggml_attention", "ggml_dot",
           "ggml_expf", "ggml_f32_dot", "ggml_rms_norm", "ggml_swiglu", "ggml_type", "quantize_q8"]

#: ggml's block length along ``K`` for Q4_0, Q4_1, Q8_0, Q8_0 and Q8_1.
QK = 32


def _f16(x: jax.Array) -> jax.Array:
  """``x`` rounded to float16 (round to nearest even, as F16C ``_cvtss_sh``) and back to f32."""
  return x.astype(jnp.float16).astype(jnp.float32)


def _fma(a, b, c):
  """``fma(a, b, c)`` in float32 (one rounding), through float64: ``a * b`` of two float32 is
  exact in float64; the sum's double rounding differs from a true FMA in about 2**-29 of cases.
  Call under ``jax.enable_x64(True)``."""
  f64 = jnp.float64
  return (a.astype(f64) * b.astype(f64) + c.astype(f64)).astype(jnp.float32)


def _div(a: jax.Array, b) -> jax.Array:
  """``a / b``, correctly rounded: XLA rewrites a division by a broadcast scalar into a product
  with its reciprocal (rounded differently in ~4% of cases; even eagerly and for a traced
  scalar), so the divisor is broadcast to ``a``'s shape behind an optimization barrier."""
  return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def _hsum_float_8(v: jax.Array) -> jax.Array:
  """ggml's ``hsum_float_8`` over axis -2 (8 lanes): ``(v4+v0, v5+v1, v6+v2, v7+v3)``, then
  ``(r0+r2) + (r1+r3)``."""
  r = v[..., 4:8, :] + v[..., 0:4, :]
  return (r[..., 0, :] + r[..., 2, :]) + (r[..., 1, :] + r[..., 3, :])


def quantize_q8(x: jax.Array, *, with_sum: bool = False):
  """ggml's ``quantize_row_q8_0`` / ``quantize_row_q8_1`` (x86 AVX2 path) on the last axis.

  Per block of 32: ``amax = max|x|``, ``d = amax / 127``, ``id = 127 / amax`` (0 when
  ``amax == 0``), ``q = round_half_even(x * id)`` (``_mm256_round_ps``), stored ``d`` is
  ``fp16(d)``; ``Q8_1`` also stores ``s = fp16(d * sum(q))`` with the float32 ``d``.
  (ggml's scalar reference ``quantize_row_q8_0_ref`` uses ``id = 1 / d`` and ``roundf``, half
  away from zero; the AVX2 path above is the one llama.cpp runs on x86.)

  Args:
    x: float32 activations ``(..., K)`` with ``K % 32 == 0``.
    with_sum: also return ``s`` (``Q8_1``).

  Returns:
    ``(q, d)`` or ``(q, d, s)``: ``q`` float32 integer values in ``[-127, 127]`` of shape
    ``(..., K // 32, 32)``; ``d`` (and ``s``) float32 values of float16 numbers, ``(..., K // 32)``.
  """
  k = x.shape[-1]
  if k % QK:
    raise ValueError(f"quantize_q8: x.shape[-1]={k} must be a multiple of {QK}.")
  xb = x.astype(jnp.float32).reshape(*x.shape[:-1], k // QK, QK)
  amax = jnp.max(jnp.abs(xb), axis=-1)
  d = _div(amax, jnp.float32(127.0))
  inv = jnp.where(amax != 0, jnp.float32(127.0) / jnp.where(amax != 0, amax, 1), 0)
  q = jnp.round(xb * inv[..., None])
  if not with_sum:
    return q, _f16(d)
  return q, _f16(d), _f16(d * jnp.sum(q, axis=-1))


def ggml_type(w) -> str | None:
  """The ggml type whose vec-dot :func:`ggml_dot` emulates for ``w``, or ``None``."""
  if not isinstance(w, quantized.QuantizedArray) or len(w.shape) != 2:
    return None
  if w.shape[0] % QK or w.group_size % QK:
    return None
  if not isinstance(w.scale, jax.Array) or (w.zero is not None and not isinstance(w.zero, jax.Array)):
    return None
  if w.bits == 8 and w.symmetric:
    return "Q8_0"
  if w.bits == 4:
    return "Q4_0" if w.symmetric else "Q4_1"
  return None


def can_use_ggml(x: jax.Array, w) -> bool:
  """Static predicate: ``w`` is a ``Q4_0``/``Q4_1``/``Q8_0``-shaped QuantizedArray."""
  del x
  return ggml_type(w) is not None


def ggml_dot(x: jax.Array, w: quantized.QuantizedArray) -> jax.Array:
  """``x @ W`` as ggml's CPU backend computes it for ``W`` stored as Q4_0, Q4_1 or Q8_0.

  ``x`` is quantized per block of 32 (:func:`quantize_q8`; ``Q8_1`` for Q4_1), then per block
  ``b`` and output ``n``: ``isum = sum_j qx[j] * qw[j, n]`` (exact integers), and
  ``y[n] = sum_b (d_w[b, n] * d_x[b]) * isum[b, n]`` (+ ``sum_b m_w[b, n] * s_x[b]`` for Q4_1),
  float32; ``qw`` is ``code - 8`` (Q4_0), ``code`` (Q4_1) or ``code - 128`` (Q8_0). The scales
  (and Q4_1 zeros) are used as float32 values; they equal the file's float16 ``d`` (``m``) when
  ``W`` was imported from or exported to GGUF.

  Raises:
    NotImplementedError: ``w`` is not one of those layouts (see :func:`ggml_type`).
  """
  qtype = ggml_type(w)
  if qtype is None:
    raise NotImplementedError(f"ggml_dot emulates Q4_0/Q4_1/Q8_0 (bits 4 or symmetric 8, groups "
                              f"of a multiple of {QK}, array scales); got {w!r}.")
  k, n = w.shape
  nb = k // QK
  rep = w.group_size // QK
  codes = w.codes().astype(jnp.float32).reshape(nb, QK, n)
  offset = {"Q4_0": 8.0, "Q4_1": 0.0, "Q8_0": 128.0}[qtype]
  qw = codes - offset
  dw = jnp.repeat(jnp.asarray(w.scale_values(), jnp.float32), rep, axis=0)  # (nb, N)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  if qtype == "Q4_1":
    qx, dx, sx = quantize_q8(x2, with_sum=True)
  else:
    qx, dx = quantize_q8(x2)
  # ggml's AVX2 vec-dot (Q4_1, Q8_0; tinyBLAS for Q8_0 batches too) keeps 8 float32 lanes; lane
  # l of block b holds the exact integer sum of elements 4l..4l+3 (maddubs + madd), and the lanes
  # are added by hsum_float_8 at the end. Q4_0 is repacked on AVX2 (Q4_0_8x8: one lane per output
  # column holding the whole block's integer sum, no horizontal add). Integer partial sums are
  # below 32 * 127 * 128 < 2**24, exact in float32.
  t = x2.shape[0]
  lanes = 1 if qtype == "Q4_0" else 8
  isum = jnp.einsum("tblj,bljn->btln", qx.reshape(t, nb, lanes, QK // lanes),
                    qw.reshape(nb, lanes, QK // lanes, n), precision=jax.lax.Precision.HIGHEST)
  scale = dx.T[:, :, None] * dw[:, None, :]  # (nb, T, N): fp32(d_x * d_w), ggml's block scale
  with jax.enable_x64(True):
    def body(acc, blk):  # acc = fmadd(d, isum, acc), lane by lane, block after block
      d, s = blk
      return _fma(d[:, None, :], s, acc), None

    acc, _ = jax.lax.scan(body, jnp.zeros((t, lanes, n), jnp.float32), (scale, isum))
    y = acc[:, 0] if lanes == 1 else _hsum_float_8(acc)
    if qtype == "Q4_1":
      mw = jnp.repeat(jnp.asarray(w.zero_values(), jnp.float32), rep, axis=0)  # (nb, N)

      def msum(summs, blk):  # summs += m * s (contracted to an FMA by the compiler)
        m, sxb = blk
        return _fma(m[None, :], sxb[:, None], summs), None

      summs, _ = jax.lax.scan(msum, jnp.zeros((t, n), jnp.float32), (mw, sx.T))
      y = y + summs
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  return y.reshape(*lead, n).astype(out_dtype)


def ggml_f32_dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ W`` for a dense float32 ``W`` as llama.cpp's CPU backend computes an F32 matmul on
  AVX2 (llamafile's ``tinyBLAS<8, __m256, ...>``, which takes every F32 x F32 product whose
  weight rows are a multiple of 4): per output, one 8-lane float32 accumulator takes
  ``fmadd(w[k], x[k], acc)`` for ``k = l, l + 8, ...`` in lane ``l``, then ``hsum_float_8``.
  The FMA goes through float64 (:func:`_fma`). ``K`` must be a multiple of 8. A single row
  (a decode step) takes ``ggml_vec_dot_f32`` as llama.cpp does (``llamafile_sgemm`` refuses
  ``n < 2``): 4 accumulators of 8 FMA lanes per 32 elements, ``GGML_F32x8_REDUCE``; ``K`` a
  multiple of 32 there."""
  k, n = w.shape
  if k % 8:
    raise ValueError(f"ggml_f32_dot: K={k} must be a multiple of 8 (tinyBLAS' lanes)")
  lead = x.shape[:-1]
  x2 = x.astype(jnp.float32).reshape(-1, k)
  one_row = x2.shape[0] == 1  # llamafile_sgemm refuses n < 2 -> ggml_vec_dot_f32
  width = 32 if one_row else 8  # lanes per step: 4 accumulators x 8, or tinyBLAS' 8
  if one_row and k % 32:
    raise ValueError(f"ggml_f32_dot: K={k} must be a multiple of 32 for one row (GGML_F32_STEP)")
  xl = x2.reshape(-1, k // width, width).transpose(1, 0, 2)  # (K/width, T, width)
  wl = w.astype(jnp.float32).reshape(k // width, width, n)  # (K/width, width, N)
  with jax.enable_x64(True):
    def body(acc, blk):
      xb, wb = blk
      return _fma(xb[:, :, None], wb[None], acc), None

    acc, _ = jax.lax.scan(body, jnp.zeros((xl.shape[1], width, n), jnp.float32), (xl, wl))
  if one_row:  # lane e of a step: accumulator e // 8, lane e % 8
    return _vec_reduce(jnp.moveaxis(acc.reshape(1, 4, 8, n), -1, 1)).reshape(*lead, n)
  return _hsum_float_8(acc).reshape(*lead, n)


def _ggml_logits(plain):
  """``Llama.logits`` under :func:`emulate_ggml`: a tied dense float32 head as ggml's F32 matmul
  (:func:`ggml_f32_dot`); anything else as ``plain`` (the model's own method)."""
  def logits(self, h: jax.Array) -> jax.Array:
    emb = self.embed.embedding.get_value()
    if self.lm_head is None and emb.dtype == jnp.float32 and emb.shape[1] % 32 == 0:
      return ggml_f32_dot(h, emb.T)
    return plain(self, h)
  return logits


def register() -> None:
  """Registers :func:`ggml_dot` as ``formats.dot(..., implementation="ggml")`` for
  ``QuantizedArray`` (priority below the ``"xla"`` fallback, so never chosen automatically).

  Explicit rather than on import: importing this module (e.g. while pytest collects its test)
  must not change the implementations every other caller sees.
  """
  dispatch.register_matmul(quantized.QuantizedArray, "ggml", ggml_dot, can_use=can_use_ggml,
                           priority=dispatch.FALLBACK_PRIORITY - 1)


def unregister() -> None:
  """Undoes :func:`register`."""
  dispatch.unregister_matmul(quantized.QuantizedArray, "ggml")


def _lane_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``sum(a * b, axis=-1)`` as llamafile's tinyBLAS F16 kernel on AVX2 adds it: lane ``l`` of
  an 8-lane float32 accumulator takes the products ``k = l, l + 8, ...`` in order (float16
  operands: every product is exact, so each ``fmadd`` is one rounded add), then ``hsum``.
  ``a`` and ``b`` broadcast against each other; the last axis is a multiple of 8."""
  k = a.shape[-1]
  a = a.reshape(*a.shape[:-1], k // 8, 8)
  b = b.reshape(*b.shape[:-1], k // 8, 8)
  acc = a[..., 0, :] * b[..., 0, :]
  for c in range(1, k // 8):
    acc = acc + a[..., c, :] * b[..., c, :]
  return _hsum_float_8(acc[..., None])[..., 0]


def _vec_reduce(acc: jax.Array) -> jax.Array:
  """``GGML_F32x8_REDUCE`` of 4 accumulators of 8 lanes (axes ``-2, -1``): ``x0 += x2``,
  ``x1 += x3``, ``x0 += x1``, then the 128-bit halves added and two ``hadd``s."""
  s0 = (acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])
  t0 = s0[..., :4] + s0[..., 4:]
  return (t0[..., 0] + t0[..., 1]) + (t0[..., 2] + t0[..., 3])


def _vec_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``sum(a * b, axis=-1)`` as ggml's AVX2 ``ggml_vec_dot_f16`` adds exact products (float16
  operands): ``GGML_F16_STEP = 32`` elements per step into 4 accumulators of 8 lanes (element
  ``e`` of a step into accumulator ``e // 8``, lane ``e % 8``), :func:`_vec_reduce`, and the
  ``n % 32`` leftovers added one by one in double. The path llama.cpp takes for a product with a
  single activation row (``llamafile_sgemm`` refuses ``n < 2``). ``a``, ``b`` broadcast."""
  n = a.shape[-1]
  m = n - n % 32
  shape = jnp.broadcast_shapes(a.shape[:-1], b.shape[:-1])
  acc = jnp.zeros((*shape, 4, 8), jnp.float32)
  for i in range(0, m, 32):
    ai = a[..., i:i + 32].reshape(*a.shape[:-1], 4, 8)
    bi = b[..., i:i + 32].reshape(*b.shape[:-1], 4, 8)
    acc = acc + ai * bi
  res = _vec_reduce(acc)
  if m == n:
    return res
  with jax.enable_x64(True):
    tot = res.astype(jnp.float64)
    for i in range(m, n):
      tot = tot + (a[..., i] * b[..., i]).astype(jnp.float64)
    return tot.astype(jnp.float32)


def ggml_softmax(scores: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """ggml's ``soft_max_ext`` on the last axis (AVX2, ``ggml_compute_forward_soft_max_f32``):
  ``w = s * scale`` (masked: ``-inf``), ``e = ggml_v_expf(w - max)``, the sum of each 8-chunk's
  ``hsum`` added in double, ``p = e * (float)(1.0 / sum)``. The last axis is a multiple of 8."""
  w = jnp.where(mask, scores * jnp.float32(scale), -jnp.inf)
  e = ggml_expf(w - jnp.max(w, axis=-1, keepdims=True))
  n = e.shape[-1]
  ch = e.reshape(*e.shape[:-1], n // 8, 8)
  hs = (((ch[..., 4] + ch[..., 0]) + (ch[..., 6] + ch[..., 2])) +
        ((ch[..., 5] + ch[..., 1]) + (ch[..., 7] + ch[..., 3])))
  with jax.enable_x64(True):
    inv = (1.0 / jnp.sum(hs.astype(jnp.float64), axis=-1, keepdims=True)).astype(jnp.float32)
  return e * inv


def _ggml_head_order(x: jax.Array) -> jax.Array:
  """Q or K heads from our half-split layout (Hugging Face's: element ``i`` pairs with
  ``i + hd/2`` in RoPE) to llama.cpp's (GGUF's Q/K row permutation: pairs ``(2i, 2i+1)``): the
  same values, in the order its lane-wise K.Q dot adds them."""
  h2 = x.shape[-1] // 2
  return jnp.stack([x[..., :h2], x[..., h2:]], axis=-1).reshape(x.shape)


def ggml_attention(q, k, v, q_pos, k_pos, sliding_window, *, causal_chunks: int = 1):
  """llama.cpp's non-flash attention with an F16 KV cache, bit for bit; the model's signature.

  ``kq = mul_mat(K_f16, Q)`` converts ``Q`` to float16 (F16's ``vec_dot_type``) and runs
  llamafile's tinyBLAS F16 kernel (:func:`_lane_dot` over ``head_dim``, its elements put in
  llama.cpp's order first: GGUF stores Q/K rows permuted, so its lanes hold other elements than
  ours would and round the partial sums differently); with a single query row (a decode step)
  llama.cpp takes ``ggml_vec_dot_f16`` instead (:func:`_vec_dot`: 4 accumulators of 8 lanes), for
  ``V.p`` too;
  ``soft_max_ext(kq, mask, 1/sqrt(hd))`` as :func:`ggml_softmax`; ``kqv = mul_mat(V_f16, kq)``
  converts the probabilities to float16 and adds over the key slots with the same kernel. ``k``
  and ``v`` are rounded to float16 here too (the cache's type), so the function also serves a
  cache-less forward. Key slot ``s`` must be llama.cpp's cache cell (position ``s`` of a fresh
  single-sequence cache); slots are padded to a multiple of 8 with masked ones (llama.cpp pads
  to 256; masked slots add exact zeros, so the padding itself does not matter).
  """
  del causal_chunks
  bsz, t, h, hd = q.shape
  if hd % 8:
    raise ValueError(f"ggml_attention: head_dim={hd} must be a multiple of 8")
  one_row = t == 1  # llama.cpp: llamafile_sgemm refuses n < 2 -> ggml_vec_dot_f16
  dot = _vec_dot if one_row else _lane_dot
  step = 32 if one_row else 8
  if k.shape[1] % step:  # pad with masked slots (position -1), as llama.cpp pads its KV view
    pad = step - k.shape[1] % step
    k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))
    k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=-1)
  s, kv = k.shape[1], k.shape[2]
  g = h // kv
  qg = _ggml_head_order(_f16(q)).reshape(bsz, t, kv, g, hd).transpose(0, 2, 3, 1, 4)  # (B,KV,G,T,hd)
  kk = _ggml_head_order(_f16(k)).transpose(0, 2, 1, 3)  # (B, KV, S, hd)
  scores = dot(qg[..., :, None, :], kk[:, :, None, None])  # (B, KV, G, T, S)
  mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)
  if sliding_window is not None:
    mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
  probs = _f16(ggml_softmax(scores, mask[:, None, None], 1.0 / math.sqrt(hd)))
  vv = _f16(v).transpose(0, 2, 3, 1)  # (B, KV, hd, S)
  out = dot(probs[..., :, None, :], vv[:, :, None, None])  # (B, KV, G, T, hd)
  return out.transpose(0, 3, 1, 2, 4).reshape(bsz, t, h * hd).astype(q.dtype)


#: Positions :func:`ggml_rope_cos_sin` tabulates (the check's prompts and generations are shorter).
ROPE_POSITIONS = 1024


@functools.lru_cache(maxsize=4)
def _rope_table(base: float, dim: int, n_pos: int):
  """``(cos, sin)`` float32 tables ``(n_pos, dim // 2)`` as ggml's ``ggml_rope_cache_init``:
  ``theta_scale = powf(base, -2.0f / dim)``, ``theta`` multiplied by it pair after pair in
  float32, and glibc's ``cosf``/``sinf`` (this machine's libm, the one llama.cpp links)."""
  import ctypes  # pylint: disable=g-import-not-at-top
  import ctypes.util  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
  for fn, nargs in (("sinf", 1), ("cosf", 1), ("powf", 2)):
    getattr(libm, fn).restype = ctypes.c_float
    getattr(libm, fn).argtypes = [ctypes.c_float] * nargs
  ts = np.float32(libm.powf(np.float32(base), np.float32(-2.0 / dim)))
  cos = np.empty((n_pos, dim // 2), np.float32)
  sin = np.empty((n_pos, dim // 2), np.float32)
  for p in range(n_pos):
    theta = np.float32(p)
    for i in range(dim // 2):
      cos[p, i], sin[p, i] = libm.cosf(theta), libm.sinf(theta)
      theta = np.float32(theta * ts)
  return cos, sin


def ggml_rope_cos_sin(cfg, positions: jax.Array, seq_len: int):
  """Drop-in for :func:`compressjax.model.rope_cos_sin` (default RoPE only) returning ggml's
  float32 ``cos``/``sin`` (:func:`_rope_table`) for ``positions < ROPE_POSITIONS``."""
  del seq_len
  if cfg.rope_type != "default":
    raise NotImplementedError(f"ggml_rope_cos_sin: rope type {cfg.rope_type!r} is not emulated")
  cos, sin = _rope_table(float(cfg.rope_theta), cfg.head_dim, ROPE_POSITIONS)
  c = jnp.asarray(cos)[positions]
  s = jnp.asarray(sin)[positions]
  return jnp.concatenate([c, c], -1), jnp.concatenate([s, s], -1)


def ggml_apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """ggml's ``rotate_pairs`` as compiled (FMA-contracted): ``y0 = fma(x0, c, -(x1 * s))``,
  ``y1 = fma(x0, s, x1 * c)``, on the half-split layout of our unpermuted Q/K (ggml pairs the
  same elements after its Q/K row permutation)."""
  half = x.shape[-1] // 2
  x0, x1 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  c = cos[:, :, None, :half].astype(jnp.float32)
  s = sin[:, :, None, :half].astype(jnp.float32)
  with jax.enable_x64(True):
    y0 = _fma(x0, c, -(x1 * s))
    y1 = _fma(x0, s, x1 * c)
  return jnp.concatenate([y0, y1], -1).astype(x.dtype)


def ggml_rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """ggml's ``rms_norm`` then ``mul``, bit for bit (``ggml_compute_forward_rms_norm_f32``).

  ``sum`` of the float32 squares in double, ``mean = (float)(sum / K)``,
  ``s = 1.0f / sqrtf(mean + eps)``, ``y = (x * s) * w`` in float32. The double sum runs in
  another order than ggml's sequential loop; its error (< K * 2**-53 relative) changes the
  float32 ``mean`` only when the exact value lies that close to a float32 rounding boundary.
  Bit-exact under ``jax.jit`` too (``1 / sqrt`` is kept from becoming ``rsqrt``).
  """
  xf = x.astype(jnp.float32)
  with jax.enable_x64(True):
    ssq = jnp.sum((xf * xf).astype(jnp.float64), axis=-1, keepdims=True)
    mean = _div(ssq, jnp.float64(x.shape[-1])).astype(jnp.float32)
  # The barrier keeps XLA's algebraic simplifier from fusing ``1 / sqrt`` into ``rsqrt`` under
  # jit, which rounds differently in about a third of the cases (eager ops are never fused).
  s = jnp.float32(1.0) / jax.lax.optimization_barrier(jnp.sqrt(mean + jnp.float32(eps)))
  return ((xf * s) * scale.astype(jnp.float32)).astype(x.dtype)


def ggml_expf(x: jax.Array) -> jax.Array:
  """ggml's AVX2 ``ggml_v_expf`` (vec.h) bit for bit: ``exp(x)`` for float32 ``x``, except that
  XLA's CPU backend flushes subnormal results (``x < -87.3``) to zero."""
  f32, i32 = jnp.float32, jnp.int32
  x = x.astype(f32)
  bits = lambda v: jax.lax.bitcast_convert_type(v, i32)
  flt = lambda v: jax.lax.bitcast_convert_type(v, f32)
  with jax.enable_x64(True):
    r = f32(float.fromhex('0x1.8p23'))
    z = _fma(x, f32(float.fromhex('0x1.715476p+0')), r)
    n = z - r
    b = _fma(-n, f32(float.fromhex('0x1.7f7d1cp-20')), _fma(-n, f32(float.fromhex('0x1.62e4p-1')), x))
    e = jax.lax.shift_left(bits(z), i32(23))
    k = flt(e + bits(f32(1)))
    c = jnp.abs(n) > f32(126)
    u = b * b
    j = _fma(_fma(_fma(f32(float.fromhex('0x1.0e4020p-7')), b, f32(float.fromhex('0x1.573e2ep-5'))), u,
                  _fma(f32(float.fromhex('0x1.555e66p-3')), b, f32(float.fromhex('0x1.fffdb6p-2')))),
             u, f32(float.fromhex('0x1.ffffecp-1')) * b)
    normal = _fma(j, k, k)
    g = jnp.where(n <= 0, jnp.asarray(0x82000000 - 2**32, i32), i32(0))
    s1 = flt(g + i32(0x7f000000))
    s2 = flt(e - g)
    d = jnp.abs(n) > f32(192)
    big = jnp.where(d, s1 * s1, jnp.where(c, _fma(s2, j, s2) * s1, normal))
  return jnp.where(c, big, normal)


def ggml_swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """ggml's fused ``swiglu`` (AVX2 ``ggml_vec_swiglu_f32``): ``x / (1 + expf(-x)) * g`` with
  :func:`ggml_expf`, bit for bit (the width is a multiple of 8, so no scalar tail)."""
  x = gate.astype(jnp.float32)
  silu = x / (jnp.float32(1) + ggml_expf(jnp.float32(0) - x))
  return (silu * up.astype(jnp.float32)).astype(gate.dtype)


@contextlib.contextmanager
def emulate_attention():
  """Within the block, :class:`compressjax.model.Llama` computes as llama.cpp's CPU backend:
  :func:`ggml_attention`, :func:`ggml_rms_norm`, :func:`ggml_swiglu`, ggml's RoPE
  (:func:`ggml_rope_cos_sin`, :func:`ggml_apply_rope`) and, for a tied float32 embedding, the
  LM head as ggml's F32 matmul (:func:`ggml_f32_dot`, through ``Llama.logits``).

  A check-only switch (``experiments/check_llamacpp.py``): it swaps the model module's attention,
  RMSNorm and SwiGLU functions while the block runs (trace inside the block; jitted functions
  traced before keep the functions they were traced with). The bit-exact norm and activation
  matter: ggml quantizes their outputs to Q8 blocks, and activations from a quantized embedding
  often sit exactly on a rounding tie, where a one-ulp difference flips the 8-bit value.
  """
  from compressjax import model as model_lib  # pylint: disable=g-import-not-at-top

  names = ("_attention", "_rms_norm", "_swiglu", "_apply_rope", "rope_cos_sin")
  saved = [getattr(model_lib, n) for n in names]
  saved_logits = model_lib.Llama.logits
  for n, f in zip(names, (ggml_attention, ggml_rms_norm, ggml_swiglu, ggml_apply_rope,
                          ggml_rope_cos_sin)):
    setattr(model_lib, n, f)
  model_lib.Llama.logits = _ggml_logits(saved_logits)
  try:
    yield
  finally:
    for n, f in zip(names, saved):
      setattr(model_lib, n, f)
    model_lib.Llama.logits = saved_logits


#: The same switch under a name that says what it does.
emulate_ggml = emulate_attention
