"""Where a whole-model GPTQ run spends its time: a phase profile of the calibration engine.

  python experiments/profile_engine.py                      # reference model, 128 x 512 windows
  python experiments/profile_engine.py --windows 16 --seq-len 256
  python experiments/profile_engine.py --config sparsegpt_50
  python experiments/profile_engine.py --tiny               # tiny random model (tests, seconds)

1. The model is opened lazily as ``compressjax compress`` opens it
   (:func:`compressjax.io.open_model`, read block by block by the engine), the recipe is built
   from ``configs/<--config>.py`` (default ``gptq_w4g64``: 4-bit g64, act-order, static groups)
   by :func:`compressjax.pipeline.build_transform`, and the calibration windows are drawn with
   the standard protocol (:func:`compressjax.pipeline.calibration_windows_for`, ``../shared/data``
   or ``--data-dir``; default 128 x 512, the ``bench_peer`` setting).
2. :func:`compressjax.calibration.run_sequential` runs with an
   :class:`~compressjax.calibration.EngineProfile` (see :mod:`compressjax.engine_profile`): wall
   seconds, XLA compile seconds and FLOPs of every phase (read, transfer, embed, stats, solver,
   finetune, forward, save, outside), per block and in total. Profiling syncs at the end of
   every phase, so the run is a little slower than an unprofiled one.
3. The rate of a plain large float32 matmul (``--matmul-n``, default 2048^3; the median of
   ``--matmul-reps`` jitted calls after one compile) on the same machine is the yardstick (with
   ``--matmul-dtype bfloat16``: the run's bfloat16 matmuls, and a bfloat16 x bfloat16 -> float32
   yardstick; the float32 rate is recorded too):
   each phase's GFLOP/s is reported as a fraction of it.
4. One JSON record is appended to ``--results`` (default
   ``experiments/results/profile_engine.jsonl``; ``--tiny``: ``runs/profile_engine_tiny.jsonl``):
   ``method``, ``settings``, ``phases`` (per phase: ``s``, ``compile_s``, ``share``, ``gflop``,
   ``gflop_per_s``, ``gflop_per_s_compute``, ``fraction_of_matmul``), ``blocks`` (per block),
   ``compile_s``, ``compile_events``, ``overhead_s``, ``wall_s`` (the ``run_sequential`` call),
   ``gflop``, ``achieved_gflop_per_s`` and ``achieved_fraction`` (all counted FLOPs over
   ``wall_s``, against the matmul), ``matmul_gflop_per_s``, ``peer_wall_s`` /
   ``fraction_of_peer`` (the newest llm-compressor record of ``bench_peer.jsonl`` for the same
   method and windows, if any; ``None`` otherwise), ``bits_per_param``, ``ppl_wiki`` /
   ``ppl_austen`` (``None``: a profile evaluates nothing; quality is in ``bench_peer`` /
   ``bench_gptq``), ``peak_rss_mb``, ``date``, ``commit``, ``machine``, ``load_avg_1m``.

``--tiny``: the tiny random Llama of ``tests/tiny.py`` (2 blocks, width 64) with random token
windows (default 8 x 32), the same recipe; the reference model and the corpora are not read.
"""

import argparse
import datetime
import functools
import importlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from compressjax import accounting, calibration, pipeline  # pylint: disable=g-import-not-at-top
from compressjax.blocks import LlamaBlocks, to_abstract_tree  # pylint: disable=g-import-not-at-top

STANDARD_RESULTS = os.path.join(ROOT, "experiments", "results", "profile_engine.jsonl")
TINY_RESULTS = os.path.join(ROOT, "runs", "profile_engine_tiny.jsonl")
PEER_RESULTS = os.path.join(ROOT, "experiments", "results", "bench_peer.jsonl")
# Our config -> the bench_peer method name of the peer's run with the same settings.
PEER_METHODS = {"gptq_w4g64": "llm-compressor gptq w4g64 act-order",
                "sparsegpt_50": "llm-compressor sparsegpt 50%"}


def matmul_gflops(n: int, reps: int, dtype: str = "float32") -> float:
  """GFLOP/s of a jitted ``(n, n) @ (n, n)`` of ``dtype`` operands accumulated in float32: the
  median of ``reps`` calls."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, b))  # compile
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    ts.append(time.perf_counter() - t0)
  return 2.0 * n**3 / statistics.median(ts) / 1e9


def peer_wall_s(config: str, windows: int, seq_len: int, path: str = PEER_RESULTS,
                matmul_dtype: str = "float32"):
  """``(wall_s, date)`` of the newest peer record for ``config`` at these windows (and the
  peer's precision: ``bench_peer --precision``), or Nones."""
  name = PEER_METHODS.get(config)
  if name is not None and matmul_dtype != "float32":
    name += " bf16"
  if name is None or not os.path.isfile(path):
    return None, None
  best = None
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      r = json.loads(line)
      cal = r.get("calibration") or {}
      if (r.get("method") == name and cal.get("num_windows") == windows
          and cal.get("seq_len") == seq_len and (best is None or r["date"] > best["date"])):
        best = r
  return (None, None) if best is None else (best["wall_s"], best["date"])


def _tiny_setup(cfg, args):
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import tiny  # pylint: disable=g-import-not-at-top
  from compressjax.io import model_params  # pylint: disable=g-import-not-at-top

  model = tiny.tiny_model(seed=0)
  params = model_params(model)
  windows = np.random.default_rng(0).integers(
      0, model.cfg.vocab_size, (args.windows, args.seq_len)).astype(np.int32)
  return model.cfg, params, windows


def _reference_setup(cfg):
  from compressjax.io import open_model  # pylint: disable=g-import-not-at-top

  # Lazily, as the compress job does: the engine reads one block at a time.
  model_cfg, params, tok = open_model(cfg.model)
  windows = pipeline.calibration_windows_for(tok, cfg, model_cfg.max_position_embeddings)
  return model_cfg, params, windows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="gptq_w4g64", help="configs/<name>.py (a calibrated recipe)")
  ap.add_argument("--model", default=None, help="override the config's model")
  ap.add_argument("--windows", type=int, default=None, help="calibration windows (default 128; "
                  "8 with --tiny)")
  ap.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 512; "
                  "32 with --tiny)")
  ap.add_argument("--batch-size", type=int, default=None, help="windows per block-scan step "
                  "(default: the config's, 8; 4 with --tiny)")
  ap.add_argument("--data-dir", default="", help="corpora directory (default ../shared/data)")
  ap.add_argument("--matmul-n", type=int, default=None, help="size of the yardstick matmul "
                  "(default 2048; 256 with --tiny)")
  ap.add_argument("--matmul-reps", type=int, default=5)
  ap.add_argument("--tiny", action="store_true", help="tiny random model from tests (seconds)")
  ap.add_argument("--results", default=None, help="JSON-lines file to append the record to")
  ap.add_argument("--no-progress", action="store_true")
  ap.add_argument("--matmul-dtype", default="float32", choices=("float32", "bfloat16"),
                  help="calibration.matmul_dtype of the run (the yardstick matmul takes the same "
                       "operands)")
  args = ap.parse_args(argv)
  args.windows = args.windows or (8 if args.tiny else 128)
  args.seq_len = args.seq_len or (32 if args.tiny else 512)
  args.matmul_n = args.matmul_n or (256 if args.tiny else 2048)
  results = args.results or (TINY_RESULTS if args.tiny else STANDARD_RESULTS)

  cfg = importlib.import_module(f"configs.{args.config}").get_config()
  if not pipeline.needs_calibration(cfg.compression):
    raise SystemExit(f"--config {args.config}: {cfg.compression.get('method')!r} is data-free; "
                     "the engine profile needs a calibrated recipe")
  if args.model:
    cfg.model = args.model
  cfg.calibration.num_windows = args.windows
  cfg.calibration.seq_len = args.seq_len
  if args.batch_size:
    cfg.calibration.batch_size = args.batch_size
  elif args.tiny:
    cfg.calibration.batch_size = 4
  cfg.data.dir = args.data_dir
  cal = cfg.calibration

  t0 = time.perf_counter()
  if args.tiny:
    model_cfg, params, windows = _tiny_setup(cfg, args)
  else:
    model_cfg, params, windows = _reference_setup(cfg)
  setup_s = time.perf_counter() - t0
  transform = pipeline.build_transform(cfg.compression, model_cfg)
  block_ft = pipeline.block_finetune_from_config(cfg.compression)
  before = accounting.size_report(to_abstract_tree(params))
  profile = calibration.EngineProfile()
  new_params, _ = calibration.run_sequential(
      LlamaBlocks(model_cfg, params, dtype=jnp.float32), windows, transform,
      batch_size=cal.batch_size, mode=cal.mode, block_finetune=block_ft,
      recipe_key=json.dumps(pipeline._to_jsonable(cfg.compression.to_dict()), sort_keys=True),  # pylint: disable=protected-access
      progress=not args.no_progress, profile=profile,
      matmul_dtype=None if args.matmul_dtype == "float32" else args.matmul_dtype)
  new_params = jax.block_until_ready(new_params)
  after = accounting.size_report(new_params)
  mm = matmul_gflops(args.matmul_n, args.matmul_reps, args.matmul_dtype)
  mm_f32 = mm if args.matmul_dtype == "float32" else matmul_gflops(args.matmul_n,
                                                                   args.matmul_reps)

  phases = profile.summary(mm)
  counted = [v["gflop"] for v in phases.values() if v["gflop"] is not None]
  gflop = float(sum(counted))
  achieved = gflop / profile.wall_s if profile.wall_s else None
  peer_s, peer_date = (None, None) if args.tiny else peer_wall_s(args.config, args.windows,
                                                                 args.seq_len,
                                                                 matmul_dtype=args.matmul_dtype)
  record = {
      "method": cfg.compression.name,
      "settings": {"config": args.config, "model": "tiny" if args.tiny else cfg.model,
                   "windows": args.windows, "seq_len": args.seq_len,
                   "batch_size": cal.batch_size, "mode": cal.mode, "matmul_n": args.matmul_n,
                   "matmul_dtype": args.matmul_dtype,
                   "compression": pipeline._to_jsonable(cfg.compression.to_dict())},  # pylint: disable=protected-access
      "phases": phases,
      "blocks": profile.blocks,
      "compile_s": profile.total_compile_s(),
      "compile_events": profile.compile_events,
      "overhead_s": profile.overhead_s,
      "wall_s": profile.wall_s,
      "setup_s": setup_s,
      "gflop": gflop,
      "achieved_gflop_per_s": achieved,
      "matmul_gflop_per_s": mm,
      "matmul_float32_gflop_per_s": mm_f32,
      "achieved_fraction": achieved / mm if achieved is not None else None,
      "peer_wall_s": peer_s,
      "peer_date": peer_date,
      "fraction_of_peer": profile.wall_s / peer_s if peer_s else None,
      "bits_per_param": 8 * after["linear_bytes"] / before["linear_params"],
      "ppl_wiki": None,  # a profile evaluates nothing (quality: bench_peer / bench_gptq)
      "ppl_austen": None,
      "evaluation": "none: a profile of the calibration engine, no perplexity is measured",
      # profiling resets the kernel's high-water mark per phase: the profile keeps the maximum
      "peak_rss_mb": max(pipeline.peak_rss_mb(), profile.peak_rss_total_mb or 0.0),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": pipeline.git_commit(),
      "machine": pipeline.machine_info(),
      "load_avg_1m": os.getloadavg()[0],
  }
  pipeline.append_record(results, record)
  rows = [[ph, v["s"], v["compile_s"], v["share"], v["gflop_per_s_compute"],
           v["fraction_of_matmul"], v["peak_rss_mb"]] for ph, v in phases.items() if v["s"] > 0]
  print()
  print(pipeline.format_table(["phase", "s", "compile s", "share", "GFLOP/s (compute)",
                               "of matmul", "peak RSS MiB"],
                              [[("-" if c is None else c) for c in r] for r in rows]))
  print(f"run_sequential {profile.wall_s:.2f} s (compile {record['compile_s']:.2f} s, profile "
        f"overhead {profile.overhead_s:.2f} s); {gflop:.2f} GFLOP counted, "
        f"{achieved or 0:.3g} GFLOP/s = {record['achieved_fraction'] or 0:.3g} of the "
        f"{args.matmul_n}^3 {args.matmul_dtype} matmul's {mm:.3g} GFLOP/s (float32: {mm_f32:.3g})"
        + (f"; {record['fraction_of_peer']:.2f} of the peer's {peer_s:.0f} s" if peer_s else ""))
  print(f"appended to {results}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
