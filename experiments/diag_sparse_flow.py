"""diag_memory's flow (run_sequential, then one evaluation batch) on a random model, few layers.

  python experiments/diag_sparse_flow.py --method sparsegpt --layers 4

Prints the peak resident MiB (VmHWM, reset before each phase) and the current one after each.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compressjax import calibration, evaluate, transforms as T  # pylint: disable=g-import-not-at-top
from compressjax.blocks import LlamaBlocks
from compressjax.io import build_model
from compressjax.model import Llama, LlamaConfig
from diag_sparse_run import reset_peak, rss  # pylint: disable=g-import-not-at-top

RECIPES = {"gptq": lambda: T.gptq(bits=4, group_size=64, act_order=True, static_groups=True),
           "sparsegpt": lambda: T.sparsegpt(0.5)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--method", default="sparsegpt")
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--windows", type=int, default=8)
  a = ap.parse_args()
  cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_layers=a.layers, num_heads=9, num_kv_heads=3, tie_word_embeddings=True)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  del model
  w = np.random.default_rng(0).integers(0, 49152, (a.windows, 512)).astype(np.int32)
  out = {"method": a.method, "layers": a.layers}
  reset_peak()
  out["start"] = rss()
  q, _ = calibration.run_sequential(LlamaBlocks(cfg, params), w, RECIPES[a.method](),
                                    batch_size=8, progress=False)
  out["compress"] = rss()
  reset_peak()
  m = build_model(cfg, q)
  out["build"] = rss()
  reset_peak()
  evaluate.perplexity(m, w[:8], batch_size=8, progress=False)
  out["eval"] = rss()
  print(json.dumps(out))


if __name__ == "__main__":
  main()
