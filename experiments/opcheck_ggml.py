"""Op-by-op check of the ggml emulation against llama.cpp's own intermediates of one layer.

  python experiments/opcheck_ggml.py /tmp/bisect/dump-L1-....npz /tmp/bisect/L1-....gguf

``experiments/bisect_ggml.py --dump`` saves every F32 tensor llama.cpp computes on a truncated GGUF.
This feeds each op of layer 0 llama.cpp's own inputs (not ours), computes it with
:mod:`compressjax.io.ggml_emulate`, and prints how many elements differ from llama.cpp's output and
by how much, per token row; so the first op that is not bit-exact is found without the errors of
the ops before it. Layouts are llama.cpp's (Q/K rows permuted, RoPE on interleaved pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("dump")
  ap.add_argument("gguf")
  ap.add_argument("--ids", help="the bisect job json (token ids): also checks the embedding rows")
  ap.add_argument("--layers", default="all", help="comma list of layers, or all")
  ap.add_argument("--verbose", action="store_true", help="also print the exact ops")
  a = ap.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from compressjax.io import ggml_emulate as ge  # pylint: disable=g-import-not-at-top
  from compressjax.io import gguf  # pylint: disable=g-import-not-at-top

  d = np.load(a.dump)
  rd = gguf._reader(a.gguf)  # pylint: disable=protected-access
  ts = {t.name: t for t in rd.tensors}
  f = lambda k: rd.fields[k].contents()
  arch = f("general.architecture")
  n_head, n_kv = f(f"{arch}.attention.head_count"), f(f"{arch}.attention.head_count_kv")
  eps = f(f"{arch}.attention.layer_norm_rms_epsilon")
  theta = f(f"{arch}.rope.freq_base")
  n_layer = f(f"{arch}.block_count")
  layers = range(n_layer) if a.layers == "all" else [int(x) for x in a.layers.split(",")]
  total = {"n": 0}

  def w(name):
    t = ts[f"blk.{L}.{name}.weight"]
    if t.tensor_type.name == "F32":
      return jnp.asarray(np.asarray(t.data, np.float32))
    return gguf._quantized_leaf(t, None)  # pylint: disable=protected-access

  def g(k):
    return np.asarray(d[k], np.float32)

  def rows2(x):
    return x.reshape(-1, x.shape[-1])

  def report(name, ours, theirs):
    ours, theirs = np.asarray(ours, np.float32).reshape(theirs.shape), theirs
    bad = ours != theirs
    nb = int(bad.sum())
    total["n"] += nb
    md = float(np.abs(ours - theirs).max()) if nb else 0.0
    if nb or a.verbose:
      print(f"{name:16s} {'EXACT' if nb == 0 else 'DIFF '} {nb}/{bad.size} differ, max|diff| {md:.3g}")
    if nb and theirs.ndim >= 2:
      per = bad.reshape(-1, theirs.shape[-1]).sum(-1)
      print(f"{'':16s} per row: {per.tolist()[:64]}")
    return nb

  def dot(x, wt):
    if isinstance(wt, jax.Array):
      raise ValueError("dense weight")
    return ge.ggml_dot(jnp.asarray(rows2(x)), wt)

  emb0 = rows2(g("embd"))
  T = emb0.shape[0]
  et = ts["token_embd.weight"]
  if et.tensor_type.name != "F32" and a.ids:
    ids = json.load(open(a.ids))["ids"]
    report("embd", np.asarray(gguf._quantized_leaf(et, None).materialize()).T[ids], emb0)  # pylint: disable=protected-access
  for L in layers:
    emb = rows2(g("embd")) if L == 0 else rows2(g(f"l_out-{L - 1}"))
    report(f"L{L} attn_norm", ge.ggml_rms_norm(jnp.asarray(emb), w("attn_norm"), eps), rows2(g(f"attn_norm-{L}")))
    xn = rows2(g(f"attn_norm-{L}"))
    report(f"L{L} Qcur", dot(xn, w("attn_q")), rows2(g(f"Qcur-{L}")))
    report(f"L{L} Kcur", dot(xn, w("attn_k")), rows2(g(f"Kcur-{L}")))
    report(f"L{L} Vcur", dot(xn, w("attn_v")), rows2(g(f"Vcur-{L}")))
    hd = g(f"Qcur-{L}#2").shape[-1]
    cos, sin = ge._rope_table(float(theta), hd, ge.ROPE_POSITIONS)  # pylint: disable=protected-access
    c = jnp.asarray(np.concatenate([cos[:T], cos[:T]], -1))[None]
    s = jnp.asarray(np.concatenate([sin[:T], sin[:T]], -1))[None]

    def rope(x):  # x (T, H, hd) interleaved pairs -> ggml_apply_rope on the half layout -> back
      xh = np.concatenate([x[..., 0::2], x[..., 1::2]], -1)
      y = np.asarray(ge.ggml_apply_rope(jnp.asarray(xh)[None], c, s)[0])
      out = np.empty_like(y)
      out[..., 0::2], out[..., 1::2] = y[..., :hd // 2], y[..., hd // 2:]
      return out

    q = g(f"Qcur-{L}#1")[0]
    k = g(f"Kcur-{L}#1")[0]
    report(f"L{L} rope Q", rope(q), g(f"Qcur-{L}#2")[0])
    report(f"L{L} rope K", rope(k), g(f"Kcur-{L}#2")[0])
    qr, kr = g(f"Qcur-{L}#2")[0], g(f"Kcur-{L}#2")[0]  # (T, H, hd), (T, KV, hd)
    kq = g(f"kq-{L}")[0]  # (H, T, S)
    S = kq.shape[-1]
    grp = n_head // n_kv
    kpad = np.zeros((S, n_kv, hd), np.float32)
    kpad[:T] = kr
    qh = ge._f16(jnp.asarray(qr)).transpose(1, 0, 2)  # (H, T, hd)  pylint: disable=protected-access
    kh = ge._f16(jnp.asarray(kpad)).transpose(1, 0, 2)[np.arange(n_head) // grp]  # (H, S, hd)  pylint: disable=protected-access
    ours_kq = ge._lane_dot(qh[:, :, None, :], kh[:, None, :, :])  # pylint: disable=protected-access
    report(f"L{L} kq", np.where(np.isfinite(kq), ours_kq, kq), kq)
    mask = (np.arange(S)[None, :] <= np.arange(T)[:, None])
    report(f"L{L} softmax", ge.ggml_softmax(jnp.asarray(kq), jnp.asarray(mask)[None], 1.0 / np.sqrt(hd)),
           g(f"kq_soft_max-{L}")[0])
    p = g(f"kq_soft_max-{L}")[0]  # (H, T, S)
    v = g(f"Vcur-{L}#1")[0] if f"Vcur-{L}#1" in d.files else rows2(g(f"Vcur-{L}")).reshape(T, n_kv, hd)
    vpad = np.zeros((S, n_kv, hd), np.float32)
    vpad[:T] = v
    vh = ge._f16(jnp.asarray(vpad)).transpose(1, 2, 0)[np.arange(n_head) // grp]  # (H, hd, S)  pylint: disable=protected-access
    ours_kqv = ge._lane_dot(ge._f16(jnp.asarray(p))[:, :, None, :], vh[:, None, :, :])  # pylint: disable=protected-access
    report(f"L{L} kqv", ours_kqv, g(f"kqv-{L}")[0])
    report(f"L{L} attn_out", dot(g(f"kqv_out-{L}"), w("attn_output")), rows2(g(f"attn_out-{L}")))
    ffn_inp = rows2(g(f"ffn_inp-{L}"))
    report(f"L{L} residual", emb + rows2(g(f"attn_out-{L}")), ffn_inp)
    report(f"L{L} ffn_norm", ge.ggml_rms_norm(jnp.asarray(ffn_inp), w("ffn_norm"), eps), rows2(g(f"ffn_norm-{L}")))
    fn = rows2(g(f"ffn_norm-{L}"))
    report(f"L{L} ffn_gate", dot(fn, w("ffn_gate")), rows2(g(f"ffn_gate-{L}")))
    report(f"L{L} ffn_up", dot(fn, w("ffn_up")), rows2(g(f"ffn_up-{L}")))
    report(f"L{L} swiglu", ge.ggml_swiglu(jnp.asarray(rows2(g(f"ffn_gate-{L}"))), jnp.asarray(rows2(g(f"ffn_up-{L}")))),
           rows2(g(f"ffn_swiglu-{L}")))
    report(f"L{L} ffn_down", dot(g(f"ffn_swiglu-{L}"), w("ffn_down")), rows2(g(f"ffn_out-{L}")))
    report(f"L{L} l_out", ffn_inp + rows2(g(f"ffn_out-{L}")), rows2(g(f"l_out-{L}")))
    print(f"layer {L}: {'all exact' if total['n'] == 0 else 'DIFFERENCES so far: ' + str(total['n'])}", flush=True)
  L = layers[-1]
  out_norm = ts["output_norm.weight"]
  report("result_norm", ge.ggml_rms_norm(jnp.asarray(rows2(g(f"l_out-{L}"))),
                                         jnp.asarray(np.asarray(out_norm.data, np.float32)), eps),
         rows2(g("result_norm")))
  emb_t = ts.get("output.weight", ts["token_embd.weight"])
  if emb_t.tensor_type.name != "F32":
    report("result_output", dot(g("result_norm"), gguf._quantized_leaf(emb_t, None)),  # pylint: disable=protected-access
           rows2(g("result_output")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
