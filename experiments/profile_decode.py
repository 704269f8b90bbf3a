"""Where a decode token's time goes: interleaved variants of batch-1 KV-cache decode (issue 16).

Builds a model of the reference model's shapes (SmolLM2-135M: 30 blocks, hidden 576, MLP 1536,
9/3 heads, tied 49152-token embedding) with random weights (timings do not depend on the
values; ``--model NAME`` loads real weights instead), compresses every ``*_proj`` kernel with
RTN (``--bits``, g64) and times, interleaved in one process (A B C ... A B C ..., medians of
``--reps``), ``--new-tokens`` greedy tokens after a 16-token prompt with:

* ``stepwise_old``: the decode as it was before (commit 33b7d52): one jitted step per token
  driven from Python (key split, token round trip, ~480 arguments per call), the cache update
  that sliced every layer's slab and re-stacked the whole cache, and the head as ``h @ E.T``;
* ``stepwise_oldcache``: the same Python loop with the old cache update only;
* ``stepwise``: the same Python loop with the in-place cache update and the einsum head;
* ``loop``: :func:`compressjax.generate.generate` (prefill and all steps in one jitted call);
* ``loop_1thread``: the same with ``COMPRESSJAX_CPU_KERNEL_THREADS=1``;
* ``loop_noop``: the same with every kernel call replaced by a no-op FFI call of the same
  operands and output (built here with g++): everything but the linear layers;
* ``loop_oldhead``: the loop with the tied LM head as ``h @ E.T`` (as before) instead of
  ``einsum("...d,vd->...v", h, E)``;
* ``stepwise_old_noop``: ``stepwise_old`` with the no-op kernel (everything but the linears,
  before);
* ``loop_attn_mr``: the loop with one-query attention as broadcast multiply-and-reduce
  (elementwise, fusable) instead of the two einsums (XLA CPU: two tiny library dots per layer);
* ``dense``: the uncompressed float32 model through the same loop.

``--cache-lengths 80,2080`` also times 16 decode steps in a ``fori_loop`` (cache in place as
the carry) from a cache filled to 40 positions but allocated at each length, with attention
over the whole allocated cache (as before) and bounded to the filled prefix (now).

``--trace DIR`` also records a :mod:`jax.profiler` trace of one ``loop`` generation and prints
the time per token by XLA op (custom calls, the head's fusion, the rest) and the idle time
between ops. Absolute times depend on the host's load; compare rows of one run only.

Usage: ``python experiments/profile_decode.py [--bits 4] [--reps 7] [--trace /tmp/tr]``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import importlib
import json
import os
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compressjax import generate as G
from compressjax import model as M
from compressjax import transforms as T
from compressjax.io.loading import build_model, model_params

QG = importlib.import_module("compressjax.kernels.cpu.quant_gemv")

REFERENCE = M.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0)

_NOOP_CC = r"""
#include <cstring>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
static ffi::Error Noop(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> packed, ffi::AnyBuffer scale,
                       int64_t bits, int64_t group_size, int64_t threads,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto d = y->dimensions();
  std::memset(y->typed_data(), 0, sizeof(float) * d[0] * d[1]);
  y->typed_data()[0] = x.typed_data()[0] * 1e-30f;  // keep the data dependence
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(cj_noop_sym, Noop,
  ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::U32>>().Arg<ffi::AnyBuffer>()
  .Attr<int64_t>("bits").Attr<int64_t>("group_size").Attr<int64_t>("threads")
  .Ret<ffi::Buffer<ffi::F32>>());
"""


def _register_noop():
  import ctypes  # pylint: disable=g-import-not-at-top
  d = tempfile.mkdtemp(prefix="cj_noop_")
  src, lib = os.path.join(d, "noop.cc"), os.path.join(d, "noop.so")
  with open(src, "w") as f:
    f.write(_NOOP_CC)
  subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
                  f"-I{jax.ffi.include_dir()}", src, "-o", lib], check=True)
  jax.ffi.register_ffi_target("cj_noop_sym", jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(lib).cj_noop_sym),
                              platform="cpu")


def _noop_ffi(x2, packed, scale, zero, *, bits, group_size, threads, variant):
  del zero, variant
  return jax.ffi.ffi_call("cj_noop_sym", jax.ShapeDtypeStruct((x2.shape[0], packed.shape[1]),
                                                              jnp.float32))(
      x2, packed, scale, bits=np.int64(bits), group_size=np.int64(group_size),
      threads=np.int64(threads))


def _old_hidden_states(self, tokens, cache=None):
  """``Llama.hidden_states`` before the in-place cache update (per-layer slab, then stack)."""
  cfg = self.cfg
  bsz, t = tokens.shape
  x = self.embed_tokens(tokens)
  max_len = cache.k.shape[2]
  q_pos = jnp.broadcast_to(cache.length + jnp.arange(t, dtype=jnp.int32), (bsz, t))
  slots = jnp.arange(max_len, dtype=jnp.int32)
  k_pos = jnp.broadcast_to(jnp.where(slots < cache.length + t, slots, -1), (bsz, max_len))
  cos, sin = M.rope_cos_sin(cfg, q_pos, max_len)
  new_k, new_v = [], []
  for i, layer in enumerate(self.layers):
    x, nkv = layer(x, cos, sin, q_pos, k_pos, (cache.k[i], cache.v[i], cache.length))
    new_k.append(nkv[0])
    new_v.append(nkv[1])
  return self.norm(x), M.KVCache(jnp.stack(new_k), jnp.stack(new_v), cache.length + t)


def _old_logits(self, h):
  return h @ self.embed.embedding.get_value().T


def _attention_mr(q, k, v, q_pos, k_pos, sliding_window, *, causal_chunks=1):
  """``model._attention`` for one query position as multiply-and-reduce (no dot ops)."""
  bsz, t, h, hd = q.shape
  if t != 1:
    return _ATTENTION(q, k, v, q_pos, k_pos, sliding_window, causal_chunks=causal_chunks)
  kv = k.shape[2]
  g = h // kv
  qg = q.reshape(bsz, kv, g, hd).astype(jnp.float32)
  kk = k.transpose(0, 2, 1, 3).astype(jnp.float32)  # (B, KV, S, hd)
  scores = jnp.sum(qg[:, :, :, None, :] * kk[:, :, None], axis=-1) / np.sqrt(hd)  # (B,KV,G,S)
  mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)  # (B, 1, S)
  if sliding_window is not None:
    mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  vv = v.transpose(0, 2, 1, 3)  # (B, KV, S, hd)
  out = jnp.sum(probs[..., None] * vv[:, :, None], axis=3)  # (B, KV, G, hd)
  return out.reshape(bsz, 1, h * hd)


_ATTENTION = M._attention


class _Patch:
  """Trace-time switches of a variant (restored on exit)."""

  def __init__(self, threads="0", noop=False, old_cache=False, old_head=False, attn_mr=False):
    self.threads, self.noop, self.old_cache, self.old_head = threads, noop, old_cache, old_head
    self.attn_mr = attn_mr

  def __enter__(self):
    self.saved = (os.environ.get("COMPRESSJAX_CPU_KERNEL_THREADS"), QG._ffi,
                  M.Llama.hidden_states, M.Llama.logits, M._attention)
    os.environ["COMPRESSJAX_CPU_KERNEL_THREADS"] = self.threads
    if self.noop:
      QG._ffi = _noop_ffi
    if self.old_cache:
      M.Llama.hidden_states = _old_hidden_states
    if self.old_head:
      M.Llama.logits = _old_logits
    if self.attn_mr:
      M._attention = _attention_mr
    G._cached_decode.cache_clear()
    G._cached_step.cache_clear()

  def __exit__(self, *exc):
    env, QG._ffi, M.Llama.hidden_states, M.Llama.logits, M._attention = self.saved
    if env is None:
      os.environ.pop("COMPRESSJAX_CPU_KERNEL_THREADS", None)
    else:
      os.environ["COMPRESSJAX_CPU_KERNEL_THREADS"] = env


def _loop_runner(model, prompt, n):
  graphdef, state = nnx.split(model)
  flat, state_def = jax.tree.flatten(state)
  f = G._cached_decode(graphdef, state_def, 0.0, n, None)
  return lambda: np.asarray(f(flat, prompt, jax.random.key(0)))[0]


def _step_runner(model, prompt, n, extra_cache=0):
  graphdef, state = nnx.split(model)
  flat, state_def = jax.tree.flatten(state)
  step = G._cached_step(graphdef, state_def, 0.0)

  def run():  # the generate() loop as it was before the on-device loop
    cache = M.init_cache(model.cfg, 1, prompt.shape[1] + n + extra_cache)
    key = jax.random.key(0)
    key, sub = jax.random.split(key)
    tok, cache = step(flat, prompt, cache, sub)
    out = [np.asarray(tok)]
    for _ in range(n - 1):
      key, sub = jax.random.split(key)
      tok, cache = step(flat, jnp.asarray(out[-1])[:, None], cache, sub)
      out.append(np.asarray(tok))
    return np.stack(out, axis=1)[0]

  return run


VARIANTS = {
    "stepwise_old": (_step_runner, dict(old_cache=True, old_head=True)),
    "stepwise_oldcache": (_step_runner, dict(old_cache=True)),
    "stepwise": (_step_runner, {}),
    "loop": (_loop_runner, {}),
    "loop_1thread": (_loop_runner, dict(threads="1")),
    "loop_noop": (_loop_runner, dict(noop=True)),
    "loop_oldhead": (_loop_runner, dict(old_head=True)),
    "stepwise_old_noop": (_step_runner, dict(old_cache=True, old_head=True, noop=True)),
    "loop_attn_mr": (_loop_runner, dict(attn_mr=True)),
    "dense": (_loop_runner, {}),
}


def cache_length_cost(model, lengths, reps):
  """ms per decode step, cache filled to 40-56 positions, allocated at each of ``lengths``,
  with attention bounded to the filled prefix (``bounded``) and over the whole cache (``full``,
  as before: ``model.ATTEND_MIN`` above every length)."""
  graphdef, state = nnx.split(model)
  flat, state_def = jax.tree.flatten(state)

  def make():
    @jax.jit
    def steps(flat, tok, cache):
      m = nnx.merge(graphdef, jax.tree.unflatten(state_def, flat))

      def body(i, c):
        logits, cache = m(c[0][:, None], c[1])
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

      return jax.lax.fori_loop(0, 16, body, (tok, cache))
    return steps

  runs = {}
  saved = M.ATTEND_MIN
  try:
    for n in lengths:
      for mode in ("full", "bounded"):
        M.ATTEND_MIN = saved if mode == "bounded" else 1 << 40
        c = M.init_cache(model.cfg, 1, n)
        c = M.KVCache(c.k, c.v, jnp.int32(40))
        f = make()
        jax.block_until_ready(f(flat, jnp.zeros((1,), jnp.int32), c))  # traced here
        runs[(n, mode)] = (f, c)
  finally:
    M.ATTEND_MIN = saved
  ts = {k: [] for k in runs}
  for _ in range(reps):
    for k, (f, c) in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(f(flat, jnp.zeros((1,), jnp.int32), c))
      ts[k].append((time.perf_counter() - t) / 16)
  print(f"cache filled to 40-56 positions (interleaved, load {os.getloadavg()[0]:.1f}), ms/token: "
        + ", ".join(f"{n} allocated {mode} {1e3 * np.median(v):.2f}" for (n, mode), v in ts.items()))


def op_breakdown(trace_dir, tokens):
  """Per-token time by XLA op name prefix from a ``jax.profiler`` trace, and idle time."""
  f = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  events = [e for e in json.load(gzip.open(f))["traceEvents"] if e.get("ph") == "X"]
  run = max((e for e in events if e["name"].startswith("ThunkExecutor::Execute (wait")),
            key=lambda e: e["dur"])
  t0, t1 = run["ts"], run["ts"] + run["dur"]
  ops = [e for e in events if t0 <= e["ts"] < t1 and not e["name"].startswith(("ThunkExecutor", "$"))
         and "Pjit" not in e["name"] and e["name"] not in ("while", "call")]
  by = collections.defaultdict(float)
  for e in ops:
    by[e["name"].split(".")[0]] += e["dur"]
  busy, cur = 0.0, None
  for a, b in sorted((e["ts"], e["ts"] + e["dur"]) for e in ops):
    if cur is None or a > cur[1]:
      busy += 0 if cur is None else cur[1] - cur[0]
      cur = [a, b]
    else:
      cur[1] = max(cur[1], b)
  busy += cur[1] - cur[0]
  print(f"trace: {run['dur'] / 1e3 / tokens:.2f} ms/token on the device, ops busy "
        f"{busy / 1e3 / tokens:.2f}, idle between ops {(run['dur'] - busy) / 1e3 / tokens:.2f}")
  for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:12]:
    print(f"  {v / 1e3 / tokens:7.3f} ms/token  {k}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default=None, help="load real weights (default: random, same shapes)")
  p.add_argument("--bits", type=int, default=4)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--extra-cache", type=int, default=0,
                 help="extra cache positions for the stepwise variants (cost of a long cache)")
  p.add_argument("--cache-lengths", default=None, help="e.g. 80,2080 (see module doc)")
  p.add_argument("--trace", default=None, help="directory for a profiler trace of 'loop'")
  a = p.parse_args(argv)
  if a.model:
    from compressjax.io import open_model  # pylint: disable=g-import-not-at-top
    cfg, params, _ = open_model(a.model, lazy=False)
  else:
    cfg = REFERENCE
    params = model_params(M.Llama(cfg, rngs=nnx.Rngs(0)))
  qparams = T.apply(T.select((r".*_proj/kernel", T.rtn(bits=a.bits, group_size=64))), params)[0]
  qmodel = build_model(dataclasses.replace(cfg, matmul_implementation="cpu"), qparams)
  dense = build_model(dataclasses.replace(cfg, matmul_implementation=None), params)
  names = a.variants.split(",")
  if "loop_noop" in names:
    _register_noop()
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16)), jnp.int32)
  runs, outs = {}, {}
  for name in names:
    make, patch = VARIANTS[name]
    with _Patch(**patch):
      kw = dict(extra_cache=a.extra_cache) if make is _step_runner else {}
      runs[name] = make(dense if name == "dense" else qmodel, prompt, a.new_tokens, **kw)
      outs[name] = runs[name]()  # compile (tracing happens under the patch)
  ref = outs.get("stepwise_old")
  wall = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  for _ in range(a.reps):
    for k, run in runs.items():
      c, t = time.process_time(), time.perf_counter()
      run()
      wall[k].append((time.perf_counter() - t) / a.new_tokens)
      cpu[k].append((time.process_time() - c) / a.new_tokens)
  print(f"{cfg.num_layers} blocks, {a.bits}-bit g64, {a.new_tokens} tokens, {a.reps} interleaved "
        f"reps, load {os.getloadavg()[0]:.1f}; medians (ms per token)")
  for k in runs:
    same = "" if ref is None or k.endswith("_noop") else (
        "  tokens == stepwise_old" if np.array_equal(outs[k], ref) else "  tokens DIFFER")
    print(f"  {k:13s} wall {1e3 * np.median(wall[k]):7.2f}  "
          f"(p25 {1e3 * np.percentile(wall[k], 25):6.2f}, p75 {1e3 * np.percentile(wall[k], 75):6.2f})"
          f"  cpu {1e3 * np.median(cpu[k]):7.2f}{same}")
  if a.cache_lengths:
    with _Patch():
      cache_length_cost(qmodel, [int(n) for n in a.cache_lengths.split(",")], a.reps)
  if a.trace:
    with _Patch():
      run = _loop_runner(qmodel, prompt, a.new_tokens)
      run()
      with jax.profiler.trace(a.trace):
        run()
    op_breakdown(a.trace, a.new_tokens)


if __name__ == "__main__":
  main()
