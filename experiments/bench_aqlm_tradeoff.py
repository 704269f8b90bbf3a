"""AQLM's quality/time trade-off on real calibration Hessians, and where its time goes.

  python experiments/bench_aqlm_tradeoff.py                  # block 5, the settings below
  python experiments/bench_aqlm_tradeoff.py --blocks 5,20 --windows 16

Runs the uncompressed reference model through the calibration engine over ``--windows``
standard-protocol calibration windows (a spy step records each layer's input statistics and
changes nothing), then quantizes every linear of the chosen blocks with AQLM under each setting
of ``SETTINGS``, timing each phase of the solver separately (residual k-means initialisation,
beam search, codebook least squares, scales; every phase jitted, compiled before timing, wall
seconds with ``block_until_ready``). Reports the relative output error
``tr(dW^T H dW) / tr(W^T H W)`` on the calibration activations and on the first ``--heldout``
wiki evaluation windows, and projects the solver time of a whole-model run (30 blocks) from the
measured blocks. One JSON line per setting in ``experiments/results/bench_aqlm_tradeoff.jsonl``.
"""

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from compressjax import pipeline  # pylint: disable=g-import-not-at-top
from compressjax.quantize import aqlm_core, obs_core  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import diag_extreme_layers  # pylint: disable=g-import-not-at-top

# (M, B, g, beam, rounds, kmeans_iters, cg_iters); the bench_extreme config is 2x8 beam 2, 8 rounds.
SETTINGS = (
    (2, 8, 8, 1, 0, 6, 8),
    (2, 8, 8, 1, 4, 6, 8),
    (2, 8, 8, 1, 8, 6, 8),
    (2, 8, 8, 2, 8, 6, 8),
    (2, 8, 8, 4, 8, 6, 8),
)
NUM_BLOCKS = 30


def _timed(fn, *args):
  out = jax.block_until_ready(fn(*args))  # compile (and warm) once
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def solve(W, XTX, setting, seed=0):
  """One layer's AQLM with each phase timed; returns ``(b, C, s, seconds per phase)``."""
  M, B, g, beam, rounds, km_iters, cg_iters = setting
  W, XTX, _ = obs_core.drop_dead(W.astype(jnp.float32), XTX.astype(jnp.float32))
  init = jax.jit(lambda w: aqlm_core.init_aq_kmeans(w, M=M, B=B, g=g, iters=km_iters,
                                                    key=jax.random.PRNGKey(seed)))
  search = jax.jit(lambda w, h, c, s, b: aqlm_core.beam_search_codes(w, h, c, s, b,
                                                                     beam_size=beam))
  cbook = jax.jit(lambda w, h, c, s, b: aqlm_core.update_codebooks(w, h, c, s, b,
                                                                   iters=cg_iters))
  scales = jax.jit(aqlm_core.update_scales)
  secs = {"kmeans": 0.0, "beam": 0.0, "codebooks": 0.0, "scales": 0.0}
  (b, C, s), secs["kmeans"] = _timed(init, W)
  for _ in range(rounds):
    b, t = _timed(search, W, XTX, C, s, b)
    secs["beam"] += t
    C, t = _timed(cbook, W, XTX, C, s, b)
    secs["codebooks"] += t
    s, t = _timed(scales, W, XTX, C, s, b)
    secs["scales"] += t
  C = C.astype(jnp.float16).astype(jnp.float32)
  s = s.astype(jnp.float16).astype(jnp.float32)
  return aqlm_core.decode(b, C, s), secs


def rel_err(W, What, H):
  d = W - What
  return float(jnp.sum((H @ d) * d) / jnp.sum((H @ W) * W))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--blocks", default="5")
  ap.add_argument("--windows", type=int, default=16)
  ap.add_argument("--heldout", type=int, default=8, help="wiki evaluation windows (0: none)")
  ap.add_argument("--settings", default="", help="indices into SETTINGS (default: all)")
  ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results",
                                                    "bench_aqlm_tradeoff.jsonl"))
  args = ap.parse_args()
  blocks = [int(b) for b in args.blocks.split(",")]
  settings = ([SETTINGS[int(i)] for i in args.settings.split(",")] if args.settings
              else list(SETTINGS))
  seen, held = diag_extreme_layers.layer_stats(blocks, args.windows, args.heldout)
  seen = {p: (jnp.asarray(w), st.hessian / st.n) for p, (w, st) in seen.items()}
  held = {p: (jnp.asarray(w), st.hessian / st.n) for p, (w, st) in held.items()}
  paths = sorted(seen, key=lambda p: (int(p.split("/")[1]), p))
  n_weights = sum(seen[p][0].size for p in paths)
  for setting in settings:
    M, B, g, beam, rounds, km_iters, cg_iters = setting
    secs = {"kmeans": 0.0, "beam": 0.0, "codebooks": 0.0, "scales": 0.0}
    cal, wiki, w_tot = 0.0, 0.0, 0
    for p in paths:
      W, H = seen[p]
      What, t = solve(W, H, setting)
      for k in secs:
        secs[k] += t[k]
      cal += rel_err(W, What, H) * W.size  # weighted by the layer's size
      if p in held:
        wiki += rel_err(W, What, held[p][1]) * W.size
      w_tot += W.size
    total = sum(secs.values())
    rec = {
        "method": f"aqlm-{M}x{B}-g{g}",
        "settings": {"beam_size": beam, "iterations": rounds, "kmeans_iters": km_iters,
                     "cg_iters": cg_iters, "blocks": blocks, "windows": args.windows,
                     "heldout_windows": args.heldout},
        "bits_per_param": None, "ppl_wiki": None, "ppl_austen": None,
        "rel_err_cal": cal / w_tot, "rel_err_wiki": (wiki / w_tot) if args.heldout else None,
        "phase_s": {k: round(v, 2) for k, v in secs.items()},
        "wall_s": total,
        "projected_model_solver_s": total / len(blocks) * NUM_BLOCKS,
        "weights": n_weights,
        "peak_rss_mb": pipeline.peak_rss_mb(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": pipeline.git_commit(), "machine": pipeline.machine_info(),
    }
    print(json.dumps(rec), flush=True)
    pipeline.append_record(args.results, rec)


if __name__ == "__main__":
  main()
