"""Diagnostic: relative output error per layer of the ~2-bit methods, on real calibration Hessians.

  python experiments/diag_extreme_layers.py                       # blocks 5 and 20
  python experiments/diag_extreme_layers.py --blocks 0,29 --windows 16

Runs the uncompressed reference model through the calibration engine over ``--windows``
standard-protocol calibration windows (a spy step records each layer's statistics and changes
nothing), then quantizes the chosen blocks' kernels with each method of ``METHODS`` (the
bench_extreme configs' settings, also with incoherence in front) and prints
``tr(dW^T H dW) / tr(W^T H W)`` with ``H = X^T X / n``: the share of the layer's output energy
lost, on the calibration activations and (``--heldout N``) on the activations of the first N
wiki evaluation windows, as ``cal / wiki``. Used to ask whether AQLM's end-to-end result behind E8P
and level with GPTVQ comes from its per-layer fit.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import importlib  # pylint: disable=g-import-not-at-top

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from compressjax import calibration, data, pipeline, transforms as T  # pylint: disable=g-import-not-at-top
from compressjax.blocks import unflatten  # pylint: disable=g-import-not-at-top
from compressjax.io import load_model  # pylint: disable=g-import-not-at-top

METHODS = ("gptq_w2g64", "gptq_w2g64_incoherent", "gptvq_d2_w2", "aqlm_2x8_g8", "quip_e8p")


def _recipe(config_name, incoherent):
  comp = importlib.import_module(f"configs.{config_name}").get_config().compression
  t = pipeline.build_transform(comp)
  return T.chain(T.incoherence(0), t) if incoherent else t


def layer_stats(blocks, windows: int, heldout: int):
  """``(seen, held)``: ``{path: (kernel, LayerStats)}`` of every linear of ``blocks`` of the
  uncompressed reference model, on ``windows`` protocol calibration windows and (``heldout`` >
  0) on the first ``heldout`` wiki evaluation windows (a spy step records each layer's
  statistics through the calibration engine and changes nothing)."""
  model, tok = load_model("smollm2-135m-instruct")
  seen, held = {}, {}

  def spy_into(store):
    def spy(path, leaf, stats):
      if int(path.split("/")[1]) in blocks:
        store[path] = (leaf, stats)
      return leaf
    return T.leafwise(spy, with_stats=True, name="spy")

  cal = data.protocol_calibration_windows(tok, num=windows, seq_len=512, seed=0)
  calibration.run_sequential(model, cal, spy_into(seen), batch_size=4, progress=False)
  if heldout:
    calibration.run_sequential(
        model, data.protocol_eval_windows(tok, "wiki", num_windows=heldout), spy_into(held),
        batch_size=4, progress=False)
  return seen, held


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--blocks", default="5,20")
  ap.add_argument("--windows", type=int, default=16)
  ap.add_argument("--incoherent", default="gptvq_d2_w2,aqlm_2x8_g8",
                  help="methods also run with incoherence in front")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--heldout", type=int, default=0, help="wiki evaluation windows (0: none)")
  args = ap.parse_args()
  blocks = [int(b) for b in args.blocks.split(",")]
  seen, held = layer_stats(blocks, args.windows, args.heldout)
  runs = ([(m, False) for m in args.methods.split(",") if m]
          + [(m, True) for m in args.incoherent.split(",") if m])
  print("layer".ljust(30) + "".join(f"{m + ('+inc' if inc else ''):>26s}" for m, inc in runs))
  for path in sorted(seen, key=lambda p: (int(p.split("/")[1]), p)):
    w, stats = seen[path]
    h = stats.hessian / stats.n
    w = jnp.asarray(w)
    total = float(jnp.sum((h @ w) * w))
    cells = []
    for m, inc in runs:
      t0 = time.perf_counter()
      q, _ = T.apply(_recipe(m, inc), unflatten({path: w}), {path: stats})
      leaf = q
      for part in path.split("/"):
        leaf = leaf[part]
      d = w - leaf.materialize()
      cell = f"{float(jnp.sum((h @ d) * d)) / total:.4f}"
      if path in held:
        hw = held[path][1].hessian / held[path][1].n
        cell += f" / {float(jnp.sum((hw @ d) * d)) / float(jnp.sum((hw @ w) * w)):.4f}"
      cells.append(f"{cell} ({time.perf_counter() - t0:4.1f}s)")
    print(path.ljust(30) + "".join(f"{c:>26s}" for c in cells), flush=True)


if __name__ == "__main__":
  main()
