"""Forward throughput (tokens/s) of our jitted model vs transformers' PyTorch Llama, same CPU.

  python experiments/bench_throughput.py                       # batch 1 and 4 x 512, 5 reps
  python experiments/bench_throughput.py --batch 4 --seq-len 512 --reps 3

The reference model is loaded once from its GGUF and written with ``save_hf`` to a temporary
Hugging Face directory; then every (implementation, batch, seq_len) is measured in a fresh
subprocess (so ``peak_rss_mb``, read from ``VmHWM``, is that measurement's own high-water mark,
and the two frameworks' thread pools never compete) that loads that directory:
``compressjax.io.load_model`` for ours (``jax.jit`` of the whole forward, float32) and
``LlamaForCausalLM.from_pretrained`` for transformers (float32, ``torch.inference_mode()``,
``torch.set_num_threads(os.cpu_count())``, ``use_cache=False``). Both compute the full
``(batch, seq_len, vocab)`` logits of the same random tokens. After ``--warmup`` untimed calls
(for JAX the first one compiles), ``--reps`` calls are timed; ``tokens_per_s`` uses the median
call. One JSON record per measurement is appended to ``experiments/results/bench_throughput.jsonl``
and a table is printed.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("compressjax-jax", "transformers-torch")


def _peak_rss_mb():
  """Peak RSS of this process in MiB.

  ``/proc/self/status`` ``VmHWM`` where available: on Linux ``getrusage().ru_maxrss`` survives
  ``fork``+``exec``, so in a worker it would report the parent's peak if that was larger.
  """
  from compressjax.engine_profile import _hwm_mb  # pylint: disable=g-import-not-at-top,protected-access
  hwm = _hwm_mb()
  if hwm is not None:
    return hwm
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_calls(fn, warmup, reps):
  t0 = time.perf_counter()
  for _ in range(warmup):
    fn()
  warmup_s = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return warmup_s, times


def worker(args):
  """Measures one configuration in this process; prints one JSON record on the last line."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch[0], args.seq_len[0]))
  t_load = time.perf_counter()
  if args.worker == "compressjax-jax":
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from compressjax.io import load_model  # pylint: disable=g-import-not-at-top

    model, _ = load_model(args.hf_dir)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    x = jax.numpy.asarray(tokens, jax.numpy.int32)
    load_s = time.perf_counter() - t_load
    warmup_s, times = _time_calls(lambda: fwd(state, x).block_until_ready(), args.warmup, args.reps)
    extra = {"jax_backend": jax.default_backend()}
  else:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(os.cpu_count())
    transformers.utils.logging.disable_progress_bar()
    model = transformers.LlamaForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    x = torch.as_tensor(tokens, dtype=torch.long)
    load_s = time.perf_counter() - t_load

    def call():
      with torch.inference_mode():
        return model(x, use_cache=False).logits

    warmup_s, times = _time_calls(call, args.warmup, args.reps)
    attn = model.config._attn_implementation  # pylint: disable=protected-access
    extra = {"torch_threads": torch.get_num_threads(), "attn_implementation": attn}
  med = statistics.median(times)
  print(json.dumps({
      "load_s": load_s, "warmup_s": warmup_s, "times_s": times, "median_s": med,
      "tokens_per_s": tokens.size / med, "peak_rss_mb": _peak_rss_mb(), **extra}))


def machine_string():
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from compressjax import pipeline  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top

  return (f"{pipeline.machine_info()}; torch {torch.__version__}; transformers "
          f"{transformers.__version__}; {platform.platform()}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes")
  ap.add_argument("--seq-len", type=int, nargs="+", default=[512], help="sequence lengths")
  ap.add_argument("--reps", type=int, default=5, help="timed forward calls per measurement")
  ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (JAX compiles)")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--model", default="smollm2-135m-instruct",
                  help="a .gguf file, HF directory or 'smollm2-135m-instruct'")
  ap.add_argument("--results",
                  default=os.path.join(ROOT, "experiments/results/bench_throughput.jsonl"),
                  help="JSON-lines file to append to ('' to skip)")
  ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
  ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
  ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    worker(args)
    return

  from compressjax import pipeline  # pylint: disable=g-import-not-at-top
  from compressjax.io import hf, resolve_model_path, save_hf  # pylint: disable=g-import-not-at-top
  from compressjax.io.gguf import load_gguf  # pylint: disable=g-import-not-at-top

  methods = args.methods.split(",")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    kind, path = resolve_model_path(args.model)
    if kind == "gguf":
      cfg, params, tok = load_gguf(path)
      hf_dir = save_hf(os.path.join(tmp, "hf"), cfg, params, tok)
      del params
    else:
      hf_dir = path
      with open(os.path.join(path, "config.json")) as f:
        cfg = hf.config_from_hf(json.load(f))
    machine, commit = machine_string(), pipeline.git_commit()
    for seq_len in args.seq_len:
      for batch in args.batch:
        for method in methods:
          cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--hf-dir", hf_dir,
                 "--vocab", str(cfg.vocab_size), "--batch", str(batch), "--seq-len", str(seq_len),
                 "--reps", str(args.reps), "--warmup", str(args.warmup)]
          load_before = os.getloadavg()[0]
          t0 = time.time()
          proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
          if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise RuntimeError(f"{method} batch={batch} seq_len={seq_len} failed")
          res = json.loads(proc.stdout.strip().splitlines()[-1])
          record = {
              "benchmark": "bench_throughput",
              "method": method,
              "settings": {"batch": batch, "seq_len": seq_len, "dtype": "float32",
                           "model": args.model},
              "bits_per_param": 32,
              "ppl_wiki": None,
              "ppl_austen": None,
              "tokens_per_s": res["tokens_per_s"],
              "wall_s": res["median_s"],
              "times_s": res["times_s"],
              "reps": args.reps,
              "warmup": args.warmup,
              "warmup_s": res["warmup_s"],
              "load_s": res["load_s"],
              "process_wall_s": time.time() - t0,
              # other processes on the machine: 1-minute load averages around the measurement
              "load_avg_1m": [load_before, os.getloadavg()[0]],
              "peak_rss_mb": res["peak_rss_mb"],
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": commit,
              "machine": machine,
              **{k: res[k] for k in ("jax_backend", "torch_threads", "attn_implementation")
                 if k in res},
          }
          if args.results:
            pipeline.append_record(args.results, record)
          rows.append([method, batch, seq_len, res["tokens_per_s"], res["median_s"],
                       min(res["times_s"]), res["warmup_s"], res["peak_rss_mb"]])
          print(f"{method:20s} batch={batch} seq_len={seq_len}: {res['tokens_per_s']:.0f} tokens/s",
                flush=True)
  print()
  print(pipeline.format_table(["implementation", "batch", "seq len", "tokens/s", "median s",
                               "min s", "warmup s", "peak RSS MiB"], rows))
  print(f"\n{machine}; commit {commit}")


if __name__ == "__main__":
  main()
