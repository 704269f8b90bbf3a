"""XLA's own memory accounting of the evaluation program, compiled only (no weights, no run).

  python experiments/diag_sparse_compile.py --format sparse --layers 30

Builds the reference model's shapes abstractly (SmolLM2-135M: hidden 576, intermediate 1536,
9 / 3 heads, vocab 49152, tied embeddings), makes every decoder linear an abstract
``BitmaskSparse`` at 50% (``--format sparse``), a 4-bit g64 ``QuantizedArray`` (``quant``) or
leaves it dense, lowers and compiles ``evaluate.perplexity``'s jitted function on ``(8, 512)``
int32 tokens (``--untied``: without ``tiled.after_input``, as before the fix) and prints ``compiled.memory_analysis()`` and the process's peak RSS (the compile's
host memory; run one configuration per process).
"""

import argparse
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compressjax import formats  # pylint: disable=g-import-not-at-top
from compressjax.evaluate import token_nll
from compressjax.formats import tiled
from compressjax.formats import packing
from compressjax.model import Llama, LlamaConfig

LINEARS = (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def abstract_leaf(fmt: str, k: int, n: int):
  sds = jax.ShapeDtypeStruct
  if fmt == "sparse":
    nnz = k * n // 2
    return formats.BitmaskSparse(sds((packing.packed_length(k * n, 1),), jnp.uint32),
                                 sds((nnz,), jnp.float16), shape=(k, n), dtype=jnp.float32,
                                 nnz=nnz)
  if fmt == "quant":
    return jax.eval_shape(
        lambda: formats.QuantizedArray.from_codes(
            jnp.zeros((k, n), jnp.uint8), jnp.ones((k // 64, n), jnp.float16), None, bits=4,
            group_size=64, symmetric=True, dtype=jnp.float32))
  return sds((k, n), jnp.float32)


def abstract_model(fmt: str, layers: int, hidden=576, inter=1536, heads=9, kv=3, vocab=49152):
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                    num_layers=layers, num_heads=heads, num_kv_heads=kv,
                    tie_word_embeddings=True)
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  for block in model.layers:
    for part, name in LINEARS:
      lin = getattr(getattr(block, part), name)
      k, n = lin.kernel.get_value().shape
      lin.kernel = nnx.Param(abstract_leaf(fmt, k, n))
  return model


def analyse(fmt: str, layers: int, batch=8, seq=512, lean=True, **shape):
  model = abstract_model(fmt, layers, **shape)
  graphdef, state = nnx.split(model)
  tiled.TIE_DECODE_TO_INPUT = lean
  f = jax.jit(lambda state, toks: token_nll(nnx.merge(graphdef, state), toks))
  t0 = time.perf_counter()
  compiled = f.lower(state, jax.ShapeDtypeStruct((batch, seq), jnp.int32)).compile()
  secs = time.perf_counter() - t0
  m = compiled.memory_analysis()
  return compiled, {
      "format": fmt, "layers": layers, "tied": lean, "compile_s": round(secs, 2),
      "temp_mib": m.temp_size_in_bytes / 2**20,
      "argument_mib": m.argument_size_in_bytes / 2**20,
      "output_mib": m.output_size_in_bytes / 2**20,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--format", choices=("sparse", "quant", "dense"), default="sparse")
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--hlo", help="write compiled.as_text() here")
  ap.add_argument("--untied", action="store_true",
                  help="without tiled.after_input (the program before the fix)")
  args = ap.parse_args()
  compiled, rec = analyse(args.format, args.layers, lean=not args.untied)
  if args.hlo:
    with open(args.hlo, "w") as fh:
      fh.write(compiled.as_text())
  print(json.dumps(rec))


if __name__ == "__main__":
  main()
