"""Export a model (optionally RTN-quantized onto a llama.cpp grid) as a llama.cpp GGUF file.

  python experiments/export_gguf.py --model smollm2-135m-instruct --grid q4_1 --out /tmp/m.gguf

``--grid keep`` imports the source GGUF's own Q8_0/Q4_0/Q4_1/Q4_K linears exactly
(``load_gguf(keep_quantized=True)``) and writes them back with their source types (byte-identical
tensor data); ``q4_1``/``q4_0``/``q8_0`` round-to-nearest quantize every linear (groups of 32:
asymmetric 4-bit, symmetric 4-bit, symmetric 8-bit) and write the matching type exactly;
``f32``/``f16`` write dense. The real logic is :func:`compressjax.io.gguf.export_gguf`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: ``grid -> (bits, symmetric)`` of the RTN grid each llama.cpp type stores exactly (groups of 32).
GRIDS = {"q4_1": (4, False), "q4_0": (4, True), "q8_0": (8, True)}


def quantized_params(source: str, grid: str):
  """``(cfg, params)`` of ``source`` with every linear kernel on ``grid`` (see module doc)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from compressjax.io import gguf, resolve_model_path  # pylint: disable=g-import-not-at-top
  from compressjax.quantize.rtn_core import quantize_rtn  # pylint: disable=g-import-not-at-top

  _, path = resolve_model_path(source)
  if grid == "keep":
    cfg, params, _ = gguf.load_gguf(path, keep_quantized=True)
    return cfg, params
  cfg, params, _ = gguf.load_gguf(path)
  if grid in GRIDS:
    bits, sym = GRIDS[grid]
    for layer in params["layers"].values():
      for grp in ("attn", "mlp"):
        for leaf in layer[grp].values():
          leaf["kernel"] = quantize_rtn(jnp.asarray(leaf["kernel"]), bits=bits, group_size=32,
                                        symmetric=sym, scale_dtype=jnp.float16)
  return cfg, params


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2-135m-instruct", help="source GGUF (or reference name)")
  ap.add_argument("--grid", default="q4_1", choices=["keep", "f32", "f16", *GRIDS])
  ap.add_argument("--out", required=True, help="the .gguf file to write")
  a = ap.parse_args(argv)
  from compressjax.io import gguf, resolve_model_path  # pylint: disable=g-import-not-at-top

  t = time.time()
  cfg, params = quantized_params(a.model, a.grid)
  _, src = resolve_model_path(a.model)
  written = gguf.export_gguf(params, cfg, src, a.out, types="source" if a.grid == "keep" else "auto",
                             dense_type="F16" if a.grid == "f16" else "F32")
  counts = {}
  for ty in written.values():
    counts[ty] = counts.get(ty, 0) + 1
  print(f"wrote {a.out}: {os.path.getsize(a.out) / 2**20:.1f} MiB, tensor types {counts}, "
        f"{time.time() - t:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
