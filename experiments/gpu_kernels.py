"""One-call GPU benchmark of the compressed matmuls: Pallas kernels vs the XLA path vs dense bf16.

Random weights of the real layer shapes (SmolLM2-135M reference model, Llama-2-7B, Llama-2-70B)
are made on the device (no files, no network). For every (format, shape, rows) it

* checks the kernel against its pure-jnp reference (max error relative to max |y|);
* times every registered implementation that applies (``"pallas"``, ``"xla"``) and the dense
  bf16 matmul of the same shape in the same run (median of ``--iters`` after compiling);
* reports bytes moved (packed weight + activations + output) per second and its fraction of
  the device's HBM bandwidth (table below, by ``device_kind``), and the speed-up over bf16.

Each result is one JSON line in ``$OUT/gpu_kernels.jsonl`` (and on stdout); a case that fails
is a line with ``"error"``, the run goes on. ``--budget_s`` stops starting new cases in time.

Usage (GPU machine, JAX 0.11 + CUDA): ``bash experiments/gpu_kernels.sh``;
on CPU, ``--smoke`` runs tiny shapes through ``"pallas_interpret"`` to check the script.

References:
  Frantar et al., "MARLIN", arXiv:2408.11743 (fraction of memory bandwidth at batch 1);
  JAX ``pallas/ops/gpu/hopper_mixed_type_matmul_mgpu.py`` (``main()`` sweeps, checks, reports).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from compressjax import formats  # pylint: disable=g-import-not-at-top,wrong-import-position
import pallas_kernels as pk  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

#: Peak HBM bandwidth in bytes/s by (substring of) device_kind; the first match wins.
HBM_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12),
                 ("L4", 0.3e12), ("v5e", 0.82e12), ("v5p", 2.76e12), ("v6", 1.64e12))

#: (K, N) = (in, out) layer shapes.
SHAPES = {
    "smollm2_qkv": (576, 576), "smollm2_up": (576, 1536), "smollm2_down": (1536, 576),
    "7b_qkvo": (4096, 4096), "7b_up": (4096, 11008), "7b_down": (11008, 4096),
    "70b_up": (8192, 28672), "70b_down": (28672, 8192),
}

#: name -> (kernel, constructor(key, k, n)).
FORMATS = ("q4g128", "q4g128_asym", "q3g128", "q2g64", "q8g128", "aqlm2x8", "aqlm1x16", "e8p",
           "q2g128_asym", "q3g64_asym", "q8g64_asym")


def make_weight(name: str, key, k: int, n: int):
  """A random compressed ``(K, N)`` weight of format ``name`` (bf16 logical dtype)."""
  k1, k2, k3 = jax.random.split(key, 3)
  if name.startswith("q"):
    bits = int(name[1])
    gs = int(name[3:].split("_")[0])
    symmetric = not name.endswith("_asym")
    codes = jax.random.randint(k1, (k, n), 0, 2**bits, jnp.int32)
    scale = jax.random.uniform(k2, (k // gs, n), jnp.float16, 0.001, 0.01)
    zero = None if symmetric else -scale * 2**(bits - 1)
    return formats.QuantizedArray.from_codes(codes, scale, zero, bits=bits, group_size=gs,
                                             symmetric=symmetric, dtype=jnp.bfloat16)
  if name.startswith("aqlm"):
    m, nbits = (2, 8) if name == "aqlm2x8" else (1, 16)
    codes = jax.random.randint(k1, (k // 8, n, m), 0, 2**nbits, jnp.int32)
    cb = (jax.random.normal(k2, (m, 2**nbits, 8)) * 0.01).astype(jnp.float16)
    scales = jax.random.uniform(k3, (n,), jnp.float16, 0.5, 1.5)
    return formats.AdditiveCodebookArray.from_codes(codes, cb, scales, nbits=nbits,
                                                    dtype=jnp.bfloat16)
  if name == "e8p":
    codes = jax.random.randint(k1, (k // 8, n), 0, 2**16, jnp.int32).astype(jnp.uint16)
    return formats.E8PArray(codes, jnp.asarray(0.003, jnp.float32), dtype=jnp.bfloat16)
  raise ValueError(f"unknown format {name!r}; known: {FORMATS}")


REFERENCE = {formats.QuantizedArray: pk.quant_matmul_ref,
             formats.AdditiveCodebookArray: pk.aqlm_matmul_ref, formats.E8PArray: pk.e8p_matmul_ref}


def bench(fn, *args, iters: int) -> float:
  """Median seconds per call of the jitted ``fn`` after compiling."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bandwidth() -> tuple[str, float | None]:
  kind = jax.devices()[0].device_kind
  for sub, bw in HBM_BANDWIDTH:
    if sub.lower() in kind.lower():
      return kind, bw
  return kind, None


def _impl_names(w) -> set[str]:
  return {impl.name for impl in formats.dispatch.implementations(type(w))}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--formats", default=",".join(FORMATS))
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--rows", default="1,8,32,128")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--budget_s", type=float, default=480.0)
  p.add_argument("--sweep", action="store_true",
                 help="also sweep block configs of q4g128 on 7b_up at 1 row")
  p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU check)")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  a = p.parse_args(argv)
  t0 = time.time()
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "gpu_kernels.jsonl")
  kernel_impl = "pallas_interpret" if a.smoke else "pallas"
  shapes = {"smoke": (256, 160)} if a.smoke else {s: SHAPES[s] for s in a.shapes.split(",")}
  rows_list = [int(r) for r in a.rows.split(",")]
  kind, bw = bandwidth()
  header = dict(event="device", device_kind=kind, backend=jax.default_backend(),
                jax=jax.__version__, hbm_bytes_per_s=bw, kernel_impl=kernel_impl,
                configs={t: dataclasses.asdict(c) for t, c in _common.CONFIGS.items()})
  out = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def emit(rec):
    line = json.dumps(rec, sort_keys=True)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()

  emit(header)
  key = jax.random.PRNGKey(0)
  dense_w, comp_w = {}, {}
  # Rows outermost: every shape at 1 row (the decode case the issue asks about) comes first.
  for rows in rows_list:
    for sname, (k, n) in shapes.items():
      if sname not in dense_w:
        dense_w[sname] = (jax.random.normal(key, (k, n)) * 0.01).astype(jnp.bfloat16)
      dense = dense_w[sname]
      x = jax.random.normal(jax.random.fold_in(key, rows), (rows, k), jnp.bfloat16)
      try:
        t_dense = bench(jax.jit(jnp.matmul), x, dense, iters=a.iters)
      except Exception as e:  # pylint: disable=broad-except
        emit(dict(event="error", shape=sname, rows=rows, impl="dense_bf16", error=repr(e)[:500]))
        continue
      dense_bytes = 2 * (k * n + rows * k + rows * n)
      emit(dict(event="result", shape=sname, K=k, N=n, rows=rows, format="dense_bf16",
                impl="xla", ms=1e3 * t_dense, bytes=dense_bytes,
                bw_frac=None if bw is None else dense_bytes / t_dense / bw))
      for fi, fname in enumerate(a.formats.split(",")):
        if time.time() - t0 > a.budget_s:
          emit(dict(event="budget_exhausted", elapsed_s=time.time() - t0))
          return 0
        try:
          if (sname, fname) not in comp_w:
            comp_w[(sname, fname)] = make_weight(fname, jax.random.fold_in(key, fi), k, n)
          w = comp_w[(sname, fname)]
        except Exception as e:  # pylint: disable=broad-except
          emit(dict(event="error", shape=sname, format=fname, stage="make", error=repr(e)[:500]))
          continue
        wbytes = w.nbytes + 2 * (rows * k + rows * n)
        ref = jax.jit(REFERENCE[type(w)])(x, w).astype(jnp.float32)
        scale = float(jnp.max(jnp.abs(ref))) or 1.0
        impls = (kernel_impl, "xla")
        # The Mosaic GPU (Hopper) 2/3/4/8-bit kernel, as rows of its own (kind "mgpu"); a
        # packed format it does not support gets a row saying so (e.g. 3 bits at K = 11008).
        if not a.smoke and "pallas_mgpu" in _impl_names(w):
          if pk.quant_matmul_mgpu.supports(x, w):
            impls += ("pallas_mgpu",)
          else:
            emit(dict(event="result", shape=sname, K=k, N=n, rows=rows, format=fname,
                      impl="pallas_mgpu", kind="mgpu", skipped="quant_matmul_mgpu.supports "
                      "is False (falls back to xla)"))
        for impl in impls:
          rec = dict(event="result", shape=sname, K=k, N=n, rows=rows, format=fname, impl=impl,
                     bits_per_param=w.bits_per_param, bytes=wbytes)
          if impl == "pallas_mgpu":
            rec["kind"] = "mgpu"
          try:
            f = jax.jit(lambda x, w, impl=impl: formats.dot(x, w, implementation=impl))
            y = f(x, w).astype(jnp.float32)
            rec["max_rel_err"] = float(jnp.max(jnp.abs(y - ref))) / scale
            t = bench(f, x, w, iters=a.iters)
            rec.update(ms=1e3 * t, speedup_vs_bf16=t_dense / t,
                       bw_frac=None if bw is None else wbytes / t / bw)
          except Exception as e:  # pylint: disable=broad-except
            rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
          emit(rec)
  if a.sweep and not a.smoke:
    k, n = SHAPES["7b_up"]
    w = make_weight("q4g128", key, k, n)
    for rows in (1,):
      x = jax.random.normal(key, (rows, k), jnp.bfloat16)
      for bn in (64, 128, 256):
        for bk in (256, 1024):
          for warps in (4, 8):
            if time.time() - t0 > a.budget_s:
              emit(dict(event="budget_exhausted", elapsed_s=time.time() - t0))
              return 0
            cfg = _common.KernelConfig(block_m=64, block_n=bn, block_k=bk, use_dot=None,
                                       num_warps=warps)
            rec = dict(event="sweep", rows=rows, config=dataclasses.asdict(cfg))
            try:
              f = jax.jit(lambda x, w, cfg=cfg: pk.quant_matmul(x, w, config=cfg))
              t = bench(f, x, w, iters=a.iters)
              rec.update(ms=1e3 * t, bw_frac=None if bw is None else
                         (w.nbytes + 2 * rows * (k + n)) / t / bw)
            except Exception as e:  # pylint: disable=broad-except
              rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            emit(rec)
  emit(dict(event="done", elapsed_s=time.time() - t0))
  return 0


if __name__ == "__main__":
  sys.exit(main())
