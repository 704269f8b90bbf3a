"""Emulated model eager vs ``jax.jit``, position by position, against llama.cpp's logits.

  python experiments/jitgap_ggml.py keep /tmp/gguf_check/smollm2-keep.gguf \\
      /tmp/bisect/dump-keep-p1.npz /tmp/bisect/job-keep-p1.json

Feeds the prompt of a ``bisect_ggml.py`` job (its ``ids``) token by token through the
ggml-emulated model (``check_llamacpp.ggml_model``, F16 KV cache, ``ggml_emulate.emulate_ggml``)
twice -- op by op (eager) and as one jitted step, as ``check_llamacpp.ggml_generate`` runs it --
and prints the max |diff| of each position's logits against llama.cpp's (``result_output`` of the
job's ``--dump``, llama.cpp run on the same GGUF with the whole prompt as one batch).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from check_llamacpp import ggml_model  # pylint: disable=g-import-not-at-top
  from export_gguf import quantized_params  # pylint: disable=g-import-not-at-top
  from compressjax.io import ggml_emulate, gguf  # pylint: disable=g-import-not-at-top
  from compressjax.model import init_cache  # pylint: disable=g-import-not-at-top

  grid, path, dump, job = (argv or sys.argv[1:])[:4]
  ids = json.load(open(job))["ids"]
  theirs = np.load(dump)["result_output"].reshape(len(ids), -1)
  cfg, params = quantized_params(gguf.reference_model_path(), grid)
  gm = ggml_model(cfg, params, path)
  graphdef, state = nnx.split(gm)
  with ggml_emulate.emulate_ggml():
    def step(state, toks, cache):
      logits, cache = nnx.merge(graphdef, state)(toks, cache)
      return logits[:, -1], cache

    for name, fn in (("eager", step), ("jit", jax.jit(step))):
      cache = init_cache(gm.cfg, 1, 128, dtype=jnp.float16)
      diffs = []
      for i, t in enumerate(ids):
        lg, cache = fn(state, jnp.asarray([[t]], jnp.int32), cache)
        diffs.append(float(np.abs(np.asarray(lg[0]) - theirs[i]).max()))
      print(f"{name:5s} max|diff| per position: " + " ".join(f"{x:.3g}" for x in diffs), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
