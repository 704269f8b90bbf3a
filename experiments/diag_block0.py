"""The solvers' own objective on block 0, ours against the peer's (GPTQ and SparseGPT): is our
solver at least as good?

The perplexity of a whole GPTQ run moves by a few tenths between runs whose only difference is
the order of float sums (README, issue 12), so it cannot tell a slightly worse solver from
noise. Block 0 can: both sides quantize it from the same calibration inputs (the embedded
windows; later blocks see inputs that already differ). For each of its 7 linears this computes
the layer-wise objective GPTQ minimizes, the mean squared output error per token

    E(Q) = tr((Q - W)^T (X^T X) (Q - W)) / n          (W, Q: (in, out); X: (n, in))

with ``X^T X`` the statistics of our engine's pass on the dense block, for
* ours: :func:`compressjax.quantize.gptq_core.gptq_quantize` with the settings of the
  ``bench_peer`` GPTQ run (4-bit, g64, symmetric, act-order, static groups, damping 0.01,
  block 128), or :func:`compressjax.prune.sparsegpt_core.sparsegpt_prune` with its SparseGPT
  run's (50% unstructured, block 128, damping 0.01), on ``2 X^T X / n``, decoded;
* the peer: the dense float32 weights llm-compressor's oneshot exported (``bench_peer``'s
  ``<work-dir>/peer_<method>``),
and the data-free baseline both must beat (RTN on the same grid; magnitude pruning at 50%
per layer).

  python experiments/diag_block0.py --work-dir runs/bench_peer --method gptq
  python experiments/diag_block0.py --work-dir runs/bench_peer --method sparsegpt

reads ``model/`` (the dense checkpoint both sides started from), ``cal_<method>.npy`` (the
windows) and ``peer_<method>/`` from a ``bench_peer`` work directory; prints a table and
appends one record to ``experiments/results/diag_block0.jsonl``.
"""

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from compressjax import calibration, pipeline  # noqa: E402
from compressjax.blocks import LlamaBlocks  # noqa: E402
from compressjax.io import open_model  # noqa: E402
from compressjax.quantize import gptq_core  # noqa: E402
from compressjax.prune import sparsegpt_core  # noqa: E402
from compressjax.quantize.rtn_core import quantize_rtn  # noqa: E402

SETTINGS = {"gptq": dict(bits=4, group_size=64, symmetric=True, act_order=True,
                         static_groups=True, percdamp=0.01, blocksize=128),
            "sparsegpt": dict(sparsity=0.5, pattern=None, blocksize=128, percdamp=0.01)}


def ours_and_baseline(method: str, w: np.ndarray, st) -> tuple[np.ndarray, np.ndarray]:
  """Our solver's dense result and the data-free baseline's for one layer."""
  if method == "gptq":
    qa, _ = gptq_core.gptq_quantize(jnp.asarray(w), st.gptq_hessian(), **SETTINGS[method])
    base = quantize_rtn(jnp.asarray(w), bits=4, group_size=64, symmetric=True)
    return np.asarray(qa.materialize(), np.float32), np.asarray(base.materialize(), np.float32)
  pruned, _, _ = sparsegpt_core.sparsegpt_prune(jnp.asarray(w), st.gptq_hessian(),
                                                   **SETTINGS[method])
  mag = np.abs(w)
  base = np.where(mag > np.median(mag), w, 0.0).astype(np.float32)
  return np.asarray(pruned, np.float32), base


def objective(q: np.ndarray, w: np.ndarray, xtx: np.ndarray, n: float) -> float:
  d = (q - w).astype(np.float64)
  return float(np.einsum("ko,kl,lo->", d, xtx.astype(np.float64), d) / n)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--work-dir", required=True, help="a bench_peer work directory")
  ap.add_argument("--method", default="gptq", choices=sorted(SETTINGS))
  ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results",
                                                    "diag_block0.jsonl"))
  ap.add_argument("--batch-size", type=int, default=8)
  args = ap.parse_args()
  t0 = time.perf_counter()
  cfg, params, _ = open_model(os.path.join(args.work_dir, "model"), lazy=True)
  m = args.method
  _, peer, _ = open_model(os.path.join(args.work_dir, f"peer_{m}"), lazy=True)
  windows = np.load(os.path.join(args.work_dir, f"cal_{m}.npy"), allow_pickle=False)
  n_win, t = windows.shape
  bs = args.batch_size
  if n_win % bs:
    raise SystemExit(f"--batch-size {bs} must divide the {n_win} windows")
  bm = LlamaBlocks(cfg, params)
  passes = calibration._Passes(bm)  # pylint: disable=protected-access
  x = passes.embed(bm.embed_params(), jnp.asarray(windows.reshape(-1, bs, t)))
  stats = calibration.block_stats(bm, bm.block_params(0), x)[0]
  dense = bm.block_params(0)
  peer0 = LlamaBlocks(cfg, peer).block_params(0)
  rows = []
  for path, cap in bm.linear_inputs.items():
    st = stats[cap]
    w = np.asarray(dense[path], np.float32)
    h = np.asarray(st.hessian)
    n = float(st.n)
    ours, base = ours_and_baseline(m, w, st)
    theirs = np.asarray(peer0[path], np.float32)
    e = {k: objective(q, w, h, n)
         for k, q in (("ours", ours), ("peer", theirs), ("baseline", base))}
    rows.append({"layer": path, **e, "ours_over_peer": e["ours"] / e["peer"],
                 "peer_zero_fraction": float(np.mean(theirs == 0)),
                 "ours_zero_fraction": float(np.mean(ours == 0))})
  tot = {k: sum(r[k] for r in rows) for k in ("ours", "peer", "baseline")}
  print(f"{'layer':22s} {'ours':>12s} {'peer':>12s} {'baseline':>12s} {'ours/peer':>9s}")
  for r in rows:
    print(f"{r['layer']:22s} {r['ours']:12.5g} {r['peer']:12.5g} {r['baseline']:12.5g} "
          f"{r['ours_over_peer']:9.4f}")
  print(f"{'sum':22s} {tot['ours']:12.5g} {tot['peer']:12.5g} {tot['baseline']:12.5g} "
        f"{tot['ours'] / tot['peer']:9.4f}")
  with open(os.path.join(args.work_dir, f"peer_{m}.json")) as f:
    peer_report = json.load(f)
  rec = {"benchmark": "diag_block0", "method": f"{m} block 0 objective",
         "baseline": "rtn w4g64" if m == "gptq" else "magnitude 50% per layer",
         "settings": SETTINGS[m], "windows": [int(n_win), int(t)], "layers": rows,
         # the objective, not a perplexity; the bits of the formats both sides store
         "bits_per_param": 4.25 if m == "gptq" else 9.0, "ppl_wiki": None, "ppl_austen": None,
         "sum": tot, "ours_over_peer_sum": tot["ours"] / tot["peer"],
         "layers_ours_better": sum(r["ours"] <= r["peer"] for r in rows),
         "peer_versions": peer_report.get("versions"),
         "wall_s": time.perf_counter() - t0, "peak_rss_mb": pipeline.peak_rss_mb(),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "commit": pipeline.git_commit(), "machine": pipeline.machine_info()}
  pipeline.append_record(args.results, rec)
  print(f"appended to {args.results}")


if __name__ == "__main__":
  main()
