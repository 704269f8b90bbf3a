"""llm-compressor side of ``experiments/bench_peer.py``: one ``oneshot`` run in its own process.

  .peer-venv/bin/python experiments/peer_worker.py --method gptq --model HF_DIR \
      --windows cal.npy --out OUT_DIR --report report.json \
      --settings '{"bits": 4, "group_size": 64, "symmetric": true, "act_order": true,
                   "static_groups": true, "percdamp": 0.01, "blocksize": 128}'

Runs in the peer's virtual environment (torch, transformers, llm-compressor, numpy, safetensors;
never jax or compressjax). It loads the Hugging Face checkpoint ``--model`` with transformers
(float32, or ``--dtype bfloat16``; CPU), turns the calibration windows ``--windows`` (an int32 ``(n, seq_len)`` ``.npy``
drawn by compressjax exactly as its compress job draws them) into a ``datasets.Dataset`` of
``input_ids``/``attention_mask``, and calls ``llmcompressor.oneshot`` with one modifier on every
``Linear`` except ``lm_head``, built from ``--settings`` (the keyword arguments of compressjax's
own transform, the single source of both sides' settings; ``bench_peer.METHODS``):

* ``gptq``: ``GPTQModifier`` with a ``QuantizationScheme`` of ``bits``-bit int weights
  (``symmetric``), group strategy of ``group_size``, float16 scales (``scale_dtype``: what our
  format stores), ``actorder="static"`` for ``act_order`` with ``static_groups`` (``None`` for
  neither), ``block_size=blocksize``, ``dampening_frac=percdamp``;
* ``sparsegpt``: ``SparseGPTModifier(sparsity, mask_structure="0:0"`` (unstructured, or ``"N:M"``
  for ``pattern``), ``block_size=blocksize, dampening_frac=percdamp)``.

The calibration uses all windows (``num_calibration_samples`` = their number, no shuffling,
``max_seq_length`` = their length). After ``oneshot`` every target module's ``weight`` holds the
compressed model's dense weights (GPTQ: the fake-quantized values ``scale * q``; SparseGPT: the
pruned and reconstructed weights); those tensors, under the checkpoint's own names, are written
as a float32 safetensors checkpoint in ``--out`` with the input's config and tokenizer files, and
checked: GPTQ weights on their grid (``W / scale`` an integer code of ``bits`` bits, at most
``2**bits`` distinct values per group), SparseGPT weights at least ``sparsity`` zeros. With
``--dtype bfloat16`` the exported GPTQ weights are the float32 ``code x scale`` (the codes
recovered exactly from the bfloat16 weights, :func:`gptq_weights_from_codes`), the pruned weights
the peer's bfloat16 values, and every other tensor the source's own (not rounded to bfloat16).

``--report`` receives a JSON object: ``oneshot_s`` (``time.perf_counter`` around ``oneshot``
alone), peak resident memory after ``oneshot`` and at exit (``getrusage`` ``ru_maxrss`` and
``/proc/self/status`` ``VmHWM``, in MiB), the settings, the checks, and the versions of torch,
transformers, llm-compressor and compressed-tensors.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json")


def peak_rss():
  """``{"ru_maxrss_mb", "vmhwm_mb"}`` of this process.

  ``VmHWM`` is this process image's own high-water mark; ``ru_maxrss`` (what ``getrusage``
  reports) survives ``exec`` on Linux, so it is at least the RSS the parent had when it
  spawned this process.
  """
  out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
         "vmhwm_mb": None}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          out["vmhwm_mb"] = int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return out


def calibration_dataset(windows):
  from datasets import Dataset  # pylint: disable=g-import-not-at-top
  ids = windows.astype("int64").tolist()
  return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(w) for w in ids]})


def _settings(method, raw):
  """``--settings`` (JSON of our transform's keyword arguments), checked for what is used."""
  need = {"gptq": ("bits", "group_size", "symmetric", "act_order", "static_groups", "percdamp",
                   "blocksize"),
          "sparsegpt": ("sparsity", "pattern", "blocksize", "percdamp")}[method]
  kw = json.loads(raw)
  missing = [k for k in need if k not in kw]
  if missing:
    raise ValueError(f"--settings for {method} lacks {missing} (got {sorted(kw)})")
  return kw


def build_modifier(method, kw):
  """The llm-compressor modifier of ``method`` with our settings ``kw``, and a JSON description."""
  if method == "gptq":
    import torch  # pylint: disable=g-import-not-at-top
    from compressed_tensors.quantization import (  # pylint: disable=g-import-not-at-top
        QuantizationArgs, QuantizationScheme, QuantizationStrategy, QuantizationType)
    from llmcompressor.modifiers.gptq import GPTQModifier  # pylint: disable=g-import-not-at-top
    order = {(True, True): "static", (False, False): None}.get(
        (bool(kw["act_order"]), bool(kw["static_groups"])), "unsupported")
    if not kw["symmetric"]:
      raise ValueError("--settings: symmetric=False is not supported (check_gptq checks a "
                       "symmetric grid)")
    if order == "unsupported":
      raise ValueError(f"--settings: act_order={kw['act_order']}, static_groups="
                       f"{kw['static_groups']} has no llm-compressor actorder equivalent")
    weights = QuantizationArgs(num_bits=kw["bits"], type=QuantizationType.INT,
                               symmetric=kw["symmetric"], strategy=QuantizationStrategy.GROUP,
                               group_size=kw["group_size"], scale_dtype=torch.float16)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    mod = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], actorder=order,
                       block_size=kw["blocksize"], dampening_frac=kw["percdamp"])
    settings = {"modifier": "GPTQModifier", "targets": ["Linear"], "ignore": ["lm_head"],
                "weights": json.loads(weights.model_dump_json()), "actorder": order,
                "block_size": kw["blocksize"], "dampening_frac": kw["percdamp"]}
    return mod, settings
  if method == "sparsegpt":
    from llmcompressor.modifiers.pruning import SparseGPTModifier  # pylint: disable=g-import-not-at-top
    structure = "0:0" if kw["pattern"] is None else kw["pattern"]
    mod = SparseGPTModifier(sparsity=kw["sparsity"], mask_structure=structure,
                            block_size=kw["blocksize"], dampening_frac=kw["percdamp"],
                            targets=["Linear"], ignore=["re:.*lm_head"])
    settings = {"modifier": "SparseGPTModifier", "sparsity": kw["sparsity"],
                "mask_structure": structure, "block_size": kw["blocksize"],
                "dampening_frac": kw["percdamp"], "targets": ["Linear"],
                "ignore": ["re:.*lm_head"]}
    return mod, settings
  raise ValueError(f"unknown method {method!r}: expected gptq or sparsegpt")


def gptq_weights_from_codes(model, bits):
  """``{module.weight name: float32 codes x scales}`` of every quantized Linear.

  In a bfloat16 model llm-compressor leaves each weight as its fake-quantized value rounded to
  bfloat16 (``code * float16 scale`` needs up to 14 significant bits); the code is recovered
  exactly by rounding ``w / scale`` (the bfloat16 error is at most ``|code| * 2^-9`` scale units,
  far below 0.5), so the export carries the peer's grid values, not their bfloat16 roundings.
  """
  import torch  # pylint: disable=g-import-not-at-top
  out = {}
  for name, m in model.named_modules():
    if not isinstance(m, torch.nn.Linear) or not hasattr(m, "weight_scale"):
      continue
    s = m.weight_scale.detach().to(torch.float32)
    group = m.weight.shape[1] // s.shape[1]
    s = s.repeat_interleave(group, dim=1)
    q = torch.round(m.weight.detach().to(torch.float32) / s.clamp_min(1e-30))
    out[f"{name}.weight"] = q.clamp(-2**(bits - 1), 2**(bits - 1) - 1) * s
  return out


def pruned_weights(model, ignore=("lm_head",)):
  """``{module.weight name: float32 weight}`` of every pruned Linear (the peer's kept values,
  in the model's dtype, as float32)."""
  import torch  # pylint: disable=g-import-not-at-top
  return {f"{name}.weight": m.weight.detach().to(torch.float32)
          for name, m in model.named_modules()
          if isinstance(m, torch.nn.Linear) and not name.endswith(ignore)}


def check_gptq(model, bits, group_size, weights=None):
  """Every quantized Linear's weight (or its entry of ``weights``) on its symmetric
  ``bits``-bit group grid; a summary."""
  import torch  # pylint: disable=g-import-not-at-top
  worst_dev, most_distinct, n, scale_fp16 = 0.0, 0, 0, True
  for name, m in model.named_modules():
    if not isinstance(m, torch.nn.Linear) or not hasattr(m, "weight_scale"):
      continue
    w = (weights or {}).get(f"{name}.weight", m.weight).detach().to(torch.float64)
    s = m.weight_scale.detach().to(torch.float64)
    out_f, in_f = w.shape
    if s.shape != (out_f, in_f // group_size):
      raise AssertionError(f"{name}: weight_scale shape {tuple(s.shape)}, expected "
                           f"{(out_f, in_f // group_size)}")
    scale_fp16 &= bool(torch.equal(s, s.to(torch.float16).to(torch.float64)))
    q = w / s.clamp_min(1e-30).repeat_interleave(group_size, dim=1)
    worst_dev = max(worst_dev, float((q - q.round()).abs().max()))
    lo, hi = float(q.round().min()), float(q.round().max())
    if lo < -2**(bits - 1) or hi > 2**(bits - 1) - 1:
      raise AssertionError(f"{name}: codes in [{lo}, {hi}], outside the {bits}-bit range")
    groups = w.reshape(out_f, in_f // group_size, group_size)
    for r in range(0, out_f, max(1, out_f // 16)):  # distinct values of sampled rows' groups
      for g in range(groups.shape[1]):
        most_distinct = max(most_distinct, int(torch.unique(groups[r, g]).numel()))
    n += 1
  if n == 0:
    raise AssertionError("no quantized Linear module found after oneshot")
  ok = worst_dev < 1e-3 and most_distinct <= 2**bits
  return {"on_grid": ok, "quantized_linears": n, "max_code_deviation": worst_dev,
          "max_distinct_per_group": most_distinct, "scales_fp16_exact": scale_fp16}


def check_sparse(model, sparsity, ignore=("lm_head",)):
  import torch  # pylint: disable=g-import-not-at-top
  fr = []
  for name, m in model.named_modules():
    if isinstance(m, torch.nn.Linear) and not name.endswith(ignore):
      fr.append(float((m.weight == 0).double().mean()))
  if not fr:
    raise AssertionError("no Linear module found")
  return {"sparse": min(fr) >= sparsity, "pruned_linears": len(fr), "min_zero_fraction": min(fr),
          "mean_zero_fraction": sum(fr) / len(fr)}


def save_dense(model, src, out, weights=None):
  """Writes ``model``'s tensors named as in ``src``'s safetensors as a float32 checkpoint.

  With ``weights`` (``{name: float32 tensor}``, the compressed linears' weights): those, and
  every other tensor read from ``src`` itself (what oneshot left unchanged, at the source's
  precision, not rounded to a bfloat16 model's).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  names = []
  index = os.path.join(src, "model.safetensors.index.json")
  files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index)
           else ["model.safetensors"])
  for fname in files:
    with safe_open(os.path.join(src, fname), framework="pt") as f:
      names += list(f.keys())
  state = model.state_dict()
  missing = [n for n in names if n not in state]
  if missing:
    raise KeyError(f"model after oneshot lacks tensors {missing[:5]} of {src}")
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  if weights is None:
    tensors = {n: state[n].detach().to(torch.float32).contiguous().clone() for n in names}
  else:
    tensors = {}
    for fname in files:
      with safe_open(os.path.join(src, fname), framework="pt") as f:
        for n in f.keys():
          tensors[n] = (weights[n] if n in weights else f.get_tensor(n)).to(
              torch.float32).contiguous().clone()
  save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  for fname in _COPIED:
    if os.path.isfile(os.path.join(src, fname)):
      shutil.copy(os.path.join(src, fname), os.path.join(tmp, fname))
  shutil.rmtree(out, ignore_errors=True)
  os.rename(tmp, out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--method", required=True, choices=("gptq", "sparsegpt"))
  ap.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
  ap.add_argument("--windows", required=True, help="int32 (n, seq_len) .npy of token ids")
  ap.add_argument("--out", required=True, help="output checkpoint directory")
  ap.add_argument("--report", required=True, help="JSON file for the measurements")
  ap.add_argument("--batch-size", type=int, default=8, help="oneshot calibration batch size")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="the model's dtype during oneshot (its forward passes; llm-compressor "
                       "accumulates the Hessian and solves in float32 either way)")
  ap.add_argument("--settings", required=True,
                  help="JSON of compressjax's transform keyword arguments (bench_peer.METHODS)")
  args = ap.parse_args()
  if "jax" in sys.modules or "compressjax" in sys.modules:
    raise RuntimeError("peer_worker must not import jax or compressjax")

  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import compressed_tensors  # pylint: disable=g-import-not-at-top
  import llmcompressor  # pylint: disable=g-import-not-at-top
  from llmcompressor import oneshot  # pylint: disable=g-import-not-at-top

  t_load = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      args.model, dtype=getattr(torch, args.dtype), device_map="cpu")
  tok = transformers.AutoTokenizer.from_pretrained(args.model)
  load_s = time.perf_counter() - t_load
  windows = np.load(args.windows)
  if windows.ndim != 2:
    raise ValueError(f"{args.windows}: expected (n, seq_len) windows, got shape {windows.shape}")
  ds = calibration_dataset(windows)
  kw = _settings(args.method, args.settings)
  modifier, settings = build_modifier(args.method, kw)
  n, seq_len = windows.shape
  settings.update(num_calibration_samples=n, max_seq_length=seq_len, batch_size=args.batch_size,
                  shuffle_calibration_samples=False, dtype=args.dtype, device="cpu",
                  torch_threads=torch.get_num_threads())
  print(f"[peer_worker] oneshot {args.method} on {n} x {seq_len} windows, "
        f"{torch.get_num_threads()} torch threads", flush=True)

  t0 = time.perf_counter()
  model = oneshot(model=model, processor=tok, recipe=modifier, dataset=ds,
                  num_calibration_samples=n, max_seq_length=seq_len, batch_size=args.batch_size,
                  shuffle_calibration_samples=False)
  oneshot_s = time.perf_counter() - t0
  after = peak_rss()
  print(f"[peer_worker] oneshot took {oneshot_s:.1f} s; peak RSS {after['vmhwm_mb']:.0f} MiB",
        flush=True)

  with torch.no_grad():
    weights = None
    if args.dtype != "float32":  # export the grid / kept values, the rest from the source
      weights = (gptq_weights_from_codes(model, kw["bits"]) if args.method == "gptq"
                 else pruned_weights(model))
    check = (check_gptq(model, kw["bits"], kw["group_size"], weights) if args.method == "gptq"
             else check_sparse(model, kw["sparsity"]))
  print(f"[peer_worker] check: {check}", flush=True)
  save_dense(model, args.model, args.out, weights)
  end = peak_rss()
  report = {
      "method": args.method, "settings": settings, "oneshot_s": oneshot_s, "load_s": load_s,
      "peak_rss_after_oneshot_mb": after["vmhwm_mb"] or after["ru_maxrss_mb"],
      "peak_rss_mb": end["vmhwm_mb"] or end["ru_maxrss_mb"],
      "ru_maxrss_after_oneshot_mb": after["ru_maxrss_mb"], "ru_maxrss_mb": end["ru_maxrss_mb"],
      "check": check, "out": os.path.abspath(args.out),
      "versions": {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                   "transformers": transformers.__version__,
                   "llmcompressor": llmcompressor.__version__,
                   "compressed_tensors": compressed_tensors.__version__,
                   "python": sys.version.split()[0]},
  }
  with open(args.report, "w") as f:
    json.dump(report, f, indent=1, sort_keys=True)
  ok = check.get("on_grid", check.get("sparse"))
  if not ok:
    print(f"[peer_worker] FAILED check: {check}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
