"""llama.cpp loads our GGUF exports of the reference model and generates the same greedy tokens.

  python experiments/check_llamacpp.py --llama-python /work/venv-llamacpp/bin/python \\
      --grids keep,q4_1,q4_0,q8_0 --new-tokens 32 --out-dir /tmp/gguf_check

For each grid (see ``experiments/export_gguf.py``) this exports the reference model with
:func:`compressjax.io.gguf.export_gguf`, generates greedily with compressjax
(:func:`compressjax.generate.generate`, float32) and, in a second interpreter that has
``llama-cpp-python`` (it builds llama.cpp from source; keep it in its own venv), with llama.cpp
from the exported file; then compares the token ids and the first step's logits. For ``keep`` it
also checks that the exported tensors are byte-identical to the source file's, and measures the
logits of the exactly-imported quantized model against the dequantized load on real text.
llama.cpp quantizes activations to 8 bits inside its quantized matmuls (Q8_0/Q8_1 vec-dot), so
its logits differ from ours by a little; greedy tokens may part at near-ties, which is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ("The capital of France is", "def fibonacci(n):\n",
           "<|im_start|>user\nWhat is the tallest mountain on Earth?<|im_end|>\n<|im_start|>assistant\n")


def _llama_side(job: str) -> None:
  """Runs in the llama-cpp-python interpreter: greedy tokens + first logits per prompt."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from llama_cpp import Llama  # pylint: disable=g-import-not-at-top

  spec = json.load(open(job))
  llm = Llama(model_path=spec["gguf"], n_ctx=512, n_threads=2, n_batch=512, verbose=False,
              logits_all=True)  # scores are only kept with logits_all
  res = []
  for ids in spec["prompts"]:
    llm.reset()
    llm.eval(ids)
    first = np.asarray(llm.scores[llm.n_tokens - 1], np.float32)
    out = []
    for _ in range(spec["new_tokens"]):
      tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
      out.append(tok)
      llm.eval([tok])
    res.append({"tokens": out, "first_logits": first.tolist()})
  json.dump(res, open(spec["result"], "w"))


def _compare(a, grid, out, prompts, ours, ours_first, kinds, tok, t0) -> bool:
  """Runs llama.cpp on ``out`` in the other interpreter and compares with our results."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  job = os.path.join(a.out_dir, f"job-{grid}.json")
  res_path = os.path.join(a.out_dir, f"llama-{grid}.json")
  json.dump({"gguf": out, "prompts": prompts, "new_tokens": a.new_tokens, "result": res_path},
            open(job, "w"))
  env = dict(os.environ, PYTHONPATH=a.llama_pythonpath) if a.llama_pythonpath else None
  r = subprocess.run(["nice", "-n", "10", a.llama_python, os.path.abspath(__file__),
                      "--llama-job", job], capture_output=True, text=True, env=env)
  if r.returncode:
    print(f"[{grid}] llama.cpp FAILED to run:\n{r.stderr[-3000:]}")
    return False
  ok = True
  theirs = json.load(open(res_path))
  for i, (o, th, of) in enumerate(zip(ours, theirs, ours_first)):
    lf = np.asarray(th["first_logits"], np.float32)
    agree = next((j for j, (x, y) in enumerate(zip(o, th["tokens"])) if x != y), len(o))
    print(f"[{grid}] types {kinds} prompt {i}: greedy tokens identical for {agree}/{len(o)}; "
          f"first-step logits max|diff| {np.abs(lf - of).max():.3g}; "
          f"ours {tok.decode(o)[:60]!r}" + ("" if agree == len(o) else
                                            f" | llama.cpp {tok.decode(th['tokens'])[:60]!r}"))
    ok &= agree == len(o)
  print(f"[{grid}] {time.time() - t0:.0f}s")
  return ok


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--llama-python", default="/work/venv-llamacpp/bin/python",
                  help="an interpreter that can import llama_cpp")
  ap.add_argument("--llama-pythonpath", default="",
                  help="PYTHONPATH for it (e.g. a llama_cpp package dir with its built lib/)")
  ap.add_argument("--grids", default="keep,q4_1,q4_0,q8_0")
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--out-dir", default="/tmp/gguf_check")
  ap.add_argument("--ours-only", action="store_true",
                  help="export and generate with compressjax only; results are cached in --out-dir "
                       "and reused by a later run (llama.cpp side only)")
  ap.add_argument("--llama-job", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.llama_job:
    _llama_side(a.llama_job)
    return 0

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from compressjax.generate import generate  # pylint: disable=g-import-not-at-top
  from compressjax.io import build_model, gguf  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from export_gguf import quantized_params  # pylint: disable=g-import-not-at-top

  os.makedirs(a.out_dir, exist_ok=True)
  src = gguf.reference_model_path()
  _, dense, tok = gguf.load_gguf(src)
  prompts = [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
  ok_all = True
  for grid in a.grids.split(","):
    t0 = time.time()
    out = os.path.join(a.out_dir, f"smollm2-{grid}.gguf")
    cache = os.path.join(a.out_dir, f"ours-{grid}.json")
    if os.path.exists(cache) and os.path.exists(out):
      c = json.load(open(cache))
      if c["prompts"] == prompts and c["new_tokens"] == a.new_tokens:
        print(f"[{grid}] reusing compressjax results from {cache}")
        for line in c["log"]:
          print(line)
        ok_all &= c["ok"]
        ours, ours_first, kinds = c["tokens"], [np.asarray(x, np.float32) for x in c["first"]], c["kinds"]
        if not a.ours_only:
          ok_all &= _compare(a, grid, out, prompts, ours, ours_first, kinds, tok, t0)
        continue
    log = []
    cfg, params = quantized_params(src, grid)
    written = gguf.export_gguf(params, cfg, src, out, types="source" if grid == "keep" else "auto")
    kinds = sorted(set(written.values()))
    model = build_model(cfg, params)
    if grid == "keep":
      import gguf as gg  # pylint: disable=g-import-not-at-top
      ra, rb = gg.GGUFReader(src), gg.GGUFReader(out)
      same = all(x.name == y.name and x.tensor_type == y.tensor_type and
                 np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes()
                 for x, y in zip(ra.tensors, rb.tensors)) and len(ra.tensors) == len(rb.tensors)
      whole = open(src, "rb").read() == open(out, "rb").read()
      log.append(f"[keep] import -> export: tensor data byte-identical {same}, whole file "
                 f"byte-identical {whole}")
      ok_all &= same
      ok_same = same
      text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "README.md")).read()[:2000]
      ids = jnp.asarray([tok.encode(text, add_special_tokens=False).ids[:128]], jnp.int32)
      lq = np.asarray(model(ids))
      ld = np.asarray(build_model(cfg, dense)(ids))
      log.append(f"[keep] logits of the imported 4-bit model vs the dequantized load on 128 "
                 f"tokens: max|diff| {np.abs(lq - ld).max():.3g} (logit scale "
                 f"{np.abs(ld).max():.3g}), argmax agreement "
                 f"{np.mean(lq.argmax(-1) == ld.argmax(-1)):.4f}")
    ours = [np.asarray(generate(model, np.asarray(p), a.new_tokens)).tolist() for p in prompts]
    ours_first = [np.asarray(model(jnp.asarray([p], jnp.int32))[0, -1]) for p in prompts]
    for line in log:
      print(line)
    json.dump({"prompts": prompts, "new_tokens": a.new_tokens, "tokens": ours, "log": log,
               "first": [x.tolist() for x in ours_first], "kinds": kinds,
               "ok": bool(ok_same) if grid == "keep" else True}, open(cache, "w"))
    if not a.ours_only:
      ok_all &= _compare(a, grid, out, prompts, ours, ours_first, kinds, tok, t0)
    else:
      print(f"[{grid}] compressjax side done, {time.time() - t0:.0f}s")
  print("ALL IDENTICAL" if ok_all else "SOME DIFFER")
  return 0 if ok_all else 1


if __name__ == "__main__":
  sys.exit(main())
