"""Plots the fine-tuning loss curves recorded in experiments/results/bench_finetune.jsonl.

  python experiments/plot_finetune.py            # -> experiments/results/finetune_loss.png

One panel per compressed base model (the checkpoint a fine-tune started from), one line per
fine-tuning mode (end-to-end KD of the continuous parameters, STE, PV-tuning), the training KD
loss of each optimizer step against the tokens seen. Only the newest record of each
(method, settings) is drawn, as in RESULTS.md.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import render_results  # pylint: disable=g-import-not-at-top


def base_name(rec) -> str:
  return (rec.get("settings") or {}).get("base", {}).get("name") or rec["method"].split("+")[0]


def curves(recs):
  """``{base: [(label, tokens, losses), ...]}`` for every record with a loss curve."""
  out = {}
  for r in recs:
    curve = r.get("loss_curve")
    if not curve:
      continue
    per_step = r["tokens_seen"] / max(r["steps"], 1)
    label = r["method"][len(base_name(r)):].lstrip("+") or r["method"]
    out.setdefault(base_name(r), []).append(
        (label, [s * per_step for s, _ in curve], [l for _, l in curve]))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--results", default="bench_finetune.jsonl")
  ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results",
                                                "finetune_loss.png"))
  args = ap.parse_args()
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  by_base = curves(render_results.load(args.results))
  if not by_base:
    raise SystemExit(f"no record with a loss curve in {args.results}")
  fig, axes = plt.subplots(1, len(by_base), figsize=(5 * len(by_base), 3.6), squeeze=False)
  for ax, (base, lines) in zip(axes[0], sorted(by_base.items())):
    for label, x, y in sorted(lines):
      ax.plot(x, y, marker=".", label=label)
    ax.set_title(base)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("training KD loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  tmp = args.out + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, args.out)
  print(f"wrote {args.out} ({', '.join(sorted(by_base))})")


if __name__ == "__main__":
  main()
