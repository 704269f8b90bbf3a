"""``compressjax`` command line: ``compress``, ``finetune`` and ``eval``.

  compressjax compress --config configs/rtn_w4g64.py [--config.output_dir=... --config.data.num_eval_windows=8]
  compressjax compress --config configs/default.py --config.compression.method=rtn \
      --config.compression.kwargs.bits=3 --config.compression.kwargs.group_size=64
  compressjax compress --config configs/sparsegpt_50_w4g64.py --config.compression.steps.1.bits=3
  compressjax finetune --config configs/finetune_kd.py --config.checkpoint=runs/gptq_w2g64 \
      --config.output_dir=runs/gptq_w2g64_kd
  compressjax eval --checkpoint runs/rtn_w4g64
  compressjax export --checkpoint runs/rtn_w4g64 --format compressed-tensors|gptq|gguf --out DIR

Method arguments (``compression.kwargs.NAME``, ``compression.steps.I.NAME``,
``compression.rules.I.NAME``) may be set whether or not the config already holds them; values are
read as Python literals (``3``, ``0.01``, ``True``, ``None``, ``(1, 2)``), anything else as a
string. Errors print one line and exit with status 1; ``--debug`` (or ``COMPRESSJAX_DEBUG=1``)
shows the full traceback.
"""

from __future__ import annotations

import ast
import os
import re
import sys

# Threaded OpenBLAS makes the small LAPACK calls of calibration (Cholesky) ~100x slower on a
# loaded CPU; set before numpy/scipy load it. An explicit user setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

USAGE = __doc__
_METHOD_ARG = re.compile(r"--config\.compression\.(kwargs|steps\.(\d+)|rules\.(\d+))\.(\w+)=(.*)",
                         re.S)


def _debug(argv) -> bool:
  return "--debug" in argv or os.environ.get("COMPRESSJAX_DEBUG", "") not in ("", "0")


def _fail(prog: str, e: BaseException) -> int:
  """Prints one line naming what failed (the traceback only with ``--debug``); returns 1."""
  msg = str(e).strip().splitlines()
  notes = "".join(f" {n}" for n in getattr(e, "__notes__", ()))  # where it happened
  print(f"{prog}: error: {type(e).__name__}: {msg[0] if msg else ''}"
        + (" [...]" if len(msg) > 1 else "") + notes, file=sys.stderr)
  print(f"{prog}: (run with --debug or COMPRESSJAX_DEBUG=1 for the traceback)", file=sys.stderr)
  return 1


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def split_method_args(argv):
  """Takes ``--config.compression.{kwargs,steps.I,rules.I}.NAME=VALUE`` out of ``argv``.

  Returns ``(rest, overrides)``, ``overrides`` a list of ``(section, index, name, value)``;
  ml_collections cannot add a field that a locked config does not hold, so these are applied
  by :func:`apply_method_args` after the config is loaded.
  """
  rest, overrides = [], []
  for a in argv:
    m = _METHOD_ARG.fullmatch(a)
    if not m:
      rest.append(a)
      continue
    section = "kwargs" if m.group(1) == "kwargs" else m.group(1).split(".")[0]
    index = m.group(2) or m.group(3)
    overrides.append((section, None if index is None else int(index), m.group(4),
                      _literal(m.group(5))))
  return rest, overrides


def apply_method_args(cfg, overrides):
  """Sets method arguments taken by :func:`split_method_args` on ``cfg.compression``."""
  comp = cfg.compression
  for section, index, name, value in overrides:
    if section == "kwargs":
      with comp.kwargs.unlocked():
        if name in comp.kwargs and value is not None and comp.kwargs[name] is not None:
          del comp.kwargs[name]  # the command line may change a field's type (int -> float)
        comp.kwargs[name] = value
      continue
    entries = [dict(e) for e in (comp[section] or ())]
    if not 0 <= index < len(entries):
      raise ValueError(f"--config.compression.{section}.{index}.{name}: the config has "
                       f"{len(entries)} compression.{section} entries "
                       f"(indices 0..{len(entries) - 1})")
    entries[index][name] = value
    comp[section] = tuple(entries)
  return cfg


def _add_config_root(argv):
  """Lets config files import their siblings (``from configs import default``)."""
  for i, a in enumerate(argv):
    path = None
    if a.startswith("--config="):
      path = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    if path:
      root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":")[0])))
      if root not in sys.path:
        sys.path.insert(0, root)


def _quiet_logs():
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)


def compress_main(argv=None):
  def run(cfg, overrides):
    from compressjax import pipeline  # pylint: disable=g-import-not-at-top
    pipeline.run_compress(apply_method_args(cfg, overrides))

  return _config_main("compressjax compress", run, argv, method_args=True)


def finetune_main(argv=None):
  def run(cfg, overrides):
    del overrides
    from compressjax.finetune import job  # pylint: disable=g-import-not-at-top
    job.run_finetune(cfg)

  return _config_main("compressjax finetune", run, argv, method_args=False)


def _config_main(prog, run, argv=None, *, method_args: bool):
  """Runs ``run(config, method_overrides)`` for a ``--config`` job; one-line errors."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv if argv is None else argv)
  debug = _debug(argv)
  argv = [a for a in argv if a != "--debug"]
  overrides = []
  if method_args:
    argv, overrides = split_method_args(argv)
  _add_config_root(argv)
  # sys_argv: config_flags reads its overrides from sys.argv unless told otherwise.
  config = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                           lock_config=True, sys_argv=argv)

  def main(_):
    _quiet_logs()
    if config.value is None:
      raise app.UsageError("--config is required, e.g. --config configs/rtn_w4g64.py")
    try:
      run(config.value, overrides)
    except Exception as e:  # pylint: disable=broad-except
      if debug:
        raise
      sys.exit(_fail(prog, e))
    except KeyboardInterrupt:
      print(f"{prog}: interrupted", file=sys.stderr)
      sys.exit(130)

  flags.FLAGS.unparse_flags()
  if debug:
    app.run(main, argv=argv)
    return 0
  try:
    app.run(main, argv=argv)
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a config file that fails to load
    return _fail(prog, e)
  return 0


def eval_main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="compressjax eval",
                              description="Restore a compressed checkpoint and re-evaluate it.")
  p.add_argument("--checkpoint", required=True, help="directory written by `compressjax compress`")
  p.add_argument("--corpora", default=None, help="comma-separated subset of wiki,austen")
  p.add_argument("--data-dir", default=None, help="corpora directory (default ../shared/data)")
  p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
  args = p.parse_args(argv)
  _quiet_logs()
  from compressjax import pipeline  # pylint: disable=g-import-not-at-top
  try:
    res = pipeline.run_eval(args.checkpoint,
                            corpora=args.corpora.split(",") if args.corpora else None,
                            data_dir=args.data_dir)
  except Exception as e:  # pylint: disable=broad-except
    if args.debug or _debug([]):
      raise
    return _fail("compressjax eval", e)
  return 0 if all(r["matches_saved"] for r in res.values()) else 1


def export_main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="compressjax export",
                              description="Write a compressed checkpoint as a Hugging Face "
                              "compressed-tensors or GPTQ checkpoint directory, or a llama.cpp GGUF file.")
  p.add_argument("--checkpoint", required=True, help="directory written by `compressjax compress`")
  p.add_argument("--format", required=True, choices=("compressed-tensors", "gptq", "gguf"))
  p.add_argument("--out", required=True, help="output directory, or the .gguf file for gguf "
                 "(written atomically)")
  p.add_argument("--dtype", default=None, help="dtype of the dense tensors (default: float32 "
                 "for compressed-tensors and gguf, float16 for gptq)")
  p.add_argument("--snap-zero-points", action="store_true",
                 help="move asymmetric float zeros onto the integer grid (lossy, <= scale/2)")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
  args = p.parse_args(argv)
  from compressjax.io import export  # pylint: disable=g-import-not-at-top
  try:
    export.export_checkpoint(args.checkpoint, args.out, fmt=args.format, dtype=args.dtype,
                             snap=args.snap_zero_points, overwrite=args.overwrite)
  except Exception as e:  # pylint: disable=broad-except
    if args.debug or _debug([]):
      raise
    return _fail("compressjax export", e)
  print(f"compressjax export: wrote {args.format} checkpoint {os.path.abspath(args.out)}")
  return 0


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help"):
    print(USAGE)
    return 0 if len(argv) >= 2 else 2
  cmd, rest = argv[1], argv[2:]
  if cmd == "compress":
    return compress_main([f"{argv[0]} compress", *rest])
  if cmd == "finetune":
    return finetune_main([f"{argv[0]} finetune", *rest])
  if cmd == "eval":
    return eval_main(rest)
  if cmd == "export":
    return export_main(rest)
  print(f"unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
