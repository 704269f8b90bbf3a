"""Diagnostic: GPTQ vs RTN output error per layer, on calibration and on held-out activations.

  python experiments/diag_layer_errors.py            # 4-bit g64, blocks 0, 10, 20
  python experiments/diag_layer_errors.py --bits 3 --blocks 0,29

Runs the original model block by block over 16 calibration windows (standard mix) and over 8
evaluation windows of each corpus, and prints, for a few layers, the ratio of GPTQ's to RTN's
output error ``tr(dW^T H dW)`` with ``H = X^T X / n`` of each activation set. A ratio below 1
means GPTQ's layer output is closer to the original's on that data.

With ``--skip-first N`` the held-out errors are measured on the tokens at positions >= N only,
and a third quantizer, GPTQ calibrated on those tokens only (``gptq-rest``), is added; the
share of each Hessian's trace that the first N positions carry is printed (windows start at
position 0 with no BOS, so the first token of each window is an attention sink with very large
activations in a few channels).
"""

import argparse
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from compressjax import calibration, data  # pylint: disable=g-import-not-at-top
from compressjax.blocks import LlamaBlocks  # pylint: disable=g-import-not-at-top
from compressjax.io import load_model  # pylint: disable=g-import-not-at-top
from compressjax.quantize import gptq_quantize, quantize_rtn  # pylint: disable=g-import-not-at-top


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--bits", type=int, default=4)
  ap.add_argument("--group-size", type=int, default=64)
  ap.add_argument("--blocks", default="0,10,20")
  ap.add_argument("--skip-first", type=int, default=0)
  ap.add_argument("--percdamp", default="0.01",
                  help="comma-separated GPTQ dampings; each gets its own column")
  args = ap.parse_args()
  blocks = {int(b) for b in args.blocks.split(",")}
  model, tok = load_model("smollm2-135m-instruct")
  bm = LlamaBlocks.from_model(model)
  sets = {"cal": data.protocol_calibration_windows(tok, num=16, seq_len=512, seed=0),
          "wiki": data.protocol_eval_windows(tok, "wiki", num_windows=8),
          "austen": data.protocol_eval_windows(tok, "austen", num_windows=8)}
  outside = bm.outside_params()
  # (batches, 4, T, D) activations of each window set, carried from block to block.
  xs = {k: bm.embed(outside, jnp.asarray(w)).reshape(-1, 4, *w.shape[1:], model.cfg.hidden_size)
        for k, w in sets.items()}
  skip = args.skip_first
  for i in range(max(blocks) + 1):
    block = bm.block_params(i)
    stats, rest = {}, {}
    if i in blocks and skip:
      for k in sets:
        acc = None
        for x in xs[k]:
          cap = {}
          bm.apply_block(block, x, cap)
          if acc is None:
            acc = {c: calibration.LayerStats.zeros(v.shape[-1]) for c, v in cap.items()}
          acc = {c: acc[c].add(v[:, skip:]) for c, v in cap.items()}
        rest[k] = acc
    for k in sets:
      stats[k], xs[k] = calibration.block_stats(bm, block, xs[k], keep_outputs=True)
    if i not in blocks:
      continue
    for lin, src in bm.linear_inputs.items():
      W = block[lin]
      damps = [float(d) for d in args.percdamp.split(",")]
      gs = {d: gptq_quantize(W, stats["cal"][src].gptq_hessian(), bits=args.bits,
                             group_size=args.group_size, percdamp=d)[0].materialize()
            for d in damps}
      g = gs[damps[0]]
      r = quantize_rtn(W, bits=args.bits, group_size=args.group_size).materialize()
      cells = []
      if skip:
        g2 = gptq_quantize(W, rest["cal"][src].gptq_hessian(), bits=args.bits,
                           group_size=args.group_size)[0].materialize()
        share = 1 - float(jnp.trace(rest["cal"][src].hessian) / jnp.trace(stats["cal"][src].hessian))
        for k, st in rest.items():
          H = st[src].hessian / st[src].n
          err = lambda Q: float(jnp.sum((H @ (W - Q)) * (W - Q)))  # pylint: disable=cell-var-from-loop
          cells.append(f"{k}[>={skip}] gptq {err(g) / err(r):.3f} gptq-rest {err(g2) / err(r):.3f}")
        print(f"block {i:2d} {lin:14s} first-{skip} share of tr(H) {share:.3f}; vs rtn: "
              + "  ".join(cells), flush=True)
        continue
      for k, st in stats.items():
        H = st[src].hessian / st[src].n
        err = lambda Q: float(jnp.sum((H @ (W - Q)) * (W - Q)))  # pylint: disable=cell-var-from-loop
        cells.append(f"{k} " + "/".join(f"{err(q) / err(r):.3f}" for q in gs.values()))
      print(f"block {i:2d} {lin:14s} gptq/rtn output error (percdamp {args.percdamp}): "
            + "  ".join(cells), flush=True)


if __name__ == "__main__":
  main()
