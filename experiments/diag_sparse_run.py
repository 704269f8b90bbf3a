"""Peak RSS of compiling and running one evaluation batch on random weights, few layers.

  python experiments/diag_sparse_run.py --format sparse --layers 4
"""

import argparse
import json
import os
import resource
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compressjax import formats  # pylint: disable=g-import-not-at-top
from compressjax.evaluate import token_nll
from compressjax.model import Llama, LlamaConfig
from compressjax.quantize.rtn_core import quantize_rtn
from diag_sparse_compile import LINEARS  # pylint: disable=g-import-not-at-top


def rss():
  """Peak resident MiB since the last :func:`reset_peak` (``VmHWM``), and the current one."""
  with open("/proc/self/status") as fh:
    st = dict(line.split(":", 1) for line in fh)
  return int(st["VmHWM"].split()[0]) // 1024, int(st["VmRSS"].split()[0]) // 1024


def reset_peak():
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--format", default="sparse")
  ap.add_argument("--layers", type=int, default=4)
  a = ap.parse_args()
  cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_layers=a.layers, num_heads=9, num_kv_heads=3, tie_word_embeddings=True)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for block in model.layers:
    for part, name in LINEARS:
      lin = getattr(getattr(block, part), name)
      w = lin.kernel.get_value()
      if a.format == "sparse":
        keep = rng.random(w.shape) < 0.5
        leaf = formats.BitmaskSparse.from_dense(w, keep, dtype=w.dtype)
      else:
        leaf = quantize_rtn(w, bits=4, group_size=64)
      lin.kernel = nnx.Param(leaf)
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda state, toks: token_nll(nnx.merge(graphdef, state), toks))
  toks = jnp.asarray(rng.integers(0, 49152, (8, 512)), jnp.int32)
  reset_peak()
  r0 = rss()
  c = f.lower(state, toks).compile()
  r1 = rss()
  reset_peak()
  jax.block_until_ready(c(state, toks))
  r2 = rss()
  print(json.dumps(dict(format=a.format, layers=a.layers, before=r0, compile_peak=r1, run_peak=r2,
                        temp_mib=c.memory_analysis().temp_size_in_bytes / 2**20)))


if __name__ == "__main__":
  main()
