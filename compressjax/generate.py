"""Greedy / sampled generation, with or without the KV cache (both jitted once per shape).

With the cache the whole decode loop runs on the device in one call (:func:`_cached_decode`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compressjax.model import init_cache

__all__ = ["generate"]


def _pick(logits, temperature, key):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def _record(tok, done, eos_id):
  """Sequences that produced ``eos_id`` keep emitting it (``done`` is updated)."""
  if eos_id is None:
    return tok, done
  tok = jnp.where(done, jnp.int32(eos_id), tok)
  return tok, done | (tok == eos_id)


@functools.lru_cache(maxsize=32)
def _cached_decode(graphdef, state_def, temperature: float, max_new_tokens: int,
                   eos_id: int | None):
  """Prefill and the whole decode loop through the KV cache in one jitted call.

  The decode steps run in a ``lax.fori_loop`` on the device, so a token costs no host work (no
  dispatch of a call with every weight as an argument, no key split, no token round trip; on
  the reference model's shapes at 4 bits with the CPU kernel those cost 3.7 of 41.3 ms per
  token, interleaved same-process timings on a loaded 2-core host, see README "C++ CPU
  kernel" and ``experiments/profile_decode.py``) and the cache is a loop carry that XLA
  updates in place. It takes the model
  state as the flat list of its leaves (``state_def`` rebuilds it inside): flattening an
  ``nnx.State`` of compressed leaves in Python costs more than a decode step. The tokens and
  the random stream are those of a step-by-step loop: one ``split`` of the key per token.
  """

  @jax.jit
  def decode(flat_state, prompt, key):
    model = nnx.merge(graphdef, jax.tree.unflatten(state_def, flat_state))
    bsz, t = prompt.shape
    cache = init_cache(model.cfg, bsz, t + max_new_tokens,
                       dtype=model.embed.embedding.get_value().dtype)
    key, sub = jax.random.split(key)
    logits, cache = model(prompt, cache)
    tok = _pick(logits[:, -1].astype(jnp.float32), temperature, sub)
    tok, done = _record(tok, jnp.zeros((bsz,), bool), eos_id)
    out = jnp.zeros((bsz, max_new_tokens), jnp.int32).at[:, 0].set(tok)

    def body(i, carry):
      tok, cache, key, done, out = carry
      key, sub = jax.random.split(key)
      logits, cache = model(tok[:, None], cache)
      tok = _pick(logits[:, -1].astype(jnp.float32), temperature, sub)
      tok, done = _record(tok, done, eos_id)
      out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
      return tok, cache, key, done, out

    carry = jax.lax.fori_loop(1, max_new_tokens, body, (tok, cache, key, done, out))
    return carry[-1]

  return decode


@functools.lru_cache(maxsize=32)
def _cached_step(graphdef, state_def, temperature: float):
  """One prefill/decode step through the KV cache, jitted once per model structure.

  Not used by :func:`generate` any more (see :func:`_cached_decode`); kept as the step-by-step
  reference that tests and ``experiments/profile_decode.py`` compare the on-device loop with.

  It takes the model state as the flat list of its leaves (``state_def`` rebuilds it inside):
  flattening an ``nnx.State`` of compressed leaves in Python on every decode step cost more than
  the step's compressed matmuls (reference model, 4-bit, CPU kernel: ~20 of ~31 ms per token went
  to everything but the linears).
  """

  @jax.jit
  def step(flat_state, toks, cache, key):
    state = jax.tree.unflatten(state_def, flat_state)
    logits, cache = nnx.merge(graphdef, state)(toks, cache)
    return _pick(logits[:, -1].astype(jnp.float32), temperature, key), cache

  return step


@functools.lru_cache(maxsize=32)
def _cached_full(graphdef, temperature: float):
  """Full causal forward over a fixed buffer, picking the token after position ``pos - 1``."""

  @jax.jit
  def full(state, buf, pos, key):
    logits = nnx.merge(graphdef, state)(buf)
    last = jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1, keepdims=False)
    return _pick(last.astype(jnp.float32), temperature, key)

  return full


def generate(model, prompt_tokens, max_new_tokens: int, *, use_cache: bool = True,
             temperature: float = 0.0, seed: int = 0, eos_id: int | None = None) -> np.ndarray:
  """Generates ``max_new_tokens`` after ``prompt_tokens`` (``(T,)`` or ``(B, T)``, same length).

  With ``use_cache`` the prompt is prefilled once and each step feeds one token through the KV
  cache, all in one jitted call (a ``lax.fori_loop`` on the device: no host work per token;
  compiled once per prompt shape, ``max_new_tokens``, ``temperature`` and ``eos_id``); without
  it every step recomputes the full causal forward over a fixed-length buffer (the positions
  after the current one are ignored by the causal mask), one call per token, compiled once.
  Both draw one ``jax.random.split`` of the key per token, so they sample alike. Sequences that
  produced ``eos_id`` keep emitting it.

  Returns:
    int32 array ``(B, max_new_tokens)`` (or ``(max_new_tokens,)`` for a 1-D prompt).
  """
  prompt = np.asarray(prompt_tokens, dtype=np.int32)
  squeeze = prompt.ndim == 1
  if squeeze:
    prompt = prompt[None]
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt_tokens must be (T,) or (B, T) with T >= 1, got {prompt.shape}")
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  bsz, t = prompt.shape
  graphdef, state = nnx.split(model)
  key = jax.random.key(seed)
  if use_cache:
    flat_state, state_def = jax.tree.flatten(state)
    decode = _cached_decode(graphdef, state_def, float(temperature), int(max_new_tokens),
                            None if eos_id is None else int(eos_id))
    res = np.asarray(decode(flat_state, jnp.asarray(prompt), key)).astype(np.int32)
    return res[0] if squeeze else res

  total = t + max_new_tokens
  out = []
  done = jnp.zeros((bsz,), bool)
  full = _cached_full(graphdef, float(temperature))
  buf = np.zeros((bsz, total), np.int32)
  buf[:, :t] = prompt
  for i in range(max_new_tokens):
    key, sub = jax.random.split(key)
    tok, done = _record(full(state, jnp.asarray(buf), jnp.int32(t + i), sub), done, eos_id)
    out.append(np.asarray(tok))
    buf[:, t + i] = out[-1]
  res = np.stack(out, axis=1).astype(np.int32)
  return res[0] if squeeze else res
