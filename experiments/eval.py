"""Restore a compressed checkpoint and reproduce its perplexity (`compressjax eval`)."""

import sys

from compressjax import cli

if __name__ == "__main__":
  sys.exit(cli.eval_main(sys.argv[1:]))
