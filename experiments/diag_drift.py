"""Where two compressed models drift from the dense one, block by block (diagnostic).

For windows of the calibration data, runs the dense model, a compressjax checkpoint and a Hugging
Face export (e.g. llm-compressor's, from ``bench_peer``) block by block and prints, per block:

* ``chained``: the relative squared error ``|h - h_dense|^2 / |h_dense|^2`` of each compressed
  model's own chain of blocks (what the perplexity sees);
* ``local``: the same for the compressed block alone applied to the dense chain's input of that
  block (the block's own error, free of what earlier blocks did).

  python experiments/diag_drift.py --dense runs/bench_peer/model \
      --ours runs/sparsegpt_50 --peer runs/bench_peer/peer_sparsegpt --windows runs/bench_peer/cal_sparsegpt.npy

One-off diagnostic: prints a table, writes nothing.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from compressjax import calibration  # noqa: E402
from compressjax.blocks import LlamaBlocks  # noqa: E402
from compressjax.io import open_model  # noqa: E402


def rel(a, b) -> float:
  return float(jnp.sum((a - b) ** 2) / jnp.sum(b ** 2))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dense", required=True)
  ap.add_argument("--ours", required=True, help="a compressjax checkpoint")
  ap.add_argument("--peer", required=True, help="a Hugging Face directory")
  ap.add_argument("--windows", required=True, help=".npy of (n, T) token windows")
  ap.add_argument("--num", type=int, default=16, help="windows used (the last ones)")
  args = ap.parse_args()
  cfg, dense_p, _ = open_model(args.dense, lazy=True)
  _, peer_p, _ = open_model(args.peer, lazy=True)
  dense, peer = LlamaBlocks(cfg, dense_p), LlamaBlocks(cfg, peer_p)
  ours = LlamaBlocks.from_checkpoint(cfg, args.ours)
  w = np.load(args.windows, allow_pickle=False)[-args.num:]
  passes = calibration._Passes(dense)  # pylint: disable=protected-access
  toks = jnp.asarray(w.reshape(-1, 4, w.shape[1]))
  x = passes.embed(dense.embed_params(), toks)
  h = {"dense": x, "ours": jnp.copy(x), "peer": jnp.copy(x)}  # passes.forward consumes its input
  print(f"{'block':>5s} {'chained ours':>13s} {'chained peer':>13s} {'local ours':>11s} "
        f"{'local peer':>11s}", flush=True)
  for i in range(cfg.num_layers):
    bd, bo, bp = dense.block_params(i), ours.block_params(i), peer.block_params(i)
    prev = h["dense"]
    lo, lp = passes.forward(bo, jnp.copy(prev)), passes.forward(bp, jnp.copy(prev))
    h = {"dense": passes.forward(bd, prev), "ours": passes.forward(bo, h["ours"]),
         "peer": passes.forward(bp, h["peer"])}
    print(f"{i:5d} {rel(h['ours'], h['dense']):13.4e} {rel(h['peer'], h['dense']):13.4e} "
          f"{rel(lo, h['dense']):11.4e} {rel(lp, h['dense']):11.4e}", flush=True)


if __name__ == "__main__":
  main()
