"""Llama-family decoder in Flax NNX (Llama, Mistral, Qwen2, SmolLM).

One parameter layout serves every loader (GGUF, Hugging Face safetensors) and every compression
transform. Linear kernels are stored as ``(in_features, out_features)`` and every product with a
weight goes through :func:`compressjax.formats.dot`, so a kernel may be a dense array or any
compressed leaf (packed integers, later sparse or low-rank formats) and the model still runs, jits
and generates without materializing the whole model.

Parameter paths (``/``-joined) are::

    embed/embedding                          (vocab, hidden)
    layers/{i}/attn_norm/scale               (hidden,)
    layers/{i}/attn/{q,k,v,o}_proj/kernel    (in, out)
    layers/{i}/attn/{q,k,v}_proj/bias        (out,)         only when ``attention_bias``
    layers/{i}/mlp_norm/scale                (hidden,)
    layers/{i}/mlp/{gate,up,down}_proj/kernel
    norm/scale                               (hidden,)
    lm_head/kernel                           (hidden, vocab) only when embeddings are untied

Q and K projections use the Hugging Face (``rotate_half``) RoPE layout; the GGUF loader undoes
llama.cpp's interleaving permutation so that both loaders land in this one layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from compressjax import formats

__all__ = [
    "Block",
    "LlamaConfig",
    "rope_cos_sin",
    "KVCache",
    "Llama",
    "rope_inv_freq",
    "init_cache",
]

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


#: Accepted values of :attr:`LlamaConfig.matmul_dtype`.
MATMUL_DTYPES = (None, "bfloat16")


def matmul(x: jax.Array, w: jax.Array, matmul_dtype: str | None = None,
           spec: str | None = None, out_dtype=None) -> jax.Array:
  """``x @ w`` (or ``einsum(spec, x, w)``); with ``matmul_dtype`` the operands are rounded to it
  and multiplied with float32 accumulation (see :attr:`LlamaConfig.matmul_dtype`), the result
  cast to ``out_dtype`` (default: the operands' result type)."""
  if matmul_dtype is None:
    return (jnp.matmul(x, w, preferred_element_type=out_dtype) if spec is None else
            jnp.einsum(spec, x, w, preferred_element_type=out_dtype))
  out = out_dtype or jnp.result_type(x.dtype, w.dtype)
  xm, wm = x.astype(matmul_dtype), w.astype(matmul_dtype)
  y = (jnp.matmul(xm, wm, preferred_element_type=jnp.float32) if spec is None else
       jnp.einsum(spec, xm, wm, preferred_element_type=jnp.float32))
  return y.astype(out)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture hyper-parameters of a Llama-family decoder.

  Attributes:
    vocab_size: number of tokens.
    hidden_size: width of the residual stream.
    intermediate_size: width of the SwiGLU MLP.
    num_layers: number of decoder blocks.
    num_heads: number of query heads.
    num_kv_heads: number of key/value heads (grouped-query attention when < ``num_heads``).
    head_dim: per-head width; ``hidden_size // num_heads`` when not given.
    rope_theta: RoPE base.
    rope_scaling: ``None`` or a Hugging Face style dict with ``rope_type`` in
      ``default, linear, dynamic, llama3, yarn`` and that type's fields.
    rms_norm_eps: epsilon of RMSNorm.
    tie_word_embeddings: whether the LM head reuses the embedding matrix.
    max_position_embeddings: context length the model was trained for.
    attention_bias: whether q/k/v projections carry a bias (Qwen2).
    sliding_window: ``None`` or the attention window (Mistral).
    bos_token_id, eos_token_id: special token ids (metadata only).
    matmul_implementation: ``None`` (automatic) or the name of the
      :func:`compressjax.formats.dot` implementation every linear layer prefers (``prefer=``),
      e.g. ``"xla"``, ``"pallas"`` or ``"pallas_interpret"``; layers whose format lacks it, or
      whose shapes it does not support, use the automatic choice. A run-time choice, not
      architecture: :meth:`to_dict` leaves it out.
    matmul_dtype: ``None`` (products in the operands' dtype) or ``"bfloat16"``: the linear
      layers with dense kernels and the attention of a forward without a KV cache multiply
      bfloat16-rounded operands with float32 accumulation and results (``preferred_element_type``),
      what AMX, tensor cores and TPU MXUs multiply faster than float32 (4-5x measured on
      AMX); activations, norms, RoPE, softmax, the LM head and compressed kernels
      (:func:`compressjax.formats.dot`) are unchanged. Used by the calibration engine's
      ``matmul_dtype``; a run-time choice, not architecture: :meth:`to_dict` leaves it out.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: dict[str, Any] | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 2048
  attention_bias: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  matmul_implementation: str | None = None
  matmul_dtype: str | None = None

  def __post_init__(self):
    hd = self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads
    object.__setattr__(self, "head_dim", hd)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f"LlamaConfig.matmul_dtype must be one of {MATMUL_DTYPES}, got "
                       f"{self.matmul_dtype!r}")
    if self.rope_scaling is not None:
      rtype = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
      if rtype not in _ROPE_TYPES:
        raise ValueError(
            f"LlamaConfig.rope_scaling: rope_type {rtype!r} is not supported; "
            f"expected one of {_ROPE_TYPES}")

  @property
  def rope_type(self) -> str:
    if self.rope_scaling is None:
      return "default"
    return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("matmul_implementation")
    d.pop("matmul_dtype")
    return d


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: LlamaConfig, seq_len: int | None = None) -> tuple[jax.Array, float]:
  """Inverse frequencies and the attention (cos/sin) scaling of the configured RoPE variant.

  Follows the Hugging Face ``ROPE_INIT_FUNCTIONS`` definitions so that checkpoints trained with a
  scaled RoPE behave identically.

  Args:
    cfg: model config.
    seq_len: static sequence length (only used by ``dynamic`` NTK scaling).

  Returns:
    ``(inv_freq, attention_scaling)`` with ``inv_freq`` of shape ``(head_dim // 2,)``.

  References:
    Su et al. 2021, RoFormer. Peng et al. 2023, YaRN. Meta 2024, Llama 3 (``llama3`` scaling).
  """
  dim = cfg.head_dim
  base = float(cfg.rope_theta)
  rs = cfg.rope_scaling or {}
  rtype = cfg.rope_type
  idx = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  inv_freq = 1.0 / (base**idx)
  scaling = 1.0
  if rtype == "default":
    pass
  elif rtype == "linear":
    inv_freq = inv_freq / float(rs["factor"])
  elif rtype == "dynamic":
    factor = float(rs["factor"])
    max_pos = cfg.max_position_embeddings
    if seq_len is not None and seq_len > max_pos:
      base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
      inv_freq = 1.0 / (base**idx)
  elif rtype == "llama3":
    factor = float(rs["factor"])
    low = float(rs["low_freq_factor"])
    high = float(rs["high_freq_factor"])
    old_len = float(rs["original_max_position_embeddings"])
    low_wl = old_len / low
    high_wl = old_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_l = jnp.where(wavelen > low_wl, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    inv_freq = jnp.where(medium, smoothed, inv_l)
  elif rtype == "yarn":
    factor = float(rs["factor"])
    orig = float(rs.get("original_max_position_embeddings", cfg.max_position_embeddings))
    att = rs.get("attention_factor")
    if att is None:
      mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")

      def get_mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

      if mscale and mscale_all:
        att = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
      else:
        att = get_mscale(factor)
    beta_fast = float(rs.get("beta_fast") or 32)
    beta_slow = float(rs.get("beta_slow") or 1)

    def corr_dim(n_rot):
      return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
      lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
      hi += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = base**idx
    extra = 1.0 / pos_freqs
    inter = 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = inter * (1 - extra_factor) + extra * extra_factor
    scaling = float(att)
  return inv_freq, scaling


def rope_cos_sin(cfg: LlamaConfig, positions: jax.Array, seq_len: int):
  inv_freq, scaling = rope_inv_freq(cfg, seq_len)
  freqs = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, hd/2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  # x: (B, T, H, hd); cos/sin: (B, T, hd)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rot * sin


def _gather_rows(table: jax.Array, idx: jax.Array) -> jax.Array:
  """``table[idx]``; under a mesh with Explicit axes the output follows ``idx``'s sharding."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not mesh.explicit_axes:
    return table[idx]
  spec = jax.typeof(idx).sharding.spec
  return table.at[idx].get(out_sharding=jax.sharding.PartitionSpec(*spec, None))


def _causal_chunks(t: int) -> int:
  """Query chunks for attention without a cache (prefill from position 0): chunk ``c`` only
  multiplies the keys up to its own end, which skips most of the masked half of the scores."""
  for c in (8, 4, 2):
    if t >= 64 * c and t % c == 0:
      return c
  return 1


def _attention(q, k, v, q_pos, k_pos, sliding_window, *, causal_chunks: int = 1,
               matmul_dtype: str | None = None):
  """Grouped-query attention ``(B, T, H, hd) x (B, S, KV, hd) -> (B, T, H * hd)``.

  Scores are float32. The mask keeps key ``s`` for query ``t`` when ``0 <= k_pos[s] <= q_pos[t]``
  (and within ``sliding_window``). With ``causal_chunks > 1`` (only without a cache, where query
  and key positions are the same token indices) the queries are cut into that many chunks and
  chunk ``c`` is multiplied only with keys ``[0, end of c)``: the keys it skips are all later
  positions, masked anyway, so the result is the same up to float rounding and the work of the
  scores and probabilities drops from ``T^2`` to about ``(c + 1) / 2c`` of it.
  ``matmul_dtype``: both products with operands rounded to it (:func:`matmul`).
  """
  bsz, t, h, hd = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = h // kv
  qg = q.reshape(bsz, t, kv, g, hd).transpose(0, 2, 3, 1, 4)  # (B, KV, G, T, hd)
  kk = k.transpose(0, 2, 1, 3)  # (B, KV, S, hd)
  vv = v.transpose(0, 2, 1, 3)
  if causal_chunks > 1 and s != t:
    raise ValueError(f"causal_chunks needs as many keys as queries, got {s} keys, {t} queries")
  tc = t // causal_chunks
  outs = []
  for c in range(causal_chunks):
    q0, q1 = c * tc, (c + 1) * tc
    s1 = q1 if causal_chunks > 1 else s
    qc = qg[:, :, :, q0:q1].reshape(bsz, kv, g * tc, hd)
    scores = matmul(qc, kk[:, :, :s1], matmul_dtype, "bkqd,bksd->bkqs", jnp.float32)
    scores = scores.reshape(bsz, kv, g, tc, s1) / math.sqrt(hd)
    qp, kp = q_pos[:, q0:q1], k_pos[:, :s1]
    mask = (kp[:, None, :] <= qp[:, :, None]) & (kp[:, None, :] >= 0)  # (B, Tc, S1)
    if sliding_window is not None:
      mask &= (qp[:, :, None] - kp[:, None, :]) < sliding_window
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(bsz, kv, g * tc, s1)
    outs.append(matmul(probs, vv[:, :, :s1], matmul_dtype, "bkqs,bksd->bkqd")
                .reshape(bsz, kv, g, tc, hd))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(bsz, t, h * hd)


#: Shortest key prefix that cached attention bounds itself to; longer caches get bounds that
#: grow 4x from it (see :func:`_cached_attention`). Caches up to this length are attended whole.
ATTEND_MIN = 256


def _attend_bounds(s: int) -> tuple[int, ...]:
  """Static key-prefix lengths for a cache of ``s`` positions: ``ATTEND_MIN * 4**i < s``, then
  ``s``."""
  bounds, n = [], ATTEND_MIN
  while n < s:
    bounds.append(n)
    n *= 4
  return tuple(bounds) + (s,)


def _cached_attention(q, ck, cv, layer, q_pos, k_pos, sliding_window, end, dtype):
  """:func:`_attention` of layer ``layer`` of the whole ``(L, B, S, KV, hd)`` cache over its
  first ``n`` positions only, ``n`` the shortest of :func:`_attend_bounds` that holds the
  ``end`` filled ones (a ``lax.switch`` over the static bounds, so one program serves every
  length; each branch slices the cache itself, so no slab is copied into the switch).

  Positions ``>= end`` are masked anyway, so the result is the same up to float rounding; the
  work drops from the allocated length to at most 4x the filled one (reference model's shapes,
  4-bit, 40-56 positions filled, 2080 allocated: 67.0 ms/token over the whole cache, 42.9
  bounded; 80 allocated: 37.2 / 37.6; interleaved in one process on a loaded 2-core host,
  ``experiments/profile_decode.py --cache-lengths 80,2080``).
  """
  bounds = _attend_bounds(ck.shape[2])

  def branch(n):
    def attend(q, ck, cv, qp, kp):
      k, v = ck[layer, :, :n].astype(dtype), cv[layer, :, :n].astype(dtype)
      return _attention(q, k, v, qp, kp[:, :n], sliding_window)
    return attend

  if len(bounds) == 1:
    return branch(bounds[0])(q, ck, cv, q_pos, k_pos)
  idx = jnp.searchsorted(jnp.asarray(bounds, jnp.int32), end.astype(jnp.int32), side="left")
  return jax.lax.switch(idx, [branch(n) for n in bounds], q, ck, cv, q_pos, k_pos)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Key/value cache for incremental decoding.

  Invariants: ``k`` and ``v`` have shape ``(num_layers, batch, max_len, num_kv_heads, head_dim)``;
  ``length`` (int32 scalar) counts the positions already written, all sequences in the batch
  sharing the same length; positions ``>= length`` hold garbage and are masked out.
  """

  k: jax.Array
  v: jax.Array
  length: jax.Array


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Linear(nnx.Module):
  """``y = x @ kernel (+ bias)``; ``kernel`` may be dense or any compressed leaf."""

  def __init__(self, din: int, dout: int, *, use_bias: bool, rngs: nnx.Rngs, dtype=jnp.float32,
               implementation: str | None = None, matmul_dtype: str | None = None):
    init = nnx.initializers.lecun_normal()
    self.implementation = implementation  # static: formats.dot(..., prefer=)
    self.matmul_dtype = matmul_dtype  # static: LlamaConfig.matmul_dtype
    self.kernel = nnx.Param(init(rngs.params(), (din, dout), dtype))
    self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel.get_value()
    if self.matmul_dtype is not None and not isinstance(w, formats.CompressedArray):
      y = matmul(x, w, self.matmul_dtype)
    else:
      y = formats.dot(x, w, prefer=self.implementation)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(y.dtype)
    return y


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """``x / sqrt(mean(x**2) + eps) * scale`` in float32 (module-level so a check can swap it)."""
  xf = x.astype(jnp.float32)
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """``silu(gate) * up`` (module-level so a check can swap it)."""
  return jax.nn.silu(gate) * up


def head_logits(h: jax.Array, *, embedding=None, kernel=None,
                implementation: str | None = None) -> jax.Array:
  """Logits of final hidden states ``h``: ``h @ kernel`` (an untied head, dense or compressed)
  or, with ``kernel=None``, the tied ``h @ embedding.T`` (see :meth:`Llama.logits`)."""
  if kernel is not None:
    return formats.dot(h, kernel, prefer=implementation)
  if isinstance(embedding, formats.CompressedArray):
    return formats.dot(h, embedding.T)
  return jnp.einsum("...d,vd->...v", h, embedding)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return _rms_norm(x, self.scale.get_value(), self.eps)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.cfg = cfg
    h, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    b = cfg.attention_bias
    self.q_proj = Linear(d, h * hd, use_bias=b, rngs=rngs, dtype=dtype,
                         implementation=cfg.matmul_implementation, matmul_dtype=cfg.matmul_dtype)
    self.k_proj = Linear(d, kv * hd, use_bias=b, rngs=rngs, dtype=dtype,
                         implementation=cfg.matmul_implementation, matmul_dtype=cfg.matmul_dtype)
    self.v_proj = Linear(d, kv * hd, use_bias=b, rngs=rngs, dtype=dtype,
                         implementation=cfg.matmul_implementation, matmul_dtype=cfg.matmul_dtype)
    self.o_proj = Linear(h * hd, d, use_bias=False, rngs=rngs, dtype=dtype,
                         implementation=cfg.matmul_implementation, matmul_dtype=cfg.matmul_dtype)

  def __call__(self, x, cos, sin, q_pos, k_pos, kv_cache=None, capture=None):
    """x: (B, T, D). q_pos: (B, T). k_pos: (B, S).

    ``kv_cache``: None, ``(k, v, start)`` with this layer's ``(B, S, KV, hd)`` cache, or
    ``(k, v, start, layer)`` with the whole ``(num_layers, B, S, KV, hd)`` cache and this
    block's index in it (what :meth:`Llama.hidden_states` passes: the new keys and values are
    written in place instead of copying every layer's slab and stacking them again).

    ``capture`` (a dict, filled at trace time) receives the input of each linear layer.
    """
    cfg = self.cfg
    bsz, t, _ = x.shape
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    # Query heads come from the kernel: structured pruning may leave fewer in this block
    # (the same number in every KV group, so the grouped layout below stays valid).
    h = self.q_proj.kernel.get_value().shape[1] // hd
    if capture is not None:
      capture["attn/qkv"] = x
    q = self.q_proj(x).reshape(bsz, t, h, hd)
    k = self.k_proj(x).reshape(bsz, t, kv, hd)
    v = self.v_proj(x).reshape(bsz, t, kv, hd)
    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)
    new_kv = None
    if kv_cache is not None and len(kv_cache) == 4:
      # The whole (num_layers, B, S, KV, hd) cache and this block's layer index: only the new
      # positions are written (in place when XLA owns the buffer, e.g. a loop carry or a
      # donated argument), then attention reads this layer's filled prefix.
      ck, cv, start, layer = kv_cache
      ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (layer, 0, start, 0, 0))
      cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (layer, 0, start, 0, 0))
      new_kv = (ck, cv)
      out = _cached_attention(q, ck, cv, layer, q_pos, k_pos, cfg.sliding_window, start + t,
                              x.dtype)
    else:
      if kv_cache is not None:
        ck, cv, start = kv_cache
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, start, 0, 0))
        new_kv = (ck, cv)
        k, v = ck.astype(x.dtype), cv.astype(x.dtype)
      out = _attention(q, k, v, q_pos, k_pos, cfg.sliding_window,
                       causal_chunks=1 if kv_cache is not None else _causal_chunks(t),
                       matmul_dtype=cfg.matmul_dtype)
    if capture is not None:
      capture["attn/o_proj"] = out
    return self.o_proj(out), new_kv


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = Linear(d, f, use_bias=False, rngs=rngs, dtype=dtype,
                            implementation=cfg.matmul_implementation, matmul_dtype=cfg.matmul_dtype)
    self.up_proj = Linear(d, f, use_bias=False, rngs=rngs, dtype=dtype,
                          implementation=cfg.matmul_implementation, matmul_dtype=cfg.matmul_dtype)
    self.down_proj = Linear(f, d, use_bias=False, rngs=rngs, dtype=dtype,
                            implementation=cfg.matmul_implementation, matmul_dtype=cfg.matmul_dtype)

  def __call__(self, x, capture=None):
    act = _swiglu(self.gate_proj(x), self.up_proj(x))
    if capture is not None:
      capture["mlp/gate_up"] = x
      capture["mlp/down_proj"] = act
    return self.down_proj(act)


class Block(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype)

  # Which captured input feeds which linear layer (see ``capture`` in the sub-modules).
  LINEAR_INPUTS = {
      "attn/q_proj": "attn/qkv", "attn/k_proj": "attn/qkv", "attn/v_proj": "attn/qkv",
      "attn/o_proj": "attn/o_proj", "mlp/gate_proj": "mlp/gate_up", "mlp/up_proj": "mlp/gate_up",
      "mlp/down_proj": "mlp/down_proj",
  }

  def __call__(self, x, cos, sin, q_pos, k_pos, kv_cache=None, capture=None):
    """One decoder block; ``capture`` (optional dict) receives every linear layer's input."""
    a, new_kv = self.attn(self.attn_norm(x), cos, sin, q_pos, k_pos, kv_cache, capture)
    x = x + a
    x = x + self.mlp(self.mlp_norm(x), capture)
    return x, new_kv


class Llama(nnx.Module):
  """Llama-family causal LM.

  Examples:
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    ...                   num_heads=4, num_kv_heads=2)
    >>> model = Llama(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((1, 5), jnp.int32)).shape
    (1, 5, 64)
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=dtype)
    self.layers = nnx.List([Block(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs, dtype=dtype,
                           implementation=cfg.matmul_implementation))

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    return _gather_rows(self.embed.embedding.get_value(), tokens)

  def hidden_states(self, tokens: jax.Array, cache: KVCache | None = None):
    """Final normalized hidden states ``(B, T, D)`` and the updated cache (or None)."""
    cfg = self.cfg
    bsz, t = tokens.shape
    x = self.embed_tokens(tokens)
    if cache is None:
      q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (bsz, t))
      k_pos = q_pos
      seq_len = t
    else:
      max_len = cache.k.shape[2]
      q_pos = jnp.broadcast_to(cache.length + jnp.arange(t, dtype=jnp.int32), (bsz, t))
      slots = jnp.arange(max_len, dtype=jnp.int32)
      k_pos = jnp.broadcast_to(jnp.where(slots < cache.length + t, slots, -1), (bsz, max_len))
      seq_len = max_len
    cos, sin = rope_cos_sin(cfg, q_pos, seq_len)
    ck = cv = None
    if cache is not None:
      ck, cv = cache.k, cache.v
    for i, layer in enumerate(self.layers):
      kvc = None if cache is None else (ck, cv, cache.length, i)
      x, nkv = layer(x, cos, sin, q_pos, k_pos, kvc)
      if nkv is not None:
        ck, cv = nkv
    x = self.norm(x)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(ck, cv, cache.length + t)
    return x, new_cache

  def logits(self, h: jax.Array) -> jax.Array:
    """``h @ E.T`` (tied embeddings) or the LM head.

    The tied product contracts ``h``'s last axis with the embedding's last axis
    (``einsum("...d,vd->...v")``) instead of multiplying by ``E.T``: XLA CPU compiled ``h @ E.T`` at one
    row into a loop fusion that reads ``E`` through a transpose (no vectorized GEMV), 1.2-1.3x
    slower than the ``dot`` it emits for this form (reference model, 49152x576: 9.2 against
    7.6 ms at one row, equal from 16 rows; same-process timings on a loaded 2-core host). From
    16 rows both forms give bit-identical logits; at one row they differ by summation order
    (2e-7 relative).
    """
    if self.lm_head is None:
      return head_logits(h, embedding=self.embed.embedding.get_value())
    return self.lm_head(h)

  def __call__(self, tokens: jax.Array, cache: KVCache | None = None):
    """Logits ``(B, T, vocab)``; with a cache, returns ``(logits, new_cache)``."""
    h, new_cache = self.hidden_states(tokens, cache)
    out = self.logits(h)
    return out if cache is None else (out, new_cache)
