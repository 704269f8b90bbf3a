"""``compressjax`` command line: ``compress`` and ``eval``.

  compressjax compress --config configs/rtn_w4g64.py [--config.output_dir=... --config.data.num_eval_windows=8]
  compressjax eval --checkpoint runs/rtn_w4g64
"""

from __future__ import annotations

import os
import sys

# Threaded OpenBLAS makes the small LAPACK calls of calibration (Cholesky) ~100x slower on a
# loaded CPU; set before numpy/scipy load it. An explicit user setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

USAGE = __doc__


def _add_config_root(argv):
  """Lets config files import their siblings (``from configs import default``)."""
  for i, a in enumerate(argv):
    path = None
    if a.startswith("--config="):
      path = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    if path:
      root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":")[0])))
      if root not in sys.path:
        sys.path.insert(0, root)


def _quiet_logs():
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)


def compress_main(argv=None):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv if argv is None else argv)
  _add_config_root(argv)
  config = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                           lock_config=True)

  def main(_):
    from compressjax import pipeline  # pylint: disable=g-import-not-at-top
    _quiet_logs()
    if config.value is None:
      raise app.UsageError("--config is required, e.g. --config configs/rtn_w4g64.py")
    pipeline.run_compress(config.value)

  flags.FLAGS.unparse_flags()
  app.run(main, argv=argv)


def eval_main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="compressjax eval",
                              description="Restore a compressed checkpoint and re-evaluate it.")
  p.add_argument("--checkpoint", required=True, help="directory written by `compressjax compress`")
  p.add_argument("--corpora", default=None, help="comma-separated subset of wiki,austen")
  p.add_argument("--data-dir", default=None, help="corpora directory (default ../shared/data)")
  args = p.parse_args(argv)
  _quiet_logs()
  from compressjax import pipeline  # pylint: disable=g-import-not-at-top
  res = pipeline.run_eval(args.checkpoint, corpora=args.corpora.split(",") if args.corpora else None,
                          data_dir=args.data_dir)
  return 0 if all(r["matches_saved"] for r in res.values()) else 1


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help"):
    print(USAGE)
    return 0 if len(argv) >= 2 else 2
  cmd, rest = argv[1], argv[2:]
  if cmd == "compress":
    return compress_main([f"{argv[0]} compress", *rest])
  if cmd == "eval":
    return eval_main(rest)
  print(f"unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
