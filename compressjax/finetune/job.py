"""The ``compressjax finetune`` job: a saved compressed checkpoint, distilled from its teacher.

Loads the student (a checkpoint written by ``compressjax compress``) and the teacher (the
uncompressed model it was compressed from), draws training and held-out windows from the
calibration text exactly as the standard protocol draws calibration windows (never the evaluation
windows), fine-tunes the leaves the config selects (:func:`compressjax.finetune.distill.finetune`),
evaluates perplexity on the protocol's corpora, saves the tuned model as a checkpoint that
``compressjax eval`` reads, and appends one result record.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import numpy as np

from compressjax import accounting, checkpoint
from compressjax.finetune import distill
from compressjax.io import build_model, open_model
from compressjax.io.loading import resolve_model_path
from compressjax.model import LlamaConfig

__all__ = ["run_finetune", "distill_config"]


def distill_config(fcfg) -> distill.DistillConfig:
  """The :class:`~compressjax.finetune.distill.DistillConfig` of a config's ``finetune`` block."""
  names = [f.name for f in distill.DistillConfig.__dataclass_fields__.values()]
  return distill.DistillConfig(**{k: fcfg[k] for k in names if k in fcfg})


def _windows(tok, cfg, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
  """Training and held-out windows: ``num_windows + heldout_windows`` protocol calibration
  windows (seeded, non-overlapping draws from the calibration text, checked as the compress job
  checks its calibration windows), split in that order."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from compressjax import pipeline  # pylint: disable=g-import-not-at-top

  cal = cfg.calibration
  if isinstance(cal.heldout_windows, bool) or not isinstance(cal.heldout_windows, int) or (
      cal.heldout_windows < 0):
    raise ValueError(f"calibration.heldout_windows must be an int >= 0, got "
                     f"{cal.heldout_windows!r}")
  if not isinstance(cal.num_windows, int) or cal.num_windows < 1:
    raise ValueError(f"calibration.num_windows must be a positive int, got {cal.num_windows!r}")
  view = ml_collections.ConfigDict({
      "calibration": {"num_windows": cal.num_windows + cal.heldout_windows,
                      "seq_len": cal.seq_len, "seed": cal.seed, "source": cal.source,
                      "batch_size": 1, "mode": "sequential"},
      "data": {"dir": cfg.data.dir}})
  w = pipeline.calibration_windows_for(tok, view, max_pos)
  return w[:cal.num_windows], w[cal.num_windows:]


def _mode_setup(mode: str, student, mask, fcfg, dcfg):
  """``(tree, mask, finetune kwargs)`` of ``mode``: ``"kd"`` (continuous children only),
  ``"ste"`` (latent weights with straight-through codes) or ``"pv"`` (PV-tuning)."""
  from compressjax.finetune import pv, ste, trainable_mask  # pylint: disable=g-import-not-at-top

  if mode == "kd":
    return student, mask, {}
  if mode not in ("ste", "pv"):
    raise ValueError(f"finetune.mode must be 'kd', 'ste' or 'pv', got {mode!r}")
  beam = fcfg.get("beam_size", 1)  # the AQLM re-encoding's beam (other formats ignore it)
  tree = (ste.to_ste(student, fcfg.train, beam_size=beam) if mode == "ste" else
          pv.to_pv(student, fcfg.train, beam_size=beam))
  tmask = trainable_mask(tree, where=fcfg.train, train_dense=fcfg.train_dense or None)
  if mode == "ste":
    return tree, tmask, {}
  pcfg = pv.PVConfig(tau=fcfg.tau, lr_v=fcfg.lr_v, delta_decay=fcfg.delta_decay,
                     v_units=fcfg.get("v_units", "weight"))
  part = distill.partition(tree, tmask)
  return tree, tmask, {"opt": pv.make_optimizer(tree, part, dcfg, pcfg),
                       "post_step": pv.make_v_step(pcfg)}


def run_finetune(cfg) -> dict[str, Any]:
  """Runs the job described by ``cfg`` (see ``configs/finetune_kd.py``); returns its record."""
  from compressjax import pipeline  # pylint: disable=g-import-not-at-top
  from compressjax.finetune import trainable_mask  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  if not cfg.checkpoint:
    raise ValueError("checkpoint: the compressed checkpoint to fine-tune is required "
                     "(a directory written by `compressjax compress`)")
  if cfg.dtype not in pipeline._DTYPES:  # pylint: disable=protected-access
    raise ValueError(f"dtype {cfg.dtype!r}: expected one of {sorted(pipeline._DTYPES)}")  # pylint: disable=protected-access
  dtype = pipeline._DTYPES[cfg.dtype]  # pylint: disable=protected-access
  dcfg = distill_config(cfg.finetune)
  _, model_path = resolve_model_path(cfg.model)
  forbidden = [model_path, os.path.abspath(cfg.checkpoint)]
  if cfg.output_dir:
    checkpoint.check_output_path(cfg.output_dir, overwrite=cfg.overwrite, forbidden=forbidden)
  student, meta = checkpoint.restore(cfg.checkpoint)
  if "model_config" not in meta:
    raise checkpoint.CheckpointError(f"checkpoint {cfg.checkpoint!r}: metadata has no "
                                     "'model_config' (not written by compressjax compress)")
  scfg = LlamaConfig(**meta["model_config"])
  tcfg, teacher, tok = open_model(cfg.model, lazy=False)
  if scfg.to_dict() != tcfg.to_dict():
    raise ValueError(f"checkpoint {cfg.checkpoint!r} was not compressed from model "
                     f"{cfg.model!r} (model configurations differ)")
  mask = trainable_mask(student, where=cfg.finetune.train,
                        train_dense=cfg.finetune.train_dense or None)
  max_pos = scfg.max_position_embeddings
  train_w, heldout_w = _windows(tok, cfg, max_pos)
  eval_w = pipeline.eval_windows_for(tok, cfg.data, max_pos)
  part = distill.partition(student, mask)

  loss_fn, teacher_state = distill.make_loss_fn(scfg, part, teacher, dcfg, dtype)
  tr0, fr0 = part.split(student)
  before = (distill.heldout_loss(loss_fn, teacher_state, tr0, fr0, heldout_w)
            if len(heldout_w) else {})
  log_file = None
  if cfg.resume_dir:
    os.makedirs(cfg.resume_dir, exist_ok=True)
    log_file = os.path.join(cfg.resume_dir, "loss_log.jsonl")
  t0 = time.perf_counter()
  mode = cfg.finetune.get("mode", "kd")
  tree, tmask, extra = _mode_setup(mode, student, mask, cfg.finetune, dcfg)
  tuned, history = distill.finetune(scfg, teacher, tree, tmask, train_w, dcfg,
                                    checkpoint_dir=cfg.resume_dir or None, log_file=log_file,
                                    **extra)
  if mode != "kd":
    from compressjax.finetune import ste  # pylint: disable=g-import-not-at-top
    tuned = ste.export(tuned)
  train_s = time.perf_counter() - t0
  tr1, fr1 = part.split(tuned)
  after = (distill.heldout_loss(loss_fn, teacher_state, tr1, fr1, heldout_w)
           if len(heldout_w) else {})
  del teacher, teacher_state
  size = accounting.size_report(tuned)
  base = meta.get("result", {})
  model = build_model(scfg, tuned, dtype=dtype)
  res = pipeline._eval_all(model, eval_w, cfg.data.batch_size, cfg.name)  # pylint: disable=protected-access
  steps_timed = [h["step_s"] for h in history[1:]]  # the first step includes compilation
  tokens_per_step = dcfg.accum * dcfg.micro_batch * cfg.calibration.seq_len
  n_train = int(sum(np.size(x) for x in tr1))
  record = {
      "method": f"{base.get('method', 'compressed')}+{cfg.name}",
      "settings": {"base": base.get("settings"), "finetune": pipeline._to_jsonable(  # pylint: disable=protected-access
          cfg.finetune.to_dict()), "calibration": pipeline._to_jsonable(cfg.calibration.to_dict())},  # pylint: disable=protected-access
      "model": cfg.model,
      "bits_per_param": base.get("bits_per_param"),
      "linear_bytes": size["linear_bytes"],
      "model_bytes": size["total_bytes"],
      "trainable_params": n_train,
      "ppl_wiki": res.get("wiki", {}).get("ppl"),
      "ppl_austen": res.get("austen", {}).get("ppl"),
      "nll": {k: v["nll"] for k, v in res.items()},
      "before_ppl_wiki": base.get("ppl_wiki"),
      "before_ppl_austen": base.get("ppl_austen"),
      "heldout_kd_before": before.get("kd"),
      "heldout_kd_after": after.get("kd"),
      "mode": mode,
      "steps": len(history),
      "tokens_seen": history[-1]["tokens"] if history else 0,
      "train_tokens_per_s": (tokens_per_step / float(np.mean(steps_timed))
                             if steps_timed else None),
      "loss_curve": [[h["step"], round(h["loss"], 6)] for h in history],
      "wall_s": train_s,
      "peak_rss_mb": pipeline.peak_rss_mb(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": pipeline.git_commit(),
      "machine": pipeline.machine_info(),
  }
  if cfg.output_dir:
    checkpoint.save(cfg.output_dir, tuned, tokenizer=tok, overwrite=cfg.overwrite,
                    metadata={"model_config": pipeline.model_config_dict(scfg),
                              "compression": {"base": base.get("settings"),
                                              "finetune": record["settings"]["finetune"]},
                              "data": pipeline._to_jsonable(cfg.data.to_dict()),  # pylint: disable=protected-access
                              "dtype": cfg.dtype, "result": record})
    record["checkpoint"] = os.path.abspath(cfg.output_dir)
  record["total_wall_s"] = time.perf_counter() - t_start
  print()
  print(pipeline.format_table(
      ["model", "bits/param", "ppl wiki", "ppl austen", "held-out KD", "train s", "tok/s"],
      [[base.get("method", "compressed"), base.get("bits_per_param", "-"),
        base.get("ppl_wiki", "-"), base.get("ppl_austen", "-"), before.get("kd", "-"), "-", "-"],
       [record["method"], record["bits_per_param"] or "-", record["ppl_wiki"],
        record["ppl_austen"], after.get("kd", "-"), train_s,
        record["train_tokens_per_s"] or "-"]]))
  if cfg.results_file:
    pipeline.append_record(cfg.results_file, record)
  return record
