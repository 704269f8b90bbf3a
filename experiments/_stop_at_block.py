"""``python experiments/_stop_at_block.py K experiments/compress.py ARGS...``: runs the compress job
and SIGSTOPs itself right after the resume point with ``next_block == K`` is written, so a
benchmark can SIGKILL it at exactly that point however fast the blocks are (``bench_large``)."""

import os
import runpy
import signal
import sys


def main() -> None:
  stop_at = int(sys.argv[1])
  from compressjax import calibration  # pylint: disable=g-import-not-at-top
  save = calibration._save_resume  # pylint: disable=protected-access

  def save_then_stop(resume_dir, fp, i, *a, **kw):
    save(resume_dir, fp, i, *a, **kw)
    if i + 1 >= stop_at:
      os.kill(os.getpid(), signal.SIGSTOP)

  calibration._save_resume = save_then_stop  # pylint: disable=protected-access
  sys.argv = sys.argv[2:]
  runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
  main()
