"""Times every registered matmul implementation of packed formats against the dense matmul.

For each format (RTN-style 4-bit g64, 3-bit g64, 2-bit g64 codes, AQLM 2x8, E8P; random weights),
each implementation registered for it (``formats.dispatch.implementations``: ``"xla"`` and any
kernel registered later, e.g. ``"pallas"``), each shape and row count: the median time of a
jitted ``formats.dot`` against the dense ``bfloat16`` and ``float32`` matmul in the same run, the
achieved bytes/s of the weight read (``nbytes / time``) and its fraction of ``--bandwidth``
(default: measured by a large copy-like ``jnp`` op). One JSON line per measurement in
``experiments/results/bench_kernels.jsonl``.

Usage: ``python experiments/bench_kernels.py --shapes 576x1536,1536x576 --rows 1,8``.

``--decode``: end-to-end decode tokens/s at batch 1 through the KV cache
(:func:`compressjax.generate.generate`, greedy, after compiling) of the reference model in float32
(``decode_dense_f32``) against its RTN 4-bit g64 (``decode_rtn4_g64``) and 2-bit g64
(``decode_rtn2_g64``) compressions of every ``*_proj`` kernel, and a random 2x8 AQLM codebook
leaf of the same shapes (``decode_aqlm2x8_random``, speed only). Tokens/s is ``new_tokens``
over the median time of ``--reps`` generate calls (a 16-token prompt's prefill included, as the
issue's baseline), interleaved over the methods. Usage: ``python experiments/bench_kernels.py --decode``.

The C++ CPU kernel (``compressjax.kernels.cpu``, implementation ``"cpu"``): in the per-layer table
it is timed with float32 activations (it takes no other) at rows <= ``cpu.MAX_ROWS``, as
``"cpu"`` (the default: XLA's intra-op pool; before 2026-12-07 09:00 one thread, the pool then named ``"cpu_allthreads"``) and ``"cpu_1thread"``; ``--decode`` runs every RTN method
twice, ``decode_rtn4_g64`` (every layer forced to the XLA path, ``matmul_implementation="xla"``)
and ``decode_rtn4_g64_cpukernel`` (``matmul_implementation="cpu"``), likewise for 2 bits.
Usage: ``python experiments/bench_kernels.py --decode --methods
dense_f32,rtn4_g64,rtn4_g64_cpukernel,rtn2_g64,rtn2_g64_cpukernel`` and
``python experiments/bench_kernels.py --shapes 576x576,576x1536,1536x576 --rows 1,8``.

Quantized LM head (``compressjax.head.untie_head``): ``decode_rtn4_g64_cpukernel_qhead`` is
``rtn4_g64_cpukernel`` with the tied float32 head ``h @ E.T`` replaced by an untied RTN 4-bit g64
head (``lm_head/kernel = E.T`` quantized; the embedding lookup stays float32), run by the same
CPU kernel (K = hidden, N = vocab); ``_qhead8`` gives the head 8 bits (g64), and
``decode_rtn2_g64_cpukernel_qhead4`` is the 2-bit model with a 4-bit g64 head (a 2-bit head
hurts quality more than 2-bit linears do: the README reports the tiny-model effect). Records
carry ``settings.lm_head_bits``. Usage: ``python experiments/bench_kernels.py --decode --methods
dense_f32,rtn4_g64_cpukernel,rtn4_g64_cpukernel_qhead,rtn2_g64_cpukernel,rtn2_g64_cpukernel_qhead4``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from compressjax import formats  # pylint: disable=g-import-not-at-top
from compressjax.kernels import cpu as cpu_kernel  # pylint: disable=g-import-not-at-top

SHAPES = ("576x576", "576x192", "576x1536", "1536x576", "4096x4096", "4096x11008", "11008x4096",
          "8192x28672")


def _median_time(fn, *args, reps=7):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def measure_bandwidth(nbytes=1 << 28):
  """Bytes/s of ``y = x + 1`` over a ``nbytes`` float32 array (reads and writes ``nbytes``)."""
  x = jnp.zeros((nbytes // 4,), jnp.float32)
  t = _median_time(jax.jit(lambda x: x + 1), x, reps=5)
  return 2 * nbytes / t


def make_leaves(k, n, seed=0):
  rng = np.random.default_rng(seed)
  f16 = lambda *s: jnp.asarray(rng.random(s).astype(np.float16) + 0.5)
  q = lambda bits: formats.QuantizedArray.from_codes(
      jnp.asarray(rng.integers(0, 2**bits, (k, n)).astype(np.uint8)), f16(k // 64, n), None,
      bits=bits, group_size=64, symmetric=True, dtype=jnp.bfloat16)
  out = {"rtn4_g64": q(4), "rtn3_g64": q(3), "rtn2_g64": q(2)}
  if k % 8 == 0:
    out["aqlm_2x8"] = formats.AdditiveCodebookArray.from_codes(
        jnp.asarray(rng.integers(0, 256, (k // 8, n, 2)).astype(np.uint8)),
        jnp.asarray(rng.standard_normal((2, 256, 8)).astype(np.float16)), f16(n), nbits=8,
        dtype=jnp.bfloat16)
    out["e8p"] = formats.E8PArray(
        jnp.asarray(rng.integers(0, 2**16, (k // 8, n)).astype(np.uint16)),
        jnp.asarray(0.5, jnp.float32), dtype=jnp.bfloat16)
  return out


def git_commit():
  try:
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def run(shapes, rows_list, bandwidth, out_path, reps=7, with_interpret=False):
  device = str(jax.devices()[0].device_kind)
  machine = f"{platform.node()}; {platform.processor() or platform.machine()}; jax {jax.__version__}"
  commit, date = git_commit(), datetime.datetime.now(datetime.timezone.utc).isoformat()
  records = []
  for shape in shapes:
    k, n = (int(d) for d in shape.split("x"))
    rng = np.random.default_rng(1)
    wd = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
    leaves = make_leaves(k, n)
    for rows in rows_list:
      x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32)).astype(jnp.bfloat16)
      mm = jax.jit(jnp.matmul)
      dense_bf16 = _median_time(mm, x, wd.astype(jnp.bfloat16), reps=reps)
      dense_f32 = _median_time(mm, x.astype(jnp.float32), wd, reps=reps)
      for name, w in leaves.items():
        runs = []
        for impl in formats.implementations(type(w)):
          if impl.name.endswith("_interpret") and not with_interpret:
            continue  # the Pallas interpreter: a correctness tool, not a speed path
          if impl.name == "cpu":  # the C++ kernel: float32 activations only
            if rows > cpu_kernel.MAX_ROWS:
              continue
            xf = x.astype(jnp.float32)
            # "cpu": the dispatched kernel at its default threads (the pool since 2026-12-07
            # 09:00; records before: one thread, and the pool was "cpu_allthreads")
            runs.append(("cpu", lambda x, w: formats.dot(x, w, implementation="cpu"), xf))
            runs.append(("cpu_1thread", lambda x, w: cpu_kernel.quant_gemv(x, w, threads=1), xf))
            continue
          runs.append((impl.name,
                       lambda x, w, _n=impl.name: formats.dot(x, w, implementation=_n), x))
        for impl_name, f, xin in runs:
          fn = jax.jit(f)
          try:
            t = _median_time(fn, xin, w, reps=reps)
          except NotImplementedError as e:
            print(f"skip {name} {impl_name} {shape} rows={rows}: {e}")
            continue
          rec = dict(method=name, settings={"implementation": impl_name,
                                            "dtype": str(xin.dtype),
                                            "weight_nbytes": int(w.nbytes),
                                            "dense_f32_time_s": dense_f32},
                     shape=shape, rows=rows, time_s=t, dense_time_s=dense_bf16,
                     speedup=dense_bf16 / t, bytes_per_s=w.nbytes / t,
                     bw_fraction=w.nbytes / t / bandwidth, device=device, date=date,
                     commit=commit, machine=machine)
          records.append(rec)
          print(f"{name:10s} {impl_name:11s} {shape:>11s} rows={rows:4d} {t * 1e3:8.3f} ms  "
                f"bf16 {dense_bf16 * 1e3:8.3f} ms  f32 {dense_f32 * 1e3:8.3f} ms  "
                f"x{rec['speedup']:.2f}  {rec['bw_fraction']:.1%} of bw", flush=True)
  if out_path:
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  return records


DECODE_METHODS = ("dense_f32", "rtn4_g64", "rtn4_g64_cpukernel", "rtn2_g64", "rtn2_g64_cpukernel",
                  "aqlm2x8_random", "rtn4_g64_cpukernel_qhead", "rtn4_g64_cpukernel_qhead8",
                  "rtn2_g64_cpukernel_qhead4")


def head_bits(method):
  """Bits of the untied RTN g64 LM head of a ``*_qhead[B]`` method (``B``, or the linears' bits
  when absent: ``rtn4_g64_cpukernel_qhead`` is a 4-bit head), ``None`` for a tied dense head."""
  if "_qhead" not in method:
    return None
  tail = method.rsplit("_qhead", 1)[1]
  return int(tail) if tail else int(method[3])


def decode_implementation(method):
  """The model-wide ``matmul_implementation`` of a decode method: ``"cpu"`` for ``*_cpukernel``,
  ``"xla"`` for the other RTN methods (so they measure the XLA path, not the kernel that
  ``formats.dot`` picks on CPU by default), ``None`` (automatic) otherwise."""
  if method.endswith("_cpukernel") or "_cpukernel_" in method:
    return "cpu"
  return "xla" if method.startswith("rtn") else None


def decode_params(params, method, seed=0):
  """``params`` with every ``*_proj`` kernel compressed by ``method`` (``DECODE_METHODS``); a
  ``*_qhead*`` method also compresses ``lm_head/kernel`` (RTN g64 at :func:`head_bits`), so
  ``params`` must then be untied (:func:`decode_setup` does both)."""
  from compressjax import transforms as T  # pylint: disable=g-import-not-at-top
  if method == "dense_f32":
    return params
  if method.startswith("rtn"):
    bits = int(method[3])  # "rtn4_g64" and "rtn4_g64_cpukernel" compress alike
    rules = [(r".*_proj/kernel", T.rtn(bits=bits, group_size=64))]
    if head_bits(method) is not None:
      if params.get("lm_head") is None:
        raise ValueError(f"decode method {method!r} compresses lm_head/kernel: untie the head "
                         "first (compressjax.head.untie_head, or use decode_setup)")
      rules.append(("lm_head/kernel", T.rtn(bits=head_bits(method), group_size=64)))
    return T.apply(T.select(*rules), params)[0]
  if method == "aqlm2x8_random":
    rng = np.random.default_rng(seed)

    def leaf(w):
      k, n = w.shape
      return formats.AdditiveCodebookArray.from_codes(
          jnp.asarray(rng.integers(0, 256, (k // 8, n, 2)).astype(np.uint8)),
          jnp.asarray(0.01 * rng.standard_normal((2, 256, 8)).astype(np.float16)),
          jnp.asarray(np.ones(n, np.float16)), nbits=8, dtype=jnp.float32)

    def walk(tree, path=""):
      if isinstance(tree, dict):
        return {k: walk(v, f"{path}/{k}") for k, v in tree.items()}
      return leaf(tree) if path.endswith("_proj/kernel") else tree

    return walk(params)
  raise ValueError(f"method must be one of {DECODE_METHODS}, got {method!r}")


def decode_setup(cfg, params, method):
  """``(model config, params)`` of a decode method: :func:`decode_params`, after untying the head
  for ``*_qhead*`` methods, with the method's ``matmul_implementation``."""
  from compressjax import head  # pylint: disable=g-import-not-at-top
  if head_bits(method) is not None:
    cfg, params = head.untie_head(cfg, params)
  p = decode_params(params, method)
  return dataclasses.replace(cfg, matmul_implementation=decode_implementation(method)), p


def run_decode(cfg, params, methods=DECODE_METHODS, new_tokens=64, prompt_len=16, reps=3,
               out_path=None, model_name="smollm2-135m-instruct"):
  """Decode tokens/s (batch 1, KV cache) of each method; JSON-lines records (see module doc)."""
  from compressjax import generate as G  # pylint: disable=g-import-not-at-top
  from compressjax.io import build_model  # pylint: disable=g-import-not-at-top
  device = str(jax.devices()[0].device_kind)
  machine = f"{platform.node()}; {platform.processor() or platform.machine()}; jax {jax.__version__}"
  commit, date = git_commit(), datetime.datetime.now(datetime.timezone.utc).isoformat()
  prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (prompt_len,)).astype(np.int32)
  models = {}
  for m in methods:
    mcfg, p = decode_setup(cfg, params, m)
    models[m] = (build_model(mcfg, p), formats.tree_nbytes(p))
    G.generate(models[m][0], prompt, new_tokens)  # compile prefill and decode step
  times = {m: [] for m in methods}
  for _ in range(reps):
    for m in methods:
      t = time.perf_counter()
      G.generate(models[m][0], prompt, new_tokens)
      times[m].append(time.perf_counter() - t)
  med = {k: float(np.median(v)) for k, v in times.items()}
  dense_tps = None
  records = []
  for m in methods:
    step = med[m] / new_tokens
    tps = 1.0 / step
    if m == "dense_f32":
      dense_tps = tps
    threads = cpu_kernel.default_threads() if decode_implementation(m) == "cpu" else None
    suffix = "" if threads in (None, cpu_kernel.DEFAULT_THREADS) else f"_threads{threads}"
    rec = dict(method=f"decode_{m}{suffix}",
               settings={"model": model_name, "batch": 1, "prompt_len": prompt_len,
                         "new_tokens": new_tokens, "reps": reps, "kv_cache": True,
                         "params_nbytes": int(models[m][1]),
                         "matmul_implementation": decode_implementation(m),
                         "lm_head_bits": head_bits(m),
                         "cpu_kernel_threads": threads,
                         "generate_s": med[m],
                         "load_avg_1m": os.getloadavg()[0]},
               shape="model", rows=1, time_s=step, tokens_per_s=tps,
               dense_time_s=None if dense_tps is None else 1.0 / dense_tps,
               speedup=None if dense_tps is None else tps / dense_tps,
               bytes_per_s=models[m][1] / step, bw_fraction=None, device=device, date=date,
               commit=commit, machine=machine)
    records.append(rec)
    print(f"decode {m:26s} {tps:8.2f} tok/s  ({models[m][1] / 1e6:.1f} MB params)"
          + ("" if rec["speedup"] is None else f"  x{rec['speedup']:.2f} vs dense f32"),
          flush=True)
  if out_path:
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  return records


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated KxN list")
  p.add_argument("--rows", default="1,8,32,128")
  p.add_argument("--bandwidth", type=float, default=None,
                 help="device memory bandwidth in bytes/s (default: measured)")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--out", default=os.path.join(ROOT, "experiments/results/bench_kernels.jsonl"),
                 help="JSON-lines file to append to ('' to not write)")
  p.add_argument("--decode", action="store_true",
                 help="end-to-end decode tokens/s of the reference model (see module doc)")
  p.add_argument("--model", default="smollm2-135m-instruct", help="for --decode")
  p.add_argument("--methods", default=",".join(DECODE_METHODS), help="for --decode")
  p.add_argument("--new-tokens", type=int, default=64, help="for --decode")
  p.add_argument("--with-interpret", action="store_true",
                 help="also time the Pallas interpreter implementations (slow; off by default)")
  a = p.parse_args(argv)
  if a.decode:
    from compressjax.io import open_model  # pylint: disable=g-import-not-at-top
    cfg, params, _ = open_model(a.model, lazy=False)
    run_decode(cfg, params, a.methods.split(","), new_tokens=a.new_tokens, reps=a.reps,
               out_path=a.out, model_name=a.model)
    return
  bw = a.bandwidth or measure_bandwidth()
  print(f"bandwidth {bw / 1e9:.1f} GB/s ({'given' if a.bandwidth else 'measured'})")
  run(a.shapes.split(","), [int(r) for r in a.rows.split(",")], bw, a.out, reps=a.reps,
      with_interpret=a.with_interpret)


if __name__ == "__main__":
  main()
