"""Kill a calibrated compression of the reference model at random blocks, resume it, compare.

  python experiments/bench_resume.py                      # GPTQ 4-bit g64, 3 kills, 32 windows
  python experiments/bench_resume.py --kills 3 --seed 0 --config gptq_w4g64 --windows 32

1. An uninterrupted run (``compressjax compress``) writes ``runs/resume_reference``.
2. The same job with ``calibration.resume_dir`` is started, SIGKILLed as soon as the resume
   directory says it has finished block ``k`` (for ``--kills`` block numbers drawn at random
   with ``--seed``), started again (it continues from the last finished block), and finally left
   to finish into ``runs/resume_killed``.
3. The two checkpoints are compared array by array (manifest CRC32s and restored values).

One JSON record goes to ``experiments/results/bench_resume.jsonl``: the kill points, whether the
checkpoints are bit-identical, the perplexities of both, wall time of the interrupted job (all
its attempts) and peak RSS of the largest attempt.
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

from compressjax import checkpoint, pipeline  # pylint: disable=g-import-not-at-top


def _job(config, out, windows, results, extra=()):
  return [sys.executable, os.path.join(ROOT, "experiments", "compress.py"), "--config",
          os.path.join(ROOT, "configs", f"{config}.py"), f"--config.output_dir={out}",
          "--config.eval_before=False", f"--config.calibration.num_windows={windows}",
          f"--config.results_file={results}", *extra]


def _finished_blocks(resume_dir):
  try:
    return checkpoint.read_manifest(os.path.join(resume_dir, "latest"))["metadata"]["next_block"]
  except (checkpoint.CheckpointError, KeyError, OSError):
    return 0


def checkpoints_identical(a: str, b: str) -> bool:
  """Whether two checkpoints hold the same tree bit for bit: manifests (structure, formats,
  per-array CRC32s) equal and every restored array equal."""
  ma, mb = checkpoint.read_manifest(a), checkpoint.read_manifest(b)
  if ma["leaves"] != mb["leaves"]:
    return False
  pa, _ = checkpoint.restore(a)
  pb, _ = checkpoint.restore(b)
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="gptq_w4g64")
  ap.add_argument("--windows", type=int, default=32, help="calibration windows (of 512 tokens)")
  ap.add_argument("--kills", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--num-layers", type=int, default=30, help="decoder blocks of the model")
  args = ap.parse_args()
  runs = os.path.join(ROOT, "runs")
  ref, killed = os.path.join(runs, "resume_reference"), os.path.join(runs, "resume_killed")
  state = os.path.join(runs, "resume_state")
  for d in (ref, killed, state):  # this benchmark's own outputs from an earlier run
    shutil.rmtree(d, ignore_errors=True)
  tmp = tempfile.mkdtemp(prefix="bench_resume-")
  ref_res, kill_res = os.path.join(tmp, "ref.jsonl"), os.path.join(tmp, "killed.jsonl")
  env = dict(os.environ, PYTHONPATH=ROOT)

  print(f"[1/3] uninterrupted {args.config} ({args.windows} windows) -> {ref}", flush=True)
  subprocess.run(_job(args.config, ref, args.windows, ref_res), check=True, env=env)

  rng = np.random.default_rng(args.seed)
  points = sorted(int(b) for b in rng.choice(np.arange(1, args.num_layers), args.kills,
                                             replace=False))
  job = _job(args.config, killed, args.windows, kill_res,
             (f"--config.calibration.resume_dir={state}",))
  killed_at, t0 = [], time.perf_counter()
  for k in points:
    print(f"[2/3] run until block {k} is finished, then SIGKILL", flush=True)
    p = subprocess.Popen(job, env=env, stdout=subprocess.DEVNULL)
    while p.poll() is None and _finished_blocks(state) < k:
      time.sleep(0.2)
    if p.poll() is not None:
      raise SystemExit(f"the job ended (status {p.returncode}) before block {k}")
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at.append(_finished_blocks(state))
    print(f"      killed with {killed_at[-1]} blocks finished", flush=True)
  print("[2/3] final attempt (resumes and finishes)", flush=True)
  subprocess.run(job, check=True, env=env)
  wall = time.perf_counter() - t0

  print("[3/3] compare", flush=True)
  identical = checkpoints_identical(ref, killed)
  r_ref, r_kill = _records(ref_res)[-1], _records(kill_res)[-1]
  rec = {
      "method": f"{r_ref['method']}-killed-resumed",
      "settings": {"config": args.config, "calibration_windows": args.windows,
                   "kill_after_blocks": points, "killed_with_blocks_finished": killed_at,
                   "seed": args.seed},
      "bits_per_param": r_kill["bits_per_param"],
      "ppl_wiki": r_kill["ppl_wiki"], "ppl_austen": r_kill["ppl_austen"],
      "reference_ppl_wiki": r_ref["ppl_wiki"], "reference_ppl_austen": r_ref["ppl_austen"],
      "bit_identical": identical,
      "wall_s": wall, "reference_wall_s": r_ref["total_wall_s"],
      "peak_rss_mb": max(r_ref["peak_rss_mb"], r_kill["peak_rss_mb"]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": pipeline.git_commit(), "machine": pipeline.machine_info(),
  }
  pipeline.append_record(os.path.join(ROOT, "experiments", "results", "bench_resume.jsonl"), rec)
  shutil.rmtree(tmp, ignore_errors=True)
  print(json.dumps(rec, indent=1))
  return 0 if rec["bit_identical"] else 1


if __name__ == "__main__":
  sys.exit(main())
