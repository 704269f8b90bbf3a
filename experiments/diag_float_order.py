"""How far does float summation order alone move our perplexity? The noise floor of bench_peer.

  python experiments/diag_float_order.py --method gptq --micro-rows 512
  python experiments/diag_float_order.py --method sparsegpt --micro-rows 512

Runs our side of ``experiments/bench_peer.py`` (the same ``compressjax compress`` job: model,
calibration windows, settings, evaluation) with the calibration passes' micro-steps set to
``--micro-rows`` tokens (``calibration.MICRO_ROWS``, default 1024: two 512-token windows per
step). That changes only the order in which each ``X^T X`` sums its rows (and the row count of
each block matmul), i.e. float32 rounding, not the algorithm. If our perplexity moves by about
as much as our gap to the peer, that gap is within what float order alone does to a sequential
30-block calibration; if it stays put, the gap is something else.

Needs the float32 checkpoint that bench_peer writes (``<work-dir>/model``, default
``runs/bench_peer``). Appends the compress job's record (method name ending ``-micro<rows>``) to
``--results`` (default ``experiments/results/diag_float_order.jsonl``).
"""

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_peer  # pylint: disable=g-import-not-at-top,wrong-import-position

# Runs the CLI with the engine's micro-step size replaced first (argv[1]); the rest is the CLI's.
_LAUNCH = ("import sys; from compressjax import calibration, cli; "
           "calibration.MICRO_ROWS = int(sys.argv[1]); sys.exit(cli.main(sys.argv[1:]))")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--method", required=True, choices=tuple(bench_peer.METHODS))
  ap.add_argument("--micro-rows", type=int, required=True,
                  help="tokens per device per micro-step of the block passes (default 1024)")
  ap.add_argument("--seed", type=int, default=0, help="calibration draw (as bench_peer's)")
  ap.add_argument("--work-dir", default=bench_peer.DEFAULT_WORK_DIR)
  ap.add_argument("--results", default=os.path.join(bench_peer.ROOT, "experiments", "results",
                                                    "diag_float_order.jsonl"))
  args = ap.parse_args(argv)
  if args.micro_rows < 1:
    raise SystemExit(f"--micro-rows must be >= 1, got {args.micro_rows}")
  hf_dir = os.path.join(os.path.abspath(args.work_dir), "model")
  if not os.path.isdir(hf_dir):
    raise SystemExit(f"{hf_dir} is missing: run experiments/bench_peer.py (any method) with "
                     f"--work-dir {args.work_dir} first")
  job = argparse.Namespace(data_dir="", seq_len=bench_peer.STANDARD["seq_len"],
                           num_eval_windows=bench_peer.STANDARD["num_eval_windows"],
                           num_windows=bench_peer.STANDARD["num_windows"], seed=args.seed,
                           precision="float32")
  over, kwargs = bench_peer.job_overrides(args.method, job, hf_dir, os.path.abspath(args.results))
  over["compression.name"] += f"-micro{args.micro_rows}"
  cmd = bench_peer.compress_command(args.method, over, kwargs)
  assert cmd[1:3] == ["-m", "compressjax.cli"], cmd
  cmd = [cmd[0], "-c", _LAUNCH, str(args.micro_rows), *cmd[3:]]
  print(" ".join(cmd), flush=True)
  return subprocess.call(cmd, cwd=bench_peer.ROOT)


if __name__ == "__main__":
  sys.exit(main())
