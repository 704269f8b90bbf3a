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

``--emulate-ggml`` also generates with llama.cpp's CPU arithmetic emulated
(:mod:`compressjax.io.ggml_emulate`: activations quantized per block of 32 inside the quantized
matmuls, the quantized ``token_embd`` as the LM head, an F16 KV cache and F16 attention operands,
and every float op between the matmuls -- RMSNorm, SwiGLU, RoPE, softmax, the dots' FMA lanes --
bit for bit as llama.cpp's x86 AVX2 build computes it)
and reports both comparisons; then the exit status says whether the emulated run agrees on every
token. Results of both sides are cached in ``--out-dir`` (``--rerun-llama`` runs llama.cpp again).

  python experiments/check_llamacpp.py --emulate-ggml \\
      --llama-python /work/venv-llamacpp-rt/bin/python --llama-pythonpath /work/llamacpp-py
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


def _dump_atomic(obj, path: str) -> None:
  """Writes JSON to a temporary sibling and renames it: a killed run leaves no half-written cache."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


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
  _dump_atomic(res, spec["result"])


def _run_llama(a, grid, out, prompts):
  """llama.cpp's greedy tokens and first logits for ``out`` (the other interpreter); results are
  reused when the same job already ran on a file that has not changed since."""
  job = os.path.join(a.out_dir, f"job-{grid}.json")
  res_path = os.path.join(a.out_dir, f"llama-{grid}.json")
  spec = {"gguf": out, "prompts": prompts, "new_tokens": a.new_tokens, "result": res_path}
  if (not a.rerun_llama and os.path.exists(job) and os.path.exists(res_path)
      and json.load(open(job)) == spec and os.path.getmtime(res_path) > os.path.getmtime(out)):
    print(f"[{grid}] reusing llama.cpp results from {res_path}")
    return json.load(open(res_path))
  json.dump(spec, open(job, "w"))
  env = dict(os.environ, PYTHONPATH=a.llama_pythonpath) if a.llama_pythonpath else None
  r = subprocess.run(["nice", "-n", "10", a.llama_python, os.path.abspath(__file__),
                      "--llama-job", job], capture_output=True, text=True, env=env)
  if r.returncode:
    print(f"[{grid}] llama.cpp FAILED to run:\n{r.stderr[-3000:]}")
    return None
  return json.load(open(res_path))


def _report(tag, grid, ours, ours_first, theirs, kinds, tok):
  """Prints the agreement of ``ours`` with llama.cpp's ``theirs``; returns per-prompt rows."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rows = []
  for i, (o, th, of) in enumerate(zip(ours, theirs, ours_first)):
    lf = np.asarray(th["first_logits"], np.float32)
    agree = next((j for j, (x, y) in enumerate(zip(o, th["tokens"])) if x != y), len(o))
    diff = float(np.abs(lf - np.asarray(of, np.float32)).max())
    print(f"[{grid}] {tag}: types {kinds} prompt {i}: greedy tokens identical for "
          f"{agree}/{len(o)}; first-step logits max|diff| {diff:.3g}; "
          f"ours {tok.decode(o)[:60]!r}" + ("" if agree == len(o) else
                                            f" | llama.cpp {tok.decode(th['tokens'])[:60]!r}"))
    rows.append((agree, len(o), diff))
  return rows


def ggml_model(cfg, params, gguf_path):
  """Our model set up to compute as llama.cpp's CPU backend does on ``gguf_path``.

  Quantized linears use ``formats.dot(..., implementation="ggml")``
  (:func:`compressjax.io.ggml_emulate.ggml_dot`); when the file's ``token_embd`` (the tied
  output matrix) is quantized, the LM head becomes that quantized tensor, so its product also
  quantizes the activations. Use with :func:`ggml_generate` (F16 KV cache, emulated attention).
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from compressjax.io import build_model, ggml_emulate, gguf  # pylint: disable=g-import-not-at-top

  ggml_emulate.register()
  cfg = dataclasses.replace(cfg, matmul_implementation="ggml")
  params = dict(params)
  emb = [t for t in gguf._reader(gguf_path).tensors if t.name == "token_embd.weight"]  # pylint: disable=protected-access
  if cfg.tie_word_embeddings and emb and emb[0].tensor_type.name in ("Q8_0", "Q4_0", "Q4_1"):
    cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    params["lm_head"] = {"kernel": gguf._quantized_leaf(emb[0], None)}  # pylint: disable=protected-access
  return build_model(cfg, params)


def ggml_generate(model, prompts, new_tokens):
  """Per prompt: greedy tokens and the first step's logits, with a float16 KV cache and ggml's
  attention (the prompt as one batch, then one compiled one-token step)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from compressjax.io import ggml_emulate  # pylint: disable=g-import-not-at-top
  from compressjax.model import init_cache  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)
  results = []
  with ggml_emulate.emulate_attention():
    @jax.jit
    def step(state, toks, cache):
      logits, cache = nnx.merge(graphdef, state)(toks, cache)
      return logits[:, -1], cache

    max_len = max(128, max(len(p) for p in prompts) + new_tokens)
    for prompt in prompts:
      # Unused cache slots are masked exactly. The prompt goes in as one batch, then one token
      # per step, as llama.cpp evaluates them: its products take other kernels (other summation
      # orders) for one activation row than for several, and the emulation follows the shape.
      cache = init_cache(model.cfg, 1, max_len, dtype=jnp.float16)
      lg, cache = step(state, jnp.asarray([prompt], jnp.int32), cache)
      first = np.asarray(lg[0], np.float32)
      out = []
      for i in range(new_tokens):
        out.append(int(np.argmax(np.asarray(lg[0]))))
        if i + 1 < new_tokens:
          lg, cache = step(state, jnp.asarray([[out[-1]]], jnp.int32), cache)
      results.append((out, first))
  return results


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
  ap.add_argument("--emulate-ggml", action="store_true",
                  help="also generate with llama.cpp's CPU arithmetic emulated (activations "
                       "quantized to Q8_0/Q8_1 in quantized matmuls, F16 KV cache and attention "
                       "operands; compressjax.io.ggml_emulate) and compare that with llama.cpp")
  ap.add_argument("--rerun-llama", action="store_true",
                  help="run llama.cpp again even where its results for the same job are cached")
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
  table = []
  for grid in a.grids.split(","):
    t0 = time.time()
    out = os.path.join(a.out_dir, f"smollm2-{grid}.gguf")
    cache = os.path.join(a.out_dir, f"ours-{grid}.json")
    c = json.load(open(cache)) if os.path.exists(cache) and os.path.exists(out) else None
    params_ = None
    if c is not None and c["prompts"] == prompts and c["new_tokens"] == a.new_tokens:
      print(f"[{grid}] reusing compressjax results from {cache}")
      for line in c["log"]:
        print(line)
      ok_all &= c["ok"]
      ours, ours_first, kinds = c["tokens"], [np.asarray(x, np.float32) for x in c["first"]], c["kinds"]
    else:
      log = []
      cfg, params_ = quantized_params(src, grid)
      written = gguf.export_gguf(params_, cfg, src, out,
                                 types="source" if grid == "keep" else "auto")
      kinds = sorted(set(written.values()))
      model = build_model(cfg, params_)
      ok_same = True
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
      _dump_atomic({"prompts": prompts, "new_tokens": a.new_tokens, "tokens": ours, "log": log,
                    "first": [x.tolist() for x in ours_first], "kinds": kinds,
                    "ok": bool(ok_same)}, cache)
      print(f"[{grid}] compressjax side done, {time.time() - t0:.0f}s")
    emu = None
    if a.emulate_ggml:
      ecache = os.path.join(a.out_dir, f"ours-ggml-{grid}.json")
      e = json.load(open(ecache)) if os.path.exists(ecache) else None
      if (e is not None and e["prompts"] == prompts and e["new_tokens"] == a.new_tokens
          and os.path.getmtime(ecache) > os.path.getmtime(out)):
        print(f"[{grid}] reusing ggml-emulated results from {ecache}")
      else:
        t1 = time.time()
        if params_ is None:
          cfg, params_ = quantized_params(src, grid)
        gm = ggml_model(cfg, params_, out)
        res = ggml_generate(gm, prompts, a.new_tokens)
        e = {"prompts": prompts, "new_tokens": a.new_tokens, "tokens": [r[0] for r in res],
             "first": [r[1].tolist() for r in res]}
        _dump_atomic(e, ecache)
        print(f"[{grid}] ggml-emulated generation done, {time.time() - t1:.0f}s")
      emu = (e["tokens"], [np.asarray(x, np.float32) for x in e["first"]])
    if a.ours_only:
      continue
    theirs = _run_llama(a, grid, out, prompts)
    if theirs is None:
      ok_all = False
      continue
    plain = _report("plain", grid, ours, ours_first, theirs, kinds, tok)
    rows = _report("ggml-emulated", grid, *emu, theirs, kinds, tok) if emu else [None] * len(plain)
    decisive = rows if emu else plain
    ok_all &= all(r[0] == r[1] for r in decisive)
    table += [(grid, i, p, r) for i, (p, r) in enumerate(zip(plain, rows))]
    print(f"[{grid}] {time.time() - t0:.0f}s")
    # Each grid compiles its own programs (a new model per file); dropping them keeps the
    # process under the kernel's memory-map limit (vm.max_map_count 65530: four grids crashed
    # with "LLVM compilation error: Cannot allocate memory" at ~17k maps per grid).
    import gc  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    jax.clear_caches()
    gc.collect()
  if table:
    print("\ngrid   prompt  plain: tokens agreeing, first-step max|diff|   "
          + ("ggml-emulated: tokens agreeing, first-step max|diff|" if a.emulate_ggml else ""))
    for grid, i, p, r in table:
      print(f"{grid:6s} {i:6d}  {p[0]:2d}/{p[1]}  {p[2]:8.3g}" +
            (f"                        {r[0]:2d}/{r[1]}  {r[2]:8.3g}" if r else ""))
  print("ALL IDENTICAL" if ok_all else "SOME DIFFER")
  return 0 if ok_all else 1


if __name__ == "__main__":
  sys.exit(main())
