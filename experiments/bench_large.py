"""Compress a randomly initialised 1.3B-parameter Llama from disk, killed midway and resumed.

  python experiments/bench_large.py                  # the real run (about 5.1 GB of float32)
  python experiments/bench_large.py --tiny           # seconds: a tiny shape (tests, CI)
  python experiments/bench_large.py --layers 8 --hidden 512 --intermediate 1408 --heads 8 \\
      --kv-heads 2                                   # a small shape, to see the trends

1. A randomly initialised Llama (std 0.02 linear and embedding weights, unit norm scales, an
   untied head; vocab 49152 with the reference model's tokenizer so the protocol's windows
   tokenize) is written as a Hugging Face directory of sharded safetensors + config.json
   (``--work/model``), shard by shard: each tensor is generated from its own seed when its
   shard is written (``io.save_hf`` over :class:`compressjax.blocks.LazyTensor` leaves), so
   the writer holds one shard, never the model. Default shape: hidden 2048, intermediate 5632,
   24 layers, 32 heads, 8 KV heads: 1,283,557,376 parameters, 5.13 GB in float32. Kept for
   the next run (``--regenerate`` rewrites it).
2. ``compressjax compress`` (``configs/gptq_w4g64.py``: GPTQ 4-bit g64, act-order, static
   groups) runs in a subprocess with ``calibration.resume_dir``, on ``--windows`` x ``--seq-len``
   calibration windows, evaluating ``--eval-windows`` window(s) per corpus (a random model's
   perplexity means nothing; the number only shows the compressed model runs). Its resident
   memory (``/proc/PID/status`` VmRSS, VmHWM) is sampled every 0.2 s together with the resume
   directory's ``latest`` manifest (``next_block``: when each block finished). It is SIGKILLed
   once ``--kill-after`` blocks are finished (default: half): the job stops itself right after
   writing that resume point (``experiments/_stop_at_block.py``), so the kill lands there however
   short the blocks are; then it is started again (it resumes from the last written block) and
   left to finish.
3. Unless ``--no-reference``: the same job, never killed (its own resume directory, so its
   blocks are timed the same way), into another output directory; the two checkpoints are
   compared array by array (``bench_resume.checkpoints_identical``).
4. One JSON record goes to ``--results`` (default ``experiments/results/bench_large.jsonl``):
   the model's parameters and file bytes, per-block seconds, RSS at the end of each block and
   the peak RSS within each block, its slope over the blocks against the compressed bytes the
   engine keeps per finished block, peak RSS of the killed attempt, the resumed attempt and the
   reference, peak RSS after the last block (outside params, evaluation, save), whether the
   checkpoints are identical, the kill point, wall times.

The output is streamed (``calibration.stream_output``, the default; ``--no-stream`` keeps the
whole compressed model instead): each finished block goes to the output checkpoint (hard-linked
from the resume directory, written once) and is dropped, so RSS at the end of each block should
not grow with depth. The record says so: ``rss_end_trend_mb_per_block`` (least-squares slope of
the RSS at the end of blocks 1 to n-2) against ``compressed_block_mb`` (what the
engine would keep per block without streaming), and ``rss_grows_with_depth`` (the slope is
above half of that and above 4 MiB per block, the sampling noise seen at ``--tiny`` shapes,
where the kept bytes are far below the noise and the flag says little).
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from compressjax import pipeline  # pylint: disable=g-import-not-at-top
from compressjax.blocks import LazyTensor  # pylint: disable=g-import-not-at-top
from compressjax.io import hf  # pylint: disable=g-import-not-at-top
from compressjax.model import LlamaConfig  # pylint: disable=g-import-not-at-top
import bench_resume  # pylint: disable=g-import-not-at-top

REAL = dict(hidden=2048, intermediate=5632, layers=24, heads=32, kv_heads=8, vocab=49152,
            windows=8, seq_len=512, eval_windows=1)
TINY = dict(hidden=64, intermediate=128, layers=6, heads=4, kv_heads=2, vocab=49152,
            windows=4, seq_len=64, eval_windows=1)
_SAMPLE_S = 0.2
# RSS slopes below this (MiB per block) are sampling noise: at --tiny shapes (0.02 MiB kept per
# block) the end-of-block RSS still moves by a few MiB per block either way.
_NOISE_MB_PER_BLOCK = 4.0


def model_config(args, ref_cfg) -> LlamaConfig:
  return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                     intermediate_size=args.intermediate, num_layers=args.layers,
                     num_heads=args.heads, num_kv_heads=args.kv_heads,
                     rope_theta=ref_cfg.rope_theta, rms_norm_eps=ref_cfg.rms_norm_eps,
                     tie_word_embeddings=False,
                     max_position_embeddings=max(args.seq_len, 2048),
                     bos_token_id=ref_cfg.bos_token_id, eos_token_id=ref_cfg.eos_token_id)


def random_params(cfg: LlamaConfig, seed: int, std: float = 0.02):
  """The model's tree of :class:`LazyTensor` s that *generate* their values when read: normal
  ``std`` weights from a per-tensor seed ``(seed, index)``, ones for norm scales."""
  tree = {}
  for idx, s in enumerate(hf.tensor_specs(cfg)):
    shape = s.hf_shape[::-1] if s.transpose else s.hf_shape

    def make(shape=shape, idx=idx, norm=s.path[-1] == "scale"):
      if norm:
        return np.ones(shape, np.float32)
      w = np.random.default_rng([seed, idx]).standard_normal(shape, dtype=np.float32)
      w *= std
      return w

    node = tree
    for k in s.path[:-1]:
      node = node.setdefault(k, {})
    node[s.path[-1]] = LazyTensor(shape, np.float32, make, name=s.hf_name)
  return tree


def write_random_model(path: str, cfg: LlamaConfig, tokenizer, *, seed: int = 0,
                       shard_bytes: int = 1 << 30) -> tuple[int, int]:
  """Writes the random model to ``path`` (sharded safetensors); ``(parameters, file bytes)``."""
  hf.save_hf(path, cfg, random_params(cfg, seed), tokenizer, max_shard_bytes=shard_bytes,
             overwrite=True)
  params = sum(int(np.prod(s.hf_shape)) for s in hf.tensor_specs(cfg))
  nbytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))
  return params, nbytes


def _proc_mb(pid: int) -> tuple[float, float]:
  """(VmRSS, VmHWM) of ``pid`` in MiB, or (0, 0) once it is gone."""
  rss = hwm = 0.0
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
          hwm = int(line.split()[1]) / 1024
  except OSError:
    pass
  return rss, hwm


def run_attempt(job, env, state: str, kill_after: int | None = None) -> dict:
  """Runs ``job``, sampling its memory and the resume point; with ``kill_after`` the job stops
  itself once that many blocks are finished (the resume point is written before it stops, so
  ``next_block`` already says so) and is SIGKILLed there. Returns the samples
  ``[(t, rss_mb, next_block)]``, block finish times, peak memory and whether it was killed."""
  t0 = time.perf_counter()
  p = subprocess.Popen(job, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  log = tempfile.TemporaryFile("w+")
  import threading  # pylint: disable=g-import-not-at-top
  pump = threading.Thread(target=lambda: shutil.copyfileobj(p.stdout, log), daemon=True)
  pump.start()
  samples, finished, peak, killed = [], {}, 0.0, False
  start_block = bench_resume._finished_blocks(state)  # pylint: disable=protected-access
  last = start_block
  while p.poll() is None:
    rss, hwm = _proc_mb(p.pid)
    nb = bench_resume._finished_blocks(state)  # pylint: disable=protected-access
    t = time.perf_counter() - t0
    peak = max(peak, hwm)
    samples.append((t, rss, nb))
    for b in range(last, nb):
      finished[b] = t
      print(f"      block {b} finished at {t:.1f} s, RSS {rss:.0f} MiB (peak so far {peak:.0f})",
            flush=True)
    last = max(last, nb)
    if kill_after is not None and nb >= kill_after:
      p.send_signal(signal.SIGKILL)
      killed = True
      break
    time.sleep(_SAMPLE_S)
  p.wait()
  pump.join(timeout=5)
  wall = time.perf_counter() - t0
  if not killed and p.returncode != 0:
    log.seek(0)
    raise SystemExit(f"compress job failed (status {p.returncode}):\n{log.read()[-4000:]}")
  return {"start_block": start_block, "samples": samples, "finished": finished,
          "peak_rss_mb": peak, "killed": killed, "wall_s": wall,
          "blocks_finished": bench_resume._finished_blocks(state)}  # pylint: disable=protected-access


def per_block(attempts: list[dict], num_blocks: int) -> dict:
  """Per block: seconds (from the previous block's finish, or from the attempt's start for its
  first block: that one includes start-up and compilation), RSS at its finish, peak RSS
  sampled while it ran; and the peak RSS sampled after the last block."""
  secs, rss_end, rss_peak = [None] * num_blocks, [None] * num_blocks, [None] * num_blocks
  after = 0.0
  for a in attempts:
    prev = 0.0
    for b in sorted(a["finished"]):
      t = a["finished"][b]
      secs[b] = t - prev
      within = [r for (s, r, _) in a["samples"] if prev <= s <= t]
      rss_end[b] = next((r for (s, r, nb) in a["samples"] if s == t), None)
      rss_peak[b] = max(within) if within else None
      prev = t
    if not a["killed"]:
      after = max([r for (s, r, nb) in a["samples"] if nb >= num_blocks] or [0.0])
  return {"seconds": secs, "rss_end_mb": rss_end, "rss_peak_mb": rss_peak,
          "rss_after_blocks_peak_mb": after}


def _trend_mb_per_block(values) -> float | None:
  """Least-squares slope of ``values`` over the block index (MiB per block), first block out."""
  pts = [(i, v) for i, v in enumerate(values) if v is not None and i > 0]
  if len(pts) < 3:
    return None
  x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
  return float(np.polyfit(x, y, 1)[0])


def _remove_temporaries(out: str) -> None:
  """Removes the temporary directories a killed job left beside its output ``out``
  (``.<name>.tmp-*``: the streamed output checkpoint, never renamed into place)."""
  parent, name = os.path.split(out)
  if os.path.isdir(parent):
    for e in os.listdir(parent):
      if e.startswith(f".{name}.tmp-"):
        shutil.rmtree(os.path.join(parent, e), ignore_errors=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="a tiny shape for tests (seconds)")
  for k, v in REAL.items():
    ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                    help=f"default {v} ({TINY[k]} with --tiny)")
  ap.add_argument("--kill-after", type=int, default=None,
                  help="SIGKILL once this many blocks are finished (default: half)")
  ap.add_argument("--config", default="gptq_w4g64", help="configs/<name>.py")
  ap.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_large"),
                  help="model, outputs and resume directories")
  ap.add_argument("--data-dir", default="", help="corpora directory (default: the protocol's)")
  ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
  ap.add_argument("--shard-mb", type=int, default=1024, help="safetensors shard size (MiB)")
  ap.add_argument("--regenerate", action="store_true", help="rewrite the model even if present")
  ap.add_argument("--no-stream", action="store_true",
                  help="calibration.stream_output=False: keep the compressed blocks, save at the end")
  ap.add_argument("--no-reference", action="store_true",
                  help="skip the uninterrupted run and the comparison")
  ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results",
                                                    "bench_large.jsonl"))
  args = ap.parse_args(argv)
  base = TINY if args.tiny else REAL
  for k, v in base.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  kill_after = args.layers // 2 if args.kill_after is None else args.kill_after
  if not 0 < kill_after < args.layers:
    raise SystemExit(f"--kill-after must be in [1, {args.layers - 1}], got {kill_after}")

  from compressjax.io import open_model  # pylint: disable=g-import-not-at-top
  ref_cfg, _, tok = open_model("smollm2-135m-instruct")  # lazily: only the tokenizer is used
  if tok.get_vocab_size() > args.vocab:
    raise SystemExit(f"--vocab {args.vocab} is below the tokenizer's {tok.get_vocab_size()}")
  cfg = model_config(args, ref_cfg)
  work = os.path.abspath(args.work)
  model_dir = os.path.join(work, "model")
  stamp = os.path.join(work, "model.json")
  want = {"config": cfg.to_dict(), "seed": args.seed, "shard_mb": args.shard_mb}
  have = None
  if os.path.isfile(stamp):
    with open(stamp) as f:
      have = json.load(f)
  if args.regenerate or have is None or have.get("want") != json.loads(json.dumps(want)):
    print(f"[1/4] writing a random Llama to {model_dir}", flush=True)
    t0 = time.perf_counter()
    os.makedirs(work, exist_ok=True)
    if os.path.exists(stamp):
      os.remove(stamp)
    n_params, n_bytes = write_random_model(model_dir, cfg, tok, seed=args.seed,
                                           shard_bytes=args.shard_mb << 20)
    have = {"want": want, "params": n_params, "file_bytes": n_bytes,
            "write_s": time.perf_counter() - t0, "writer_peak_rss_mb": pipeline.peak_rss_mb()}
    with open(stamp, "w") as f:
      json.dump(have, f)
  print(f"      {have['params']:,} parameters, {have['file_bytes'] / 1e9:.2f} GB of safetensors",
        flush=True)

  outs = {k: os.path.join(work, k) for k in ("killed", "reference", "state_killed",
                                             "state_reference")}
  for d in outs.values():  # this benchmark's own outputs from an earlier run
    shutil.rmtree(d, ignore_errors=True)
    _remove_temporaries(d)
  tmp = tempfile.mkdtemp(prefix="bench_large-")
  env = dict(os.environ, PYTHONPATH=ROOT)
  extra = [f"--config.model={model_dir}", f"--config.calibration.seq_len={args.seq_len}",
           f"--config.data.seq_len={args.seq_len}",
           f"--config.data.num_eval_windows={args.eval_windows}",
           f"--config.calibration.stream_output={not args.no_stream}"]
  if args.data_dir:
    extra.append(f"--config.data.dir={os.path.abspath(args.data_dir)}")

  def job(name):
    return bench_resume._job(  # pylint: disable=protected-access
        args.config, outs[name], args.windows, os.path.join(tmp, f"{name}.jsonl"),
        (*extra, f"--config.calibration.resume_dir={outs['state_' + name]}"))

  print(f"[2/4] {args.config} with resume_dir; SIGKILL after block {kill_after}", flush=True)
  stop_job = job("killed")
  stop_job[1:1] = [os.path.join(ROOT, "experiments", "_stop_at_block.py"), str(kill_after)]
  first = run_attempt(stop_job, env, outs["state_killed"], kill_after)
  if not first["killed"]:
    raise SystemExit(f"the job ended before block {kill_after} was finished")
  _remove_temporaries(outs["killed"])  # what the killed job's streamed output had written
  print(f"      killed with {first['blocks_finished']} blocks finished after "
        f"{first['wall_s']:.1f} s (peak RSS {first['peak_rss_mb']:.0f} MiB)", flush=True)
  second = run_attempt(job("killed"), env, outs["state_killed"])
  print(f"      resumed at block {second['start_block']} and finished in {second['wall_s']:.1f} s "
        f"(peak RSS {second['peak_rss_mb']:.0f} MiB)", flush=True)
  killed_blocks = per_block([first, second], args.layers)

  reference, ref_blocks, identical = None, None, None
  if not args.no_reference:
    print("[3/4] the same job, never killed", flush=True)
    reference = run_attempt(job("reference"), env, outs["state_reference"])
    ref_blocks = per_block([reference], args.layers)
    print("[4/4] compare the two checkpoints", flush=True)
    identical = bench_resume.checkpoints_identical(outs["reference"], outs["killed"])

  r_kill = bench_resume._records(os.path.join(tmp, "killed.jsonl"))[-1]  # pylint: disable=protected-access
  # The uninterrupted run's blocks are the cleanest series (one start-up, in block 0).
  series = ref_blocks or killed_blocks
  steady = [s for s in series["seconds"][1:] if s is not None]
  # The last block's end sample may include the work after the blocks: left out.
  end_trend = _trend_mb_per_block(series["rss_end_mb"][:-1])
  block_mb = r_kill["linear_bytes"] / args.layers / 2**20
  rec = {
      "method": f"{r_kill['method']}-random-{have['params'] / 1e9:.2f}B-killed-resumed",
      "settings": {"config": args.config, "calibration_windows": args.windows,
                   "seq_len": args.seq_len, "eval_windows_per_corpus": args.eval_windows,
                   "kill_after_blocks": kill_after, "seed": args.seed,
                   "stream_output": not args.no_stream,
                   "shape": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers",
                                                           "heads", "kv_heads", "vocab")},
                   "tied_head": False, "init_std": 0.02, "dtype": "float32"},
      "model_params": have["params"], "model_file_bytes": have["file_bytes"],
      "writer_peak_rss_mb": have["writer_peak_rss_mb"],
      "bits_per_param": r_kill["bits_per_param"],
      "ppl_wiki": r_kill["ppl_wiki"], "ppl_austen": r_kill["ppl_austen"],
      "ppl_note": (f"random weights, {args.eval_windows} window(s) of {args.seq_len} tokens per "
                   "corpus: shows the compressed model runs, not quality"),
      "identical": identical,
      "killed_with_blocks_finished": first["blocks_finished"],
      "resumed_from_block": second["start_block"],
      "block_seconds": series["seconds"],
      "block_seconds_median_after_first": float(np.median(steady)) if steady else None,
      "block_rss_end_mb": series["rss_end_mb"],
      "block_rss_peak_mb": series["rss_peak_mb"],
      "rss_trend_mb_per_block": _trend_mb_per_block(series["rss_peak_mb"]),
      "rss_end_trend_mb_per_block": end_trend,
      # What the engine keeps per finished block without streaming (its compressed linears):
      # the slope expected then; with streaming the end-of-block RSS should stay flat.
      "compressed_block_mb": block_mb,
      "rss_grows_with_depth": (None if end_trend is None else
                               bool(end_trend > max(0.5 * block_mb, _NOISE_MB_PER_BLOCK))),
      "rss_after_blocks_peak_mb": series["rss_after_blocks_peak_mb"],
      "killed_block_seconds": killed_blocks["seconds"],
      "killed_block_rss_end_mb": killed_blocks["rss_end_mb"],
      "peak_rss_killed_attempt_mb": first["peak_rss_mb"],
      "peak_rss_resumed_attempt_mb": second["peak_rss_mb"],
      "peak_rss_reference_mb": reference["peak_rss_mb"] if reference else None,
      "peak_rss_mb": max(first["peak_rss_mb"], second["peak_rss_mb"],
                         reference["peak_rss_mb"] if reference else 0.0),
      "wall_s": first["wall_s"] + second["wall_s"],
      "reference_wall_s": reference["wall_s"] if reference else None,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": pipeline.git_commit(), "machine": pipeline.machine_info(),
  }
  pipeline.append_record(args.results, rec)
  shutil.rmtree(tmp, ignore_errors=True)
  print(json.dumps(rec, indent=1))
  return 0 if identical in (True, None) else 1


if __name__ == "__main__":
  sys.exit(main())
