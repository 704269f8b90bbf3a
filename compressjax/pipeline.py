"""Compress-and-evaluate jobs driven by ml-collections configs (the logic behind the CLI).

Notebooks call :func:`run_compress` / :func:`run_eval` directly with a config from ``configs/``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import accounting, calibration, checkpoint, data, evaluate, finetune, transforms
from compressjax import checkpoint_stream
from compressjax import host_memory
from compressjax import head as head_lib
from compressjax.formats import CompressedArray
from compressjax.blocks import LazyTensor, LlamaBlocks, materialize, to_abstract_tree
from compressjax.io import build_model, open_model, resolve_model_path
from compressjax.transforms.base import nonfinite_count
from compressjax.transforms.selection import leaves_with_paths
from compressjax.model import MATMUL_DTYPES, LlamaConfig

__all__ = ["METHODS", "build_transform", "run_compress", "run_eval", "machine_info", "git_commit",
           "peak_rss_mb", "append_record", "format_table", "check_finite", "eval_windows_for",
           "calibration_windows_for", "untie_head_if_asked"]

# Method name -> factory(**kwargs) -> Transform. Later methods (GPTQ, AWQ, ...) register here.
METHODS = {
    "rtn": transforms.rtn,
    "gptq": transforms.gptq,
    "spqr": transforms.spqr,
    "owq": transforms.owq,
    "magnitude": transforms.magnitude,
    "wanda": transforms.wanda,
    "sparsegpt": transforms.sparsegpt,
    "svd": transforms.svd,
    "asvd": transforms.asvd,
    "lq_lora": transforms.lq_lora,
    "gptvq": transforms.gptvq,
    "e8p": transforms.e8p,
    "aqlm": transforms.aqlm,
    "incoherence": transforms.incoherence,  # not data-aware; chain it before a quantizer
}
# Methods that need calibration statistics (run through the sequential calibration engine).
DATA_AWARE = {"gptq", "spqr", "owq", "awq", "wanda", "sparsegpt", "structured", "asvd", "eora",
              "lq_lora", "gptvq", "e8p", "aqlm"}
# Methods that rewrite several parameters of a block together: they run at the top level of
# the recipe (not inside a `where` rule).
_TOP_LEVEL = ("awq", "structured")
# AWQ rescales norms and linears around the selected kernels, so it runs at the top level of the
# recipe: method "awq" builds chain(awq(...), select((where, <quantizer>(...)))).
_AWQ_ONLY = ("n_grid", "clip", "max_shrink", "clip_skip")
_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _method(name: str, kwargs: dict[str, Any]) -> transforms.Transform | None:
  if name in ("none", "keep"):
    return None
  if name in _TOP_LEVEL:
    raise ValueError(f"method {name!r} cannot be used inside compression.rules (it rewrites "
                     "several parameters of a block together); use compression.method or a "
                     "compression.steps entry")
  if name not in METHODS:
    raise ValueError(f"compression method {name!r} is not known; expected one of "
                     f"{sorted(METHODS) + list(_TOP_LEVEL) + ['none']}")
  return METHODS[name](**_method_kwargs(kwargs))  # default `where`: what the enclosing rule selected


def build_transform(comp, model_cfg: LlamaConfig | None = None) -> transforms.Transform:
  """Builds the transform described by a config's ``compression`` block.

  ``comp.steps`` (a sequence of dicts ``{method, where?, **kwargs}``) is a chain: each step is
  built like a one-method recipe and they run in order (``sparsegpt`` then ``gptq`` is
  SparseGPT's joint sparse + quantized mode). Otherwise ``comp.rules`` (a sequence of dicts
  ``{where, method, **kwargs}``, first match wins) takes precedence over ``comp.method`` with
  ``comp.kwargs`` applied to ``comp.where``. ``model_cfg`` supplies the attention geometry that
  ``structured`` needs.
  """
  comp = dict(comp)
  steps = comp.get("steps") or ()
  if steps:
    chain = []
    for i, st in enumerate(steps):
      st = dict(st)
      if "method" not in st:
        raise ValueError(f"compression.steps[{i}] needs 'method', got {sorted(st)}")
      method = st.pop("method")
      if method == "eora":  # compensates everything the steps before it changed
        if not chain:
          raise ValueError("compression.steps: 'eora' needs a compressing step before it")
        chain = [transforms.eora(transforms.chain(*chain), **_method_kwargs(st))]
        continue
      where = st.pop("where", comp.get("where", transforms.LINEAR_KERNELS))
      chain.append(build_transform({"method": method, "where": where, "kwargs": st}, model_cfg))
    return transforms.chain(*chain)
  rules = comp.get("rules") or ()
  if rules:
    built = []
    for i, r in enumerate(rules):
      r = dict(r)
      if "where" not in r or "method" not in r:
        raise ValueError(f"compression.rules[{i}] needs 'where' and 'method', got {sorted(r)}")
      where, method = r.pop("where"), r.pop("method")
      built.append(transforms.Rule(where, _method(method, r)))
    return transforms.select(*built)
  method = comp.get("method", "none")
  if method == "awq":
    return _awq_recipe(comp.get("where", transforms.LINEAR_KERNELS), dict(comp.get("kwargs") or {}))
  if method == "structured":
    kw = dict(comp.get("kwargs") or {})
    if model_cfg is not None:
      kw.setdefault("head_dim", model_cfg.head_dim)
      kw.setdefault("num_kv_heads", model_cfg.num_kv_heads)
    return transforms.structured(**kw)
  t = _method(method, dict(comp.get("kwargs") or {}))
  if t is None:
    return transforms.identity()
  # Routing through select() makes a `where` that matches nothing an error, not a silent no-op.
  return transforms.select((comp.get("where", transforms.LINEAR_KERNELS), t))


def _awq_recipe(where, kwargs: dict[str, Any]) -> transforms.Transform:
  """``chain(awq(...), select((where, quantizer(...))))``; ``kwargs["quantizer"]``: rtn or gptq."""
  kwargs = dict(kwargs)
  quantizer = kwargs.pop("quantizer", "rtn")
  if quantizer not in ("rtn", "gptq"):
    raise ValueError(f"awq: kwargs.quantizer must be 'rtn' or 'gptq', got {quantizer!r}")
  awq_kw = {k: kwargs.pop(k) for k in _AWQ_ONLY if k in kwargs}
  grid = {k: kwargs[k] for k in ("bits", "group_size", "symmetric", "scale_dtype") if k in kwargs}
  q = _method(quantizer, kwargs)
  grid = _method_kwargs(grid)
  return transforms.chain(transforms.awq(**grid, **awq_kw, where=where),
                          transforms.select((where, q)))


def _method_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
  kwargs = dict(kwargs)
  for key in ("scale_dtype", "value_dtype"):
    if key in kwargs and isinstance(kwargs[key], str):
      if kwargs[key] not in _DTYPES:
        raise ValueError(f"{key} {kwargs[key]!r}: expected one of {sorted(_DTYPES)}")
      kwargs[key] = _DTYPES[kwargs[key]]
  return kwargs


def block_finetune_from_config(comp) -> finetune.BlockFinetune | None:
  """The :class:`~compressjax.finetune.BlockFinetune` of ``comp.block_finetune`` (a dict of its
  fields), or ``None`` when absent or ``steps`` is 0 (off)."""
  ft = dict(dict(comp).get("block_finetune") or {})
  if not ft.get("steps", 0):
    return None
  try:
    return finetune.BlockFinetune(**ft)
  except TypeError as e:
    raise ValueError(f"compression.block_finetune: {e}; expected fields of "
                     "compressjax.finetune.BlockFinetune") from e
  except ValueError as e:
    raise ValueError(f"compression.{e}") from e


def needs_calibration(comp) -> bool:
  comp = dict(comp)
  methods = ([dict(r)["method"] for r in (comp.get("steps") or ())]
             or [dict(r)["method"] for r in (comp.get("rules") or ())]
             or [comp.get("method", "none")])
  return any(m in DATA_AWARE for m in methods)


def git_commit() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                         text=True, check=True).stdout.strip()
    # Appended benchmark records do not make the code that produced them dirty.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                            ":(top,exclude)experiments/results"], cwd=here,
                           capture_output=True, text=True, check=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def machine_info() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  dev = jax.devices()[0]
  return (f"{cpu}; {os.cpu_count()} cpus; jax {jax.__version__} on {dev.platform}"
          f" ({dev.device_kind})")


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far, in MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def append_record(path: str, record: dict[str, Any]) -> None:
  """Appends one JSON line (one measured configuration) to a results file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)

  cells = [[fmt(v) for v in r] for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
  line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(headers), sep] + [line(r) for r in cells])


def eval_windows_for(tok, dcfg, max_positions: int | None = None) -> dict[str, np.ndarray]:
  """The evaluation windows of every corpus in ``dcfg`` (a config's ``data`` block), validated.

  Raises ``ValueError`` naming the setting for impossible values (``seq_len`` or
  ``num_eval_windows`` below 1, more windows than a corpus holds, a window longer than the
  model's ``max_positions``), before any long work.
  """
  _positive(dcfg, "data", ("seq_len", "num_eval_windows", "batch_size"))
  if max_positions is not None and dcfg.seq_len > max_positions:
    raise ValueError(f"data.seq_len={dcfg.seq_len} exceeds the model's maximum position "
                     f"({max_positions} tokens, max_position_embeddings)")
  if not dcfg.corpora:
    raise ValueError("data.corpora is empty: expected a subset of ('wiki', 'austen')")
  out = {}
  for corpus in dcfg.corpora:
    try:
      out[corpus] = data.protocol_eval_windows(tok, corpus, data_dir=dcfg.dir or None,
                                               seq_len=dcfg.seq_len,
                                               num_windows=dcfg.num_eval_windows)
    except ValueError as e:
      raise ValueError(f"data (corpus {corpus!r}, data.seq_len={dcfg.seq_len}, "
                       f"data.num_eval_windows={dcfg.num_eval_windows}): {e}") from e
  return out


def _eval_all(model, windows: dict[str, np.ndarray], batch_size: int,
              label: str) -> dict[str, dict[str, Any]]:
  return {corpus: evaluate.perplexity(model, w, batch_size=batch_size, desc=f"{label} {corpus}")
          for corpus, w in windows.items()}


def _positive(block, name: str, keys) -> None:
  data.check_positive(**{f"{name}.{k}": block[k] for k in keys})


def check_finite(params, allow_nonfinite: bool = False) -> None:
  """Raises ``ValueError`` naming the first dense tensor of ``params`` holding NaN or Inf."""
  if allow_nonfinite:
    return
  for path, leaf in leaves_with_paths(params):
    if isinstance(leaf, CompressedArray):
      continue
    if isinstance(leaf, LazyTensor):
      leaf = leaf.load()  # one tensor at a time, dropped after the count
    bad = nonfinite_count(leaf)
    if bad:
      raise ValueError(f"model weight {path!r} has {bad} non-finite values (NaN/Inf) of "
                       f"{int(np.prod(leaf.shape))}; fix the checkpoint or set "
                       "allow_nonfinite=True to compress it anyway")


def calibration_windows_for(tok, cfg, max_positions: int | None = None) -> np.ndarray:
  """The calibration windows of a config's ``calibration`` block, validated (see
  :func:`eval_windows_for`)."""
  cal = cfg.calibration
  _positive(cal, "calibration", ("num_windows", "seq_len", "batch_size"))
  if max_positions is not None and cal.seq_len > max_positions:
    raise ValueError(f"calibration.seq_len={cal.seq_len} exceeds the model's maximum position "
                     f"({max_positions} tokens, max_position_embeddings)")
  if cal.mode not in ("sequential", "original"):
    raise ValueError(f"calibration.mode must be 'sequential' or 'original', got {cal.mode!r}")
  try:
    return data.protocol_calibration_windows(
        tok, data_dir=cfg.data.dir or None, num=cal.num_windows, seq_len=cal.seq_len,
        seed=cal.seed, source=cal.source)
  except ValueError as e:
    raise ValueError(f"calibration (source {cal.source!r}, calibration.num_windows="
                     f"{cal.num_windows}, calibration.seq_len={cal.seq_len}): {e}") from e


def _to_jsonable(x):
  if isinstance(x, dict):
    return {str(k): _to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def run_compress(cfg) -> dict[str, Any]:
  """Loads the model, evaluates, compresses, evaluates again, saves, prints and records.

  Returns the result record (also appended to ``cfg.results_file`` when set).
  """
  t_start = time.perf_counter()
  if cfg.dtype not in _DTYPES:
    raise ValueError(f"dtype {cfg.dtype!r}: expected one of {sorted(_DTYPES)}")
  dtype = _DTYPES[cfg.dtype]
  # Everything that can be checked is checked before the long work (evaluation, calibration).
  _, model_path = resolve_model_path(cfg.model)
  if cfg.output_dir:
    checkpoint.check_output_path(cfg.output_dir, overwrite=cfg.overwrite, forbidden=[model_path])
  t0 = time.perf_counter()
  # Lazily: every tensor is read when it is needed and dropped after (the calibration engine
  # holds one block at a time), so the uncompressed model is never resident as a whole during
  # a calibrated run (only for the optional baseline evaluation, freed before calibration).
  model_cfg, params, tok = open_model(cfg.model)
  load_s = time.perf_counter() - t0
  # The dense model as loaded (an untied head below is a new tensor, not part of it).
  before_size = accounting.size_report(to_abstract_tree(params))
  model_cfg, params = untie_head_if_asked(cfg.compression, model_cfg, params)
  transform = build_transform(cfg.compression, model_cfg)
  block_ft = block_finetune_from_config(cfg.compression)
  if block_ft is not None and not needs_calibration(cfg.compression):
    raise ValueError("compression.block_finetune.steps > 0 needs a calibrated method (it runs in "
                     f"the calibration engine); {cfg.compression.get('method')!r} is data-free")
  check_finite(params, cfg.get("allow_nonfinite", False))
  abstract = to_abstract_tree(params)
  # The recipe planned on abstract arrays: unmatched rules, group sizes that do not divide a
  # width, ranks above a matrix's, ... fail here with the parameter's path.
  planned = transforms.plan(transform, abstract)
  max_pos = model_cfg.max_position_embeddings
  windows = eval_windows_for(tok, cfg.data, max_pos)
  calibrated = needs_calibration(cfg.compression)
  cal_windows = calibration_windows_for(tok, cfg, max_pos) if calibrated else None
  if calibrated:
    _calibration_matmul_dtype(cfg)
  if cfg.output_dir:  # room for the compressed checkpoint (planned bytes + 10% slack)
    need = int(1.1 * accounting.size_report(planned)["total_bytes"])
    checkpoint.check_output_path(cfg.output_dir, overwrite=cfg.overwrite, forbidden=[model_path],
                                 min_free_bytes=need)
  before = {}
  if cfg.eval_before:
    model = build_model(model_cfg, params, dtype=dtype)
    before = _eval_all(model, windows, cfg.data.batch_size, "fp")
    del model

  # Streamed output (calibration.stream_output): each finished block is written to the output
  # checkpoint's temporary directory and dropped, so the engine's memory does not grow with
  # depth; the evaluation then reads the compressed model back from what was written.
  writer = None
  if calibrated and cfg.output_dir and _stream_output(cfg):
    writer = checkpoint_stream.StreamWriter(cfg.output_dir, overwrite=cfg.overwrite,
                                            forbidden=[model_path])
  try:  # (`params` is the lazily opened tree: holding it here costs no memory)
    return _compress_eval_save(cfg, t_start, transform, model_cfg, params, tok, dtype, windows,
                               cal_windows, block_ft, calibrated, before, before_size, load_s,
                               writer)
  finally:
    if writer is not None:
      writer.abort()  # nothing after a commit; otherwise the destination stays unchanged


def _calibration_matmul_dtype(cfg) -> str | None:
  """``calibration.matmul_dtype`` as :func:`calibration.run_sequential` takes it."""
  md = cfg.calibration.get("matmul_dtype", "float32")
  allowed = ["float32"] + [d for d in MATMUL_DTYPES if d is not None]
  if md not in allowed:
    raise ValueError(f"calibration.matmul_dtype must be one of {allowed}, got {md!r}")
  return None if md == "float32" else md


def untie_head_if_asked(comp, model_cfg: LlamaConfig, params):
  """``(model_cfg, params)`` untied by :func:`compressjax.head.untie_head` when
  ``compression.untie_head`` is true (absent: false), else unchanged.

  The head ``lm_head/kernel = E.T`` is then an ordinary parameter that ``compression.rules`` /
  ``steps`` may select (e.g. ``{"where": "lm_head/kernel", "method": "rtn", "bits": 4,
  "group_size": 64}``); the model config saved with the checkpoint is the untied one. Outside
  the blocks, the calibration engine passes the head through the recipe without statistics,
  so only data-free methods (RTN) apply to it.
  """
  on = dict(comp).get("untie_head", False)
  if not isinstance(on, bool):
    raise ValueError(f"compression.untie_head must be a bool, got {on!r}")
  return head_lib.untie_head(model_cfg, params) if on else (model_cfg, params)


def _stream_output(cfg) -> bool:
  """``calibration.stream_output`` (default on; with several processes too: every process
  writes its shards of each block, :mod:`compressjax.checkpoint_stream`)."""
  on = cfg.calibration.get("stream_output", True)
  if not isinstance(on, bool):
    raise ValueError(f"calibration.stream_output must be a bool, got {on!r}")
  return on


def _compress_eval_save(cfg, t_start, transform, model_cfg, params, tok, dtype, windows,
                        cal_windows, block_ft, calibrated, before, before_size, load_s, writer):
  t0 = time.perf_counter()
  if calibrated:
    cal = cfg.calibration
    new_params, _ = calibration.run_sequential(
        LlamaBlocks(model_cfg, params, dtype=dtype), cal_windows, transform,
        batch_size=cal.batch_size, mode=cal.mode, resume_dir=cal.resume_dir or None,
        recipe_key=json.dumps(_to_jsonable(cfg.compression.to_dict()), sort_keys=True),
        block_finetune=block_ft, output=writer, matmul_dtype=_calibration_matmul_dtype(cfg))
  else:
    new_params, _ = transforms.apply(transform, materialize(params, dtype))
  new_params = jax.block_until_ready(new_params)
  compress_s = time.perf_counter() - t0
  del params
  host_memory.release_free_memory()  # before the evaluation's allocations
  if writer is not None and jax.process_count() == 1:
    # The compressed model as written, evaluated one block at a time from the checkpoint (each
    # part checked against its checksums): the whole model is never read back, so a model
    # bigger than memory is evaluated too. The engine's result (abstract blocks, the outside
    # leaves as arrays) is dropped first.
    del new_params
    host_memory.release_free_memory()  # what the outside leaves' write and the check freed
    written = LlamaBlocks.from_checkpoint(model_cfg, writer.tmp, dtype=dtype)
    new_params = written.params  # the abstract tree of its manifest (for the size report)
    eval_mode = "by_block"
    after = evaluate.perplexity_by_block(written, windows, batch_size=cfg.data.batch_size)
  else:
    eval_mode = "whole"
    if writer is not None:  # several processes: every process restores its shards
      del new_params
      new_params, _ = writer.restore()
    after = _eval_all(build_model(model_cfg, new_params, dtype=dtype), windows,
                      cfg.data.batch_size, cfg.compression.name)
  after_size = accounting.size_report(new_params)

  record = {
      "method": cfg.compression.name,
      "settings": _to_jsonable(cfg.compression.to_dict()),
      "model": cfg.model,
      # Stored bytes over the *original* linear parameter count (structured pruning removes
      # parameters; their removal is what it saves).
      "bits_per_param": 8 * after_size["linear_bytes"] / before_size["linear_params"],
      "linear_params": after_size["linear_params"],
      "linear_params_removed": 1.0 - after_size["linear_params"] / before_size["linear_params"],
      "model_bytes": after_size["total_bytes"],
      "linear_bytes": after_size["linear_bytes"],
      "other_bytes": after_size["other_bytes"],
      # An untied head (compression.untie_head) is a tensor of its own, counted in other_bytes
      # and model_bytes, not in bits_per_param (decoder linears only); 0 when tied.
      "lm_head_bytes": _head_bytes(new_params),
      "dense_model_bytes": before_size["total_bytes"],
      "ppl_wiki": after.get("wiki", {}).get("ppl"),
      "ppl_austen": after.get("austen", {}).get("ppl"),
      "nll": {k: v["nll"] for k, v in after.items()},
      "baseline_ppl_wiki": before.get("wiki", {}).get("ppl"),
      "baseline_ppl_austen": before.get("austen", {}).get("ppl"),
      # "whole": the whole model in one program per batch (evaluate.perplexity); "by_block":
      # the streamed checkpoint read and run one block at a time (evaluate.perplexity_by_block).
      "eval_mode": eval_mode,
      "eval_tokens_per_s": {k: v["tokens_per_s"] for k, v in after.items()},
      "baseline_eval_tokens_per_s": {k: v["tokens_per_s"] for k, v in before.items()},
      "protocol": {"seq_len": cfg.data.seq_len, "num_eval_windows": cfg.data.num_eval_windows},
      "calibration": (_to_jsonable(cfg.calibration.to_dict())
                      if needs_calibration(cfg.compression) else None),
      "wall_s": compress_s,
      "load_s": load_s,
      "total_wall_s": None,
      "peak_rss_mb": peak_rss_mb(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": git_commit(),
      "machine": machine_info(),
  }
  if cfg.output_dir:
    meta = {"model_config": model_config_dict(model_cfg),
            "compression": _to_jsonable(cfg.compression.to_dict()),
            "data": _to_jsonable(cfg.data.to_dict()), "dtype": cfg.dtype, "result": record}
    if writer is not None:
      writer.commit(metadata=meta, tokenizer=tok)
    else:
      checkpoint.save(cfg.output_dir, new_params, tokenizer=tok, overwrite=cfg.overwrite,
                      metadata=meta)
    record["checkpoint"] = os.path.abspath(cfg.output_dir)
  record["total_wall_s"] = time.perf_counter() - t_start
  record["peak_rss_mb"] = peak_rss_mb()

  rows = []
  if before:
    rows.append(["uncompressed", before_size["linear_bits_per_param"],
                 before.get("wiki", {}).get("ppl", "-"), before.get("austen", {}).get("ppl", "-"),
                 before_size["total_bytes"] / 2**20, "-"])
  rows.append([cfg.compression.name, record["bits_per_param"],
               after.get("wiki", {}).get("ppl", "-"), after.get("austen", {}).get("ppl", "-"),
               after_size["total_bytes"] / 2**20, compress_s])
  print()
  print(format_table(["model", "bits/param (linear)", "ppl wiki", "ppl austen", "model MiB",
                      "compress s"], rows))
  print(f"linear layers: {after_size['linear_params']:,} params in {after_size['linear_bytes']:,} "
        f"bytes; uncompressed rest (embeddings, norms): {after_size['other_params']:,} params in "
        f"{after_size['other_bytes']:,} bytes")
  print(f"peak RSS {record['peak_rss_mb']:.0f} MiB; total wall {record['total_wall_s']:.1f} s; "
        f"eval throughput {', '.join(f'{k} {v:.0f} tok/s' for k, v in record['eval_tokens_per_s'].items())}")
  if cfg.output_dir:
    print(f"saved compressed model to {record['checkpoint']}")
  if cfg.results_file:
    append_record(cfg.results_file, record)
  return record


def _head_bytes(params) -> int:
  """Stored bytes of an untied ``lm_head/kernel`` (0 when the head is tied)."""
  return int(accounting.size_report(params, linear=head_lib.HEAD_PATH)["linear_bytes"])


def model_config_dict(cfg: LlamaConfig) -> dict[str, Any]:
  return _to_jsonable(cfg.to_dict())


def run_eval(checkpoint_dir: str, *, corpora=None, data_dir: str | None = None,
             batch_size: int | None = None) -> dict[str, Any]:
  """Restores a checkpoint written by :func:`run_compress` and re-evaluates it.

  Uses the checkpoint's own tokenizer and protocol settings and the way its saved result was
  evaluated (``eval_mode``: a checkpoint streamed block by block is evaluated one block at a
  time, never read whole); reports whether the perplexities reproduce the saved ones bit for
  bit.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  meta = checkpoint.read_manifest(checkpoint_dir)["metadata"]
  for key in ("model_config", "data", "dtype"):
    if key not in meta:
      raise checkpoint.CheckpointError(
          f"checkpoint path {checkpoint_dir!r}: metadata has no {key!r} (not written by "
          "compressjax compress)")
  mcfg = LlamaConfig(**meta["model_config"])
  dtype = _DTYPES[meta["dtype"]]
  by_block = meta.get("result", {}).get("eval_mode") == "by_block"
  if by_block:
    model = LlamaBlocks.from_checkpoint(mcfg, checkpoint_dir, dtype=dtype)
  else:
    params, _ = checkpoint.restore(checkpoint_dir)
    model = build_model(mcfg, params, dtype=dtype)
  tok_path = os.path.join(checkpoint_dir, "tokenizer.json")
  if not os.path.isfile(tok_path):
    raise checkpoint.CheckpointError(f"checkpoint path {checkpoint_dir!r}: tokenizer.json is missing")
  tok = Tokenizer.from_file(tok_path)
  dcfg = ml_collections.ConfigDict(meta["data"])
  if corpora:
    dcfg.corpora = tuple(corpora)
  if data_dir:
    dcfg.dir = data_dir
  if batch_size:  # the saved batch size reproduces the saved numbers bit for bit
    dcfg.batch_size = batch_size
  ewin = eval_windows_for(tok, dcfg, mcfg.max_position_embeddings)
  res = (evaluate.perplexity_by_block(model, ewin, batch_size=dcfg.batch_size) if by_block else
         _eval_all(model, ewin, dcfg.batch_size, "eval"))
  saved = meta.get("result", {}).get("nll", {})
  rows = []
  for corpus, r in res.items():
    same = corpus in saved and saved[corpus] == r["nll"]
    rows.append([corpus, r["ppl"], r["nll"], saved.get(corpus, "-"), "yes" if same else "NO"])
  print(format_table(["corpus", "ppl", "mean nll", "saved nll", "bit-identical"], rows))
  return {c: {**r, "matches_saved": c in saved and saved[c] == r["nll"]} for c, r in res.items()}
