"""Compress the reference model and print before/after quality, size and time.

  python experiments/compress.py --config configs/rtn_w4g64.py
(the same as the installed `compressjax compress --config ...`)
"""

import sys

from compressjax import cli

if __name__ == "__main__":
  sys.exit(cli.compress_main(sys.argv))
