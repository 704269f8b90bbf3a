"""Side by side with llm-compressor (PyTorch): GPTQ and SparseGPT on the same model and data,
measured by the same evaluator.

  python experiments/bench_peer.py                          # both methods, both sides, reference model
  python experiments/bench_peer.py --methods gptq --sides peer
  python experiments/bench_peer.py --model tiny_hf_dir --data-dir tiny_corpora \
      --num-windows 4 --seq-len 32 --num-eval-windows 2     # a smoke run
  python experiments/bench_peer.py --setup-only             # only build the peer's venv
  python experiments/bench_peer.py --precision bfloat16     # both sides' matmuls in bfloat16
  python experiments/bench_peer.py --seed 1 --results experiments/results/bench_peer_seeds.jsonl
                                                            # other calibration draws

Steps (each measured step in its own process, one after the other, never two at once; this
orchestrating process imports neither jax nor torch, so it adds nothing to their peak memory):

1. The peer's virtual environment (default ``.peer-venv``, gitignored): ``torch==2.13.0`` (the
   CPU wheel on this machine's disk), then ``llmcompressor==0.14.0.1`` against a constraints file
   pinning torch, so nothing upgrades it to a CUDA build; checked (``torch.version.cuda is None``)
   and stamped, so a second run installs nothing.
2. Shared inputs, written by compressjax into ``--work-dir``: the model as a float32 Hugging Face
   checkpoint (``io.load_model`` + ``io.hf.save_hf``, with the tokenizer) and, per method, the
   calibration windows exactly as our compress job draws them (``pipeline.calibration_windows_for``
   with that job's config and the tokenizer of the written checkpoint) as ``.npy``.
3. Peer: ``experiments/peer_worker.py`` in the peer's venv runs ``llmcompressor.oneshot`` on the
   checkpoint and windows (see its docstring for the modifiers) and writes the compressed model's
   dense weights as a safetensors checkpoint; it reports ``oneshot``'s wall time, the peak RSS
   after it and at exit, checks (4-bit grid / sparsity) and versions.
4. The peer's checkpoint is evaluated by OUR evaluator (``io.load_model`` +
   ``pipeline.eval_windows_for`` + ``pipeline._eval_all``: the standard protocol), which also
   checks the weights it loaded (at most 16 distinct values per group of 64 inputs / zeros).
5. Ours: ``python -m compressjax.cli compress --config configs/<gptq_w4g64|sparsegpt_50>.py`` on
   the same checkpoint with the same settings (GPTQ: act-order with static groups, damping 0.01,
   block 128; SparseGPT 50%, block 128, damping 0.01; calibration in "sequential" mode like the
   peer's sequential pipeline), not saving a checkpoint.
``--precision bfloat16``: the peer loads the model in bfloat16 (its forward passes in bfloat16;
llm-compressor keeps the Hessian and the solver in float32; see ``peer_worker.py --dtype``), ours
runs with ``calibration.matmul_dtype=bfloat16`` (bfloat16 operands, float32 accumulation); the
records' method names end in ``bf16``. Both sides are evaluated in float32 on the standard
protocol.

6. One JSON record per side and method is appended to ``--results`` (default
   ``experiments/results/bench_peer.jsonl`` for the standard protocol, else
   ``<work-dir>/bench_peer.jsonl``), the two records of a side-by-side run sharing a ``pair`` id,
   and a table is printed.

Record fields: ``method``, ``side``, ``pair``, ``settings``, ``bits_per_param`` (ours: counted from
the stored format; the peer's: what its compressed-tensors format stores with 16-bit scales / kept
values, see ``bits_per_param_basis``; it is evaluated from a dense float32 export, see
``stored_as``), ``ppl_wiki``, ``ppl_austen``, ``nll``, ``wall_s`` (the peer: ``oneshot`` alone;
ours: calibration + compression), ``peak_rss_mb`` (the whole process),
``peak_rss_after_oneshot_mb`` (the peer), ``protocol``, ``calibration``, ``date``, ``commit``,
``machine``, ``peer_versions``.
"""

import argparse
import datetime
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "experiments")
OUR_PYTHON = sys.executable
PEER_TORCH = "2.13.0"
PEER_PACKAGES = ("llmcompressor==0.14.0.1",)
DEFAULT_PEER_VENV = os.path.join(ROOT, ".peer-venv")
DEFAULT_WORK_DIR = os.path.join(ROOT, "runs", "bench_peer")
STANDARD_RESULTS = os.path.join(ROOT, "experiments", "results", "bench_peer.jsonl")
STANDARD = {"num_windows": 128, "seq_len": 512, "num_eval_windows": 64}
_STAMP = ".bench-peer-setup"

# method -> our config, our compression name, method kwargs passed on our command line, and the
# record names of both sides.
METHODS = {
    "gptq": {
        "config": "gptq_w4g64",
        "name": "gptq-w4g64-act-order",
        "kwargs": {"bits": 4, "group_size": 64, "symmetric": True, "act_order": True,
                   "static_groups": True, "percdamp": 0.01, "blocksize": 128},
        "peer": "llm-compressor gptq w4g64 act-order",
        "ours": "compressjax gptq w4g64 act-order",
    },
    "sparsegpt": {
        "config": "sparsegpt_50",
        "name": "sparsegpt-50%",
        "kwargs": {"sparsity": 0.5, "pattern": None, "blocksize": 128, "percdamp": 0.01},
        "peer": "llm-compressor sparsegpt 50%",
        "ours": "compressjax sparsegpt 50%",
    },
}
_QUIET = ("| METRIC - ", "compress_module_list | INFO - Quantizing", "| INFO - Sparsifying ")


def _log(msg):
  print(f"[bench_peer] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# The peer's virtual environment.
# ------------------------------------------------------------------------------------------


def _venv_python(venv):
  return os.path.join(venv, "bin", "python")


def _setup_key():
  return hashlib.sha256(json.dumps([PEER_TORCH, PEER_PACKAGES, sys.version]).encode()).hexdigest()


def _du_mb(path):
  total = 0
  for dirpath, _, files in os.walk(path):
    for f in files:
      fp = os.path.join(dirpath, f)
      if not os.path.islink(fp):
        total += os.path.getsize(fp)
  return total / 2**20


def _runs(py):
  """Whether ``py`` is an interpreter that starts."""
  try:
    return subprocess.run([py, "-c", "pass"], capture_output=True).returncode == 0
  except OSError:
    return False


def ensure_peer_venv(venv):
  """Creates ``venv`` with CPU torch and llm-compressor unless its stamp says it is ready.

  Returns the stamp: ``{"key", "install_s", "size_mb", "versions", "installed"}``.

  Raises:
    RuntimeError: the venv could not be built, or its torch is not the CPU build of
      ``PEER_TORCH``.
  """
  py = _venv_python(venv)
  stamp = os.path.join(venv, _STAMP)
  key = _setup_key()
  if os.path.isfile(stamp) and _runs(py):
    with open(stamp) as f:
      info = json.load(f)
    if info.get("key") == key:
      _log(f"peer venv {venv} is up to date (built in {info['install_s']:.0f} s, "
           f"{info['size_mb']:.0f} MiB): {info['versions']}")
      return {**info, "installed": False}
  t0 = time.perf_counter()
  try:
    if not _runs(py):
      # A venv copied without its symlinks (bin/python as a text file) cannot be repaired.
      _log(f"creating the peer venv {venv}")
      shutil.rmtree(venv, ignore_errors=True)
      subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # Pinned exactly, pip takes the CPU wheel lying on this machine's disk (its find-links).
    _log(f"installing torch=={PEER_TORCH} (CPU) into {venv}")
    subprocess.run(pip + [f"torch=={PEER_TORCH}"], check=True)
    # Everything else against a constraints file pinning torch: no dependency may upgrade it
    # (an unpinned torch would be a multi-GB CUDA build).
    constraints = os.path.join(venv, "peer-constraints.txt")
    with open(constraints, "w") as f:
      f.write(f"torch=={PEER_TORCH}\n")
    _log(f"installing {' '.join(PEER_PACKAGES)} (torch pinned by {constraints})")
    subprocess.run(pip + ["-c", constraints, *PEER_PACKAGES], check=True)
    check = ("import json, torch, transformers, llmcompressor, compressed_tensors; "
             "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
             "'llmcompressor': llmcompressor.__version__, 'transformers': "
             "transformers.__version__, 'compressed_tensors': compressed_tensors.__version__}))")
    out = subprocess.run([py, "-c", check], check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise RuntimeError(f"could not build the peer venv {venv}: {e}") from e
  versions = json.loads(out.strip().splitlines()[-1])
  if versions["cuda"] is not None or versions["torch"].split("+")[0] != PEER_TORCH:
    raise RuntimeError(f"peer venv {venv}: expected the CPU build of torch {PEER_TORCH}, got "
                       f"{versions}")
  info = {"key": key, "install_s": time.perf_counter() - t0, "size_mb": _du_mb(venv),
          "versions": versions}
  with open(stamp, "w") as f:
    json.dump(info, f)
  _log(f"peer venv ready in {info['install_s']:.0f} s, {info['size_mb']:.0f} MiB: {versions}")
  return {**info, "installed": True}


# ------------------------------------------------------------------------------------------
# Our job's config and its command line (one list of overrides feeds both).
# ------------------------------------------------------------------------------------------


def _suffix(args):
  """What the records' method names add for ``--precision``."""
  return "" if args.precision == "float32" else " bf16"


def job_overrides(method, args, hf_dir, results_file):
  """``(config overrides, method kwargs)`` of our compress job for ``method``."""
  spec = METHODS[method]
  over = {
      "model": hf_dir,
      "data.dir": args.data_dir or "",
      "data.seq_len": args.seq_len,
      "data.num_eval_windows": args.num_eval_windows,
      "calibration.num_windows": args.num_windows,
      "calibration.seq_len": args.seq_len,
      "calibration.seed": args.seed,
      "calibration.mode": "sequential",
      "calibration.matmul_dtype": args.precision,
      "compression.name": spec["name"] + _suffix(args).replace(" ", "-"),
      "eval_before": False,
      "output_dir": "",
      "results_file": results_file,
  }
  return over, dict(spec["kwargs"])


def compress_command(method, over, kwargs):
  cmd = [OUR_PYTHON, "-m", "compressjax.cli", "compress", "--config",
         os.path.join(ROOT, "configs", METHODS[method]["config"] + ".py")]
  cmd += [f"--config.{k}={v}" for k, v in over.items()]
  cmd += [f"--config.compression.kwargs.{k}={v!r}" for k, v in kwargs.items()]
  return cmd


def load_job_config(method, over, kwargs):
  """Our compress job's config, built as the CLI builds it (imports compressjax)."""
  import importlib  # pylint: disable=g-import-not-at-top
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from compressjax import cli  # pylint: disable=g-import-not-at-top
  cfg = importlib.import_module(f"configs.{METHODS[method]['config']}").get_config()
  for key, value in over.items():
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cli.apply_method_args(cfg, [("kwargs", None, k, v) for k, v in kwargs.items()])


# ------------------------------------------------------------------------------------------
# Stages run in our venv (subprocesses of this script).
# ------------------------------------------------------------------------------------------


def stage_prepare(spec):
  """Writes the float32 HF checkpoint and each method's calibration windows; returns facts."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from compressjax import pipeline  # pylint: disable=g-import-not-at-top
  from compressjax.io import load_model, resolve_model_path  # pylint: disable=g-import-not-at-top
  from compressjax.io.hf import save_hf  # pylint: disable=g-import-not-at-top

  kind, path = resolve_model_path(spec["model"])
  model, src_tok = load_model(spec["model"])
  hf_dir = spec["hf_dir"]
  save_hf(hf_dir, model.cfg, model, src_tok, dtype="float32", overwrite=True)
  del model
  model, tok = load_model(hf_dir)  # the tokenizer every side reads
  out = {"source": {"ref": spec["model"], "kind": kind, "path": path}, "hf_dir": hf_dir,
         "model_config": pipeline.model_config_dict(model.cfg), "windows": {},
         "commit": pipeline.git_commit(), "machine": pipeline.machine_info()}
  max_pos = model.cfg.max_position_embeddings
  for method, (over, kwargs) in spec["jobs"].items():
    cfg = load_job_config(method, over, kwargs)
    w = pipeline.calibration_windows_for(tok, cfg, max_pos)
    w_src = pipeline.calibration_windows_for(src_tok, cfg, max_pos)
    if not np.array_equal(w, w_src):
      raise RuntimeError("the written checkpoint's tokenizer draws other calibration windows "
                         "than the source model's")
    pipeline.eval_windows_for(tok, cfg.data, max_pos)  # fails now, not after the long work
    fname = os.path.join(spec["work_dir"], f"cal_{method}.npy")
    np.save(fname, w.astype(np.int32))
    out["windows"][method] = {"path": fname, "shape": list(w.shape),
                              "sha256": hashlib.sha256(w.astype(np.int32).tobytes()).hexdigest()}
  return out


def _weights_check(params, group_size=64):
  """Distinct values per group of ``group_size`` inputs and zero fraction of every kernel."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from compressjax.transforms import LINEAR_KERNELS  # pylint: disable=g-import-not-at-top
  from compressjax.transforms.selection import as_predicate, leaves_with_paths  # pylint: disable=g-import-not-at-top
  pred = as_predicate(LINEAR_KERNELS)
  most, zeros, total, n = 0, 0, 0, 0
  for path, leaf in leaves_with_paths(params):
    if not pred(path, leaf):
      continue
    w = np.asarray(leaf, dtype=np.float32)
    k, m = w.shape
    g = np.sort(w[: k - k % group_size].reshape(k // group_size, group_size, m), axis=1)
    most = max(most, int((1 + (np.diff(g, axis=1) != 0).sum(axis=1)).max()))
    zeros += int((w == 0).sum())
    total += w.size
    n += 1
  return {"kernels": n, "max_distinct_per_group": most, "zero_fraction": zeros / total,
          "linear_params": total}


def stage_eval(spec):
  """Our evaluator on a (peer's) HF checkpoint: the standard protocol's perplexities."""
  import jax  # pylint: disable=g-import-not-at-top
  from compressjax import pipeline  # pylint: disable=g-import-not-at-top
  from compressjax.io import load_model, model_params  # pylint: disable=g-import-not-at-top
  cfg = load_job_config(spec["method"], *spec["job"])
  t0 = time.perf_counter()
  model, tok = load_model(spec["model"])
  load_s = time.perf_counter() - t0
  check = _weights_check(jax.device_get(model_params(model)),
                         METHODS[spec["method"]]["kwargs"].get("group_size", 64))
  windows = pipeline.eval_windows_for(tok, cfg.data, model.cfg.max_position_embeddings)
  res = pipeline._eval_all(model, windows, cfg.data.batch_size, spec["label"])  # pylint: disable=protected-access
  return {"eval": {c: {k: r[k] for k in ("ppl", "nll", "tokens_per_s")} for c, r in res.items()},
          "weights_check": check, "load_s": load_s,
          "protocol": {"seq_len": cfg.data.seq_len, "num_eval_windows": cfg.data.num_eval_windows,
                       "corpora": list(cfg.data.corpora), "batch_size": cfg.data.batch_size},
          "peak_rss_mb": pipeline.peak_rss_mb()}


def _run_stage(name, spec, work_dir):
  spec_file = os.path.join(work_dir, f"{name}_{secrets.token_hex(4)}.json")
  out_file = spec_file + ".out"
  with open(spec_file, "w") as f:
    json.dump(spec, f)
  _log(f"stage {name} ({OUR_PYTHON})")
  subprocess.run([OUR_PYTHON, os.path.abspath(__file__), f"_{name}", spec_file, out_file],
                 check=True, cwd=ROOT)
  with open(out_file) as f:
    out = json.load(f)
  os.remove(spec_file)
  os.remove(out_file)
  return out


def _stage_main(argv):
  name, spec_file, out_file = argv[1][1:], argv[2], argv[3]
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as compressjax/cli.py
  sys.path.insert(0, ROOT)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  with open(spec_file) as f:
    spec = json.load(f)
  out = {"prepare": stage_prepare, "eval": stage_eval}[name](spec)
  with open(out_file, "w") as f:
    json.dump(out, f)


# ------------------------------------------------------------------------------------------
# The two sides.
# ------------------------------------------------------------------------------------------


def _tee(cmd, log_path, env=None):
  """Runs ``cmd``, writing its output to ``log_path`` and (less per-module chatter) to stdout."""
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=env, bufsize=1)
    for line in proc.stdout:
      log.write(line)
      if not any(q in line for q in _QUIET):
        sys.stdout.write(line)
        sys.stdout.flush()
    rc = proc.wait()
  if rc:
    raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with exit status {rc}; log: {log_path}")


def run_peer(method, args, prep, venv_info, job):
  spec = METHODS[method]
  work = args.work_dir
  out_dir = os.path.join(work, f"peer_{method}")
  report = os.path.join(work, f"peer_{method}.json")
  cmd = [_venv_python(args.peer_venv), os.path.join(HERE, "peer_worker.py"), "--method", method,
         "--model", prep["hf_dir"], "--windows", prep["windows"][method]["path"], "--out",
         out_dir, "--report", report, "--batch-size", str(args.peer_batch_size),
         "--dtype", args.precision,
         "--settings", json.dumps(spec["kwargs"])]
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPENBLAS_NUM_THREADS")}
  _log(f"peer {method}: {' '.join(cmd)}")
  _tee(cmd, os.path.join(work, f"peer_{method}.log"), env=env)
  with open(report) as f:
    rep = json.load(f)
  ev = _run_stage("eval", {"method": method, "job": job, "model": out_dir,
                           "label": spec["peer"]}, work)
  check, wc, kw = rep["check"], ev["weights_check"], spec["kwargs"]
  if method == "gptq":
    bits = kw["bits"] + 16 / kw["group_size"]
    basis = (f"compressed-tensors pack-quantized: {kw['bits']}-bit codes + one float16 scale per "
             f"group of {kw['group_size']} inputs (symmetric: no zero point); the scales are "
             "float16 (scale_dtype)")
    ok = check["on_grid"] and wc["max_distinct_per_group"] <= 2 ** kw["bits"]
  else:
    bits = 1 + 16 * (1 - wc["zero_fraction"])
    basis = ("compressed-tensors sparse-bitmask with 16-bit kept values: 1 mask bit per weight "
             "+ 16 bits per kept weight (row offsets not counted); the peer ran in "
             f"{args.precision}, so its kept values are {args.precision}"
             + (", not rounded to 16 bits" if args.precision == "float32" else ""))
    ok = check["sparse"] and wc["zero_fraction"] >= kw["sparsity"]
  if not ok:
    raise RuntimeError(f"peer {method}: weights fail the check: worker {check}, evaluator {wc}")
  return {
      "method": spec["peer"] + _suffix(args), "side": "peer", "settings": rep["settings"],
      "bits_per_param": bits, "bits_per_param_basis": basis,
      "stored_as": "dense float32 safetensors (the fake-quantized / pruned weights after "
                   "oneshot), 32 bits per parameter, evaluated by compressjax",
      "stored_bits_per_param": 32.0,
      "ppl_wiki": ev["eval"].get("wiki", {}).get("ppl"),
      "ppl_austen": ev["eval"].get("austen", {}).get("ppl"),
      "nll": {c: r["nll"] for c, r in ev["eval"].items()},
      "eval_tokens_per_s": {c: r["tokens_per_s"] for c, r in ev["eval"].items()},
      "protocol": ev["protocol"],
      "wall_s": rep["oneshot_s"], "load_s": rep["load_s"],
      "peak_rss_mb": rep["peak_rss_mb"],
      "peak_rss_after_oneshot_mb": rep["peak_rss_after_oneshot_mb"],
      "ru_maxrss_mb": rep["ru_maxrss_mb"],
      "weights_check": {"worker": check, "evaluator": wc},
      "peer_versions": rep["versions"],
      "peer_venv": {"size_mb": venv_info["size_mb"], "install_s": venv_info["install_s"]},
      "checkpoint": out_dir,
      "notes": "wall_s: llmcompressor.oneshot alone (its dataset preparation, model tracing, "
               "sequential calibration and compression); peak RSS: VmHWM of the worker process "
               "(peak_rss_mb at exit, after writing the dense checkpoint)",
  }


def run_ours(method, args, over, kwargs):
  spec = METHODS[method]
  results = over["results_file"]
  if os.path.exists(results):
    os.remove(results)
  cmd = compress_command(method, over, kwargs)
  _log(f"ours {method}: {' '.join(cmd)}")
  _tee(cmd, os.path.join(args.work_dir, f"ours_{method}.log"))
  with open(results) as f:
    rec = json.loads(f.read().strip().splitlines()[-1])
  out = {k: rec.get(k) for k in (
      "settings", "bits_per_param", "linear_params", "model_bytes", "linear_bytes",
      "other_bytes", "ppl_wiki", "ppl_austen", "nll", "eval_tokens_per_s", "protocol",
      "calibration", "wall_s", "load_s", "total_wall_s", "peak_rss_mb", "commit", "machine")}
  out.update(method=spec["ours"] + _suffix(args), side="ours", our_method=rec["method"],
             bits_per_param_basis="counted from the stored compressed leaves (accounting."
                                  "size_report): codes + scales / float16 kept values + mask",
             command=" ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c
                              for c in cmd[1:]),
             notes="wall_s: calibration + compression (jit compiles included), evaluation "
                   "excluded; peak_rss_mb: the whole compress process (getrusage), evaluation "
                   "included")
  return out


# ------------------------------------------------------------------------------------------
# Main.
# ------------------------------------------------------------------------------------------


def _csv(value, allowed, what):
  items = [v.strip() for v in value.split(",") if v.strip()]
  bad = [v for v in items if v not in allowed]
  if bad or not items:
    raise SystemExit(f"bench_peer: --{what} {value!r}: expected a comma-separated subset of "
                     f"{','.join(allowed)}")
  return items


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--methods", default="gptq,sparsegpt", help="subset of gptq,sparsegpt")
  ap.add_argument("--sides", default="peer,ours", help="subset of peer,ours (run in this order)")
  ap.add_argument("--model", default="smollm2-135m-instruct",
                  help="the reference name, a .gguf file or a Hugging Face checkpoint directory")
  ap.add_argument("--data-dir", default="", help="corpora directory (default ../shared/data)")
  ap.add_argument("--num-windows", type=int, default=STANDARD["num_windows"],
                  help="calibration windows")
  ap.add_argument("--seq-len", type=int, default=STANDARD["seq_len"],
                  help="tokens per calibration and evaluation window")
  ap.add_argument("--seed", type=int, default=0,
                  help="seed of the calibration windows' draw (the standard protocol's is 0)")
  ap.add_argument("--num-eval-windows", type=int, default=STANDARD["num_eval_windows"],
                  help="evaluation windows per corpus")
  ap.add_argument("--results", default=None,
                  help=f"JSON-lines file to append to (default {os.path.relpath(STANDARD_RESULTS, ROOT)}"
                       " for the standard protocol, else <work-dir>/bench_peer.jsonl)")
  ap.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                  help="checkpoints, windows and logs (default runs/bench_peer)")
  ap.add_argument("--peer-venv", default=DEFAULT_PEER_VENV, help="the peer's virtual environment")
  ap.add_argument("--peer-batch-size", type=int, default=8,
                  help="oneshot calibration batch size (our calibration.batch_size is 8)")
  ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                  help="matmul precision of both sides' calibration (see the docstring)")
  ap.add_argument("--setup-only", action="store_true", help="only build the peer's venv")
  args = ap.parse_args(argv)
  methods = _csv(args.methods, tuple(METHODS), "methods")
  sides = _csv(args.sides, ("peer", "ours"), "sides")
  args.peer_venv = os.path.abspath(args.peer_venv)
  args.work_dir = os.path.abspath(args.work_dir)
  if args.model != "smollm2-135m-instruct" and os.path.exists(args.model):
    args.model = os.path.abspath(args.model)
  if args.data_dir:
    args.data_dir = os.path.abspath(args.data_dir)
  standard = (not args.data_dir and args.seed == 0
              and args.num_windows == STANDARD["num_windows"]
              and args.seq_len == STANDARD["seq_len"]
              and args.num_eval_windows == STANDARD["num_eval_windows"])
  results = os.path.abspath(args.results or (
      STANDARD_RESULTS if standard else os.path.join(args.work_dir, "bench_peer.jsonl")))

  venv_info = ensure_peer_venv(args.peer_venv) if ("peer" in sides or args.setup_only) else None
  if args.setup_only:
    return 0
  os.makedirs(args.work_dir, exist_ok=True)
  hf_dir = os.path.join(args.work_dir, "model")
  jobs = {m: job_overrides(m, args, hf_dir, os.path.join(args.work_dir, f"ours_{m}.jsonl"))
          for m in methods}
  t0 = time.perf_counter()
  prep = _run_stage("prepare", {"model": args.model, "hf_dir": hf_dir, "work_dir": args.work_dir,
                                "jobs": jobs}, args.work_dir)
  _log(f"prepared {hf_dir} and windows {[w['shape'] for w in prep['windows'].values()]} in "
       f"{time.perf_counter() - t0:.0f} s")

  records = []
  for method in methods:
    pair = (datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            + f"-{method}-{secrets.token_hex(3)}")
    common = {
        "pair": pair, "benchmark": "bench_peer", "model": args.model,
        "calibration_windows": prep["windows"][method],
        "peer_versions": venv_info["versions"] if venv_info else None,
    }
    for side in sides:
      _log(f"=== {method}: {side} ===")
      if side == "peer":
        rec = run_peer(method, args, prep, venv_info, list(jobs[method]))
        rec["calibration"] = {"num_windows": args.num_windows, "seq_len": args.seq_len,
                              "seed": args.seed,
                              "source": "windows drawn by compressjax (see calibration_windows)",
                              "mode": "llm-compressor sequential pipeline (propagates the "
                                      "compressed layers' outputs)"}
        rec["commit"], rec["machine"] = prep["commit"], prep["machine"]
      else:
        rec = run_ours(method, args, *jobs[method])
      rec.update(common)
      rec["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
      os.makedirs(os.path.dirname(results), exist_ok=True)
      with open(results, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
      records.append(rec)
      _log(f"{rec['method']}: wiki {rec['ppl_wiki']}, austen {rec['ppl_austen']}, "
           f"{rec['wall_s']:.1f} s, peak {rec['peak_rss_mb']:.0f} MiB -> {results}")

  sys.path.insert(0, ROOT)
  from compressjax import pipeline  # pylint: disable=g-import-not-at-top  # after all measurements
  rows = [[r["pair"], r["method"], r["bits_per_param"], r["ppl_wiki"], r["ppl_austen"],
           r["wall_s"], r["peak_rss_mb"], r.get("peak_rss_after_oneshot_mb") or "-"]
          for r in records]
  print()
  print(pipeline.format_table(["pair", "method", "bits/param", "ppl wiki", "ppl austen",
                               "compress s", "peak RSS MiB", "peak RSS after oneshot MiB"], rows))
  print(f"records appended to {results}")
  return 0


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] in ("_prepare", "_eval"):
    _stage_main(sys.argv)
  else:
    sys.exit(main())
