"""Bisects a mismatch between llama.cpp and our ggml emulation on small GGUF files.

  python experiments/bisect_ggml.py --layers 1 --grid q4_1 --quant attn_q --out-dir /tmp/bisect \\
      --llama-python /work/venv-llamacpp-rt/bin/python --llama-pythonpath /work/llamacpp-py

Exports the reference model truncated to ``--layers`` blocks, dense (F32) except the linear
kinds listed in ``--quant`` (``attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down`` or
``all``), which are round-to-nearest quantized onto ``--grid``; runs llama.cpp on a prompt
(logits of every prompt position, batched as llama.cpp does) and our model three ways: plain,
ggml-emulated token by token with an F16 KV cache, and ggml-emulated on the whole prompt at once
(no cache; the attention still rounds K/V/Q/probabilities to F16). Prints the max |diff| of the
logits per position for each.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = {"attn_q": ("attn", "q_proj"), "attn_k": ("attn", "k_proj"), "attn_v": ("attn", "v_proj"),
         "attn_output": ("attn", "o_proj"), "ffn_gate": ("mlp", "gate_proj"),
         "ffn_up": ("mlp", "up_proj"), "ffn_down": ("mlp", "down_proj")}
GRIDS = {"q4_1": (4, False), "q4_0": (4, True), "q8_0": (8, True)}
PROMPTS = ("The capital of France is", "def fibonacci(n):\n")


def _llama_side(job: str) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from llama_cpp import Llama  # pylint: disable=g-import-not-at-top

  spec = json.load(open(job))
  dumps = {}
  if spec.get("dump"):
    _install_dump(dumps)
  llm = Llama(model_path=spec["gguf"], n_ctx=256, n_threads=spec.get("threads", 2),
              n_batch=spec.get("n_batch", 512), n_ubatch=spec.get("n_batch", 512), verbose=False,
              logits_all=True)
  llm.reset()
  ids = spec["ids"]
  if spec.get("one_by_one"):
    for t in ids:
      llm.eval([t])
  else:
    llm.eval(ids)
  np.save(spec["result"], np.asarray(llm.scores[:len(ids)], np.float32))
  if spec.get("dump"):
    np.savez(spec["dump"], **dumps)


class _Tensor(ctypes.Structure):
  """``struct ggml_tensor`` (ggml.h of the vendored llama.cpp: 4 dims, 10 srcs, 64-byte names)."""
  _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
              ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
              ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
              ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
              ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _install_dump(dumps):
  """Makes every new llama.cpp context copy each computed F32 tensor into ``dumps`` (name ->
  array in ggml's ``ne`` order reversed, i.e. numpy row-major), numbered when names repeat."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import llama_cpp.llama_cpp as lc  # pylint: disable=g-import-not-at-top

  def cb(t, ask, _):
    t = ctypes.cast(t, ctypes.POINTER(_Tensor)).contents
    if ask:
      return True
    if t.type == 0 and t.data:
      ne, nb = list(t.ne), list(t.nb)
      span = sum((n - 1) * b for n, b in zip(ne, nb)) + 4
      buf = (ctypes.c_char * span).from_address(t.data)
      arr = np.lib.stride_tricks.as_strided(np.frombuffer(buf, np.float32), ne[::-1], nb[::-1])
      name = t.name.decode()
      key, i = name, 0
      while key in dumps:
        i += 1
        key = f"{name}#{i}"
      dumps[key] = np.array(arr)
    return True

  fn = lc.ggml_backend_sched_eval_callback(cb)
  orig = lc.llama_context_default_params

  def params():
    p = orig()
    p.cb_eval = fn
    return p

  lc.llama_context_default_params = params
  _install_dump.keep = (fn, orig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=1)
  ap.add_argument("--grid", default="q4_1", choices=sorted(GRIDS))
  ap.add_argument("--quant", default="all", help="comma list of linear kinds to quantize")
  ap.add_argument("--prompt", type=int, default=0)
  ap.add_argument("--one-by-one", action="store_true", help="llama.cpp evaluates one token a call")
  ap.add_argument("--dump", action="store_true", help="save llama.cpp's F32 intermediates")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--out-dir", default="/tmp/bisect_ggml")
  ap.add_argument("--llama-python", default="/work/venv-llamacpp-rt/bin/python")
  ap.add_argument("--llama-pythonpath", default="/work/llamacpp-py")
  ap.add_argument("--llama-job", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.llama_job:
    _llama_side(a.llama_job)
    return 0

  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from compressjax.io import build_model, ggml_emulate, gguf  # pylint: disable=g-import-not-at-top
  from compressjax.model import init_cache  # pylint: disable=g-import-not-at-top
  from compressjax.quantize.rtn_core import quantize_rtn  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from check_llamacpp import ggml_model  # pylint: disable=g-import-not-at-top

  os.makedirs(a.out_dir, exist_ok=True)
  src = gguf.reference_model_path()
  cfg, params, tok = gguf.load_gguf(src)
  cfg = dataclasses.replace(cfg, num_layers=a.layers)
  params = dict(params)
  params["layers"] = {k: v for k, v in params["layers"].items() if int(k) < a.layers}
  kinds = (list(KINDS) if a.quant == "all" else [] if a.quant == "none" else
           [q for q in a.quant.split(",") if q])
  bits, sym = GRIDS[a.grid]
  for layer in params["layers"].values():
    for kind in kinds:
      grp, name = KINDS[kind]
      leaf = layer[grp][name]
      leaf["kernel"] = quantize_rtn(jnp.asarray(leaf["kernel"]), bits=bits, group_size=32,
                                    symmetric=sym, scale_dtype=jnp.float16)
  tag = f"L{a.layers}-{a.grid}-{'+'.join(kinds) or 'none'}"
  out = os.path.join(a.out_dir, f"{tag}.gguf")
  written = gguf.export_gguf(params, cfg, src, out, types="auto")
  ids = tok.encode(PROMPTS[a.prompt], add_special_tokens=False).ids
  job = os.path.join(a.out_dir, f"job-{tag}.json")
  res = os.path.join(a.out_dir, f"llama-{tag}{'-1by1' if a.one_by_one else ''}.npy")
  dump = os.path.join(a.out_dir, f"dump-{tag}.npz") if a.dump else None
  json.dump({"gguf": out, "ids": ids, "result": res, "one_by_one": a.one_by_one,
             "threads": a.threads, "dump": dump}, open(job, "w"))
  env = dict(os.environ, PYTHONPATH=a.llama_pythonpath)
  r = subprocess.run([a.llama_python, os.path.abspath(__file__), "--llama-job", job],
                     capture_output=True, text=True, env=env)
  if r.returncode:
    print(r.stderr[-3000:])
    return 1
  theirs = np.load(res)

  plain = np.asarray(build_model(cfg, params)(jnp.asarray([ids], jnp.int32))[0])
  gm = ggml_model(cfg, params, out)
  with ggml_emulate.emulate_attention():
    whole = np.asarray(gm(jnp.asarray([ids], jnp.int32))[0])
    cache = init_cache(gm.cfg, 1, 64, dtype=jnp.float16)
    steps = []
    for t in ids:
      lg, cache = gm(jnp.asarray([[t]], jnp.int32), cache)
      steps.append(np.asarray(lg[0, -1]))
  steps = np.stack(steps)
  types = sorted(set(written.values()))
  print(f"{tag} types {types} prompt {a.prompt} ({len(ids)} tokens), logit scale "
        f"{np.abs(theirs).max():.3g}")
  for name, ours in (("plain", plain), ("emulated, cache", steps), ("emulated, whole", whole)):
    d = np.abs(ours - theirs).max(-1)
    print(f"  {name:16s} max|diff| per position: " + " ".join(f"{x:.2e}" for x in d))
  np.save(os.path.join(a.out_dir, f"ours-{tag}.npy"), steps)
  del jax
  return 0


if __name__ == "__main__":
  sys.exit(main())
