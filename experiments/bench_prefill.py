"""Prefill/decode speed of the tiled XLA matmul against decode-then-matmul (issue 16 item 1).

For each shape, format (RTN 4-bit g64, 3-bit g64, 2-bit g64; random codes, float32 weights and
activations as the evaluation runs them) and row count, interleaves in one loop (so load on the
shared host hits all alike) and reports medians of:

* ``old``: ``x @ w.materialize()`` (the product before the tiled path: the dense weight is built);
* ``dense``: ``x @ W`` with a float32 ``W`` already dense (the uncompressed model);
* ``tile=T``: :func:`compressjax.formats.tiled.tiled_dot` with ``T`` rows per tile, for the
  candidates given (``auto`` = the tile :func:`compressjax.formats.dot` picks now).

One JSON line per (shape, format, rows) to stdout (``--out`` appends to a file).

``--eval``: perplexity-evaluation time (``compressjax.evaluate.perplexity``, 8 windows of 512
tokens in one batch, i.e. 4096-row products) of a reference-shaped Llama (576 hidden, 1536 MLP,
``--layers`` layers, random weights) with RTN 4-bit g64 ``*_proj`` kernels, interleaved medians
for: ``tiled`` (every row count through the K-tile loop, as before this change), ``now`` (the
default: one whole-K tile from ``K / 4`` rows on) and ``materialize`` (decode then matmul always).

Usage: ``python experiments/bench_prefill.py --shapes 576x1536 --rows 1,16,512,4096``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from compressjax import formats  # pylint: disable=g-import-not-at-top
from compressjax.formats import tiled  # pylint: disable=g-import-not-at-top


def leaf(k, n, bits, seed=0):
  rng = np.random.default_rng(seed)
  return formats.QuantizedArray.from_codes(
      jnp.asarray(rng.integers(0, 2**bits, (k, n)).astype(np.uint8)),
      jnp.asarray(rng.random((k // 64, n)).astype(np.float16) + 0.5), None, bits=bits,
      group_size=64, symmetric=True, dtype=jnp.float32)


def bench(k, n, bits, rows, tiles, reps):
  w = leaf(k, n, bits)
  dense = w.materialize()
  x = jnp.asarray(np.random.default_rng(1).standard_normal((rows, k)), jnp.float32)
  fns = {"old": (jax.jit(lambda x, w: x @ w.materialize()), w),
         "dense": (jax.jit(lambda x, d: x @ d), dense)}
  align = tiled.row_alignment(w)
  for t in tiles:
    if t == "auto":
      fns["auto"] = (jax.jit(formats.dot), w)
      continue
    t = int(t) if t.isdigit() else int(eval(t.replace("K", str(k))))  # pylint: disable=eval-used
    t = max(align, t // align * align)
    if t < k:
      fns[f"tile={t}"] = (jax.jit(lambda x, w, t=t: tiled.tiled_dot(x, w, tile=t)), w)
  times = {name: [] for name in fns}
  temps = {}
  jax.clear_caches()  # traces read tiled's module constants: do not reuse earlier ones
  for name, (f, a) in fns.items():
    jax.block_until_ready(f(x, a))
    temps[name] = f.lower(x, a).compile().memory_analysis().temp_size_in_bytes
  for _ in range(reps):
    for name, (f, a) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(x, a))
      times[name].append(time.perf_counter() - t0)
  med = {name: float(np.median(v)) for name, v in times.items()}
  return {"shape": f"{k}x{n}", "bits": bits, "rows": rows, "reps": reps,
          "ms": {n_: round(1e3 * v, 3) for n_, v in med.items()},
          "temp_bytes": temps, "dense_bytes": 4 * k * n}


def eval_timing(layers=2, reps=3, seq=512, batch=8):
  from compressjax import evaluate, transforms as T  # pylint: disable=g-import-not-at-top
  from compressjax.io import build_model, model_params  # pylint: disable=g-import-not-at-top
  from compressjax.model import Llama, LlamaConfig  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  cfg = LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_layers=layers,
                    num_heads=9, num_kv_heads=3, rope_theta=10000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=seq, bos_token_id=1, eos_token_id=2)
  params = model_params(Llama(cfg, rngs=nnx.Rngs(0)))
  q = T.apply(T.select((r".*_proj/kernel", T.rtn(bits=4, group_size=64))), params)[0]
  model = build_model(cfg, q)
  windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq))
  settings = {"tiled": float("inf"), "now": tiled.WHOLE_K_ROWS_RATIO, "materialize": 0.0}
  default = tiled.WHOLE_K_ROWS_RATIO
  walls = {k: [] for k in settings}
  ppl = {}
  try:
    names = list(settings)
    for rep in range(reps):
      for name in names[rep % 3:] + names[:rep % 3]:  # rotate the order: no position bias
        ratio = settings[name]
        tiled.WHOLE_K_ROWS_RATIO = ratio
        jax.clear_caches()  # the ratio is read when tracing: never reuse another setting's trace
        r = evaluate.perplexity(model, windows, batch_size=batch, progress=False)
        walls[name].append(r["wall_s"])
        ppl[name] = r["ppl"]
  finally:
    tiled.WHOLE_K_ROWS_RATIO = default
  rec = {"eval": f"{layers}-layer 576/1536 RTN 4-bit g64, {batch}x{seq} tokens",
         "wall_s": {k: round(float(np.median(v)), 3) for k, v in walls.items()}, "ppl": ppl,
         "reps": reps, "load_avg_1m": os.getloadavg()[0]}
  return rec


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="576x1536,1536x576,576x576")
  p.add_argument("--bits", default="4,3,2")
  p.add_argument("--rows", default="1,16,512,4096")
  p.add_argument("--tiles", default="auto,K/4,K/2", help="candidates: auto, ints, K/2 ...")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--out", default=None)
  p.add_argument("--eval", action="store_true", help="perplexity-evaluation timing (see doc)")
  p.add_argument("--layers", type=int, default=2, help="for --eval")
  a = p.parse_args(argv)
  if a.eval:
    print(json.dumps(eval_timing(a.layers, a.reps)), flush=True)
    return
  for shape in a.shapes.split(","):
    k, n = (int(s) for s in shape.split("x"))
    for bits in (int(b) for b in a.bits.split(",")):
      for rows in (int(r) for r in a.rows.split(",")):
        rec = bench(k, n, bits, rows, a.tiles.split(","), a.reps if rows < 4096 else max(3, a.reps // 2))
        line = json.dumps(rec)
        print(line, flush=True)
        if a.out:
          with open(a.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


if __name__ == "__main__":
  main()
