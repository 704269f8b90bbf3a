"""Smoke test of the compress and eval entry points on a tiny model and tiny corpora."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _run(args, **kw):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600, **kw)


def test_compress_then_eval_reproduces_bit_for_bit(tiny_gguf, tiny_data, tmp_path):
  path, _ = tiny_gguf
  out = tmp_path / "ckpt"
  results = tmp_path / "results.jsonl"
  r = _run(["experiments/compress.py", "--config", "configs/rtn_w4g64.py",
            f"--config.model={path}", f"--config.data.dir={tiny_data}",
            "--config.data.seq_len=64", "--config.data.num_eval_windows=3",
            "--config.data.batch_size=2", f"--config.output_dir={out}",
            f"--config.results_file={results}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "rtn-w4g64" in r.stdout and "uncompressed" in r.stdout and "bits/param" in r.stdout
  rec = json.loads(results.read_text().strip().splitlines()[-1])
  for key in ("method", "settings", "bits_per_param", "ppl_wiki", "ppl_austen", "wall_s",
              "peak_rss_mb", "date", "commit", "machine"):
    assert key in rec, key
  assert rec["bits_per_param"] == pytest.approx(4 + 16 / 64)
  assert rec["ppl_wiki"] > 1 and rec["baseline_ppl_wiki"] > 1
  r = _run(["experiments/eval.py", "--checkpoint", str(out), "--data-dir", tiny_data])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "yes" in r.stdout and "NO" not in r.stdout


def test_bad_config_values_fail_clearly(tiny_gguf, tiny_data, tmp_path):
  path, _ = tiny_gguf
  common = [f"--config.model={path}", f"--config.data.dir={tiny_data}", "--config.data.seq_len=64",
            "--config.data.num_eval_windows=1", "--config.eval_before=False", "--config.output_dir="]
  r = _run(["experiments/compress.py", "--config", "configs/rtn_w4g64.py",
            "--config.compression.kwargs.group_size=48", *common])
  assert r.returncode != 0
  assert "group_size" in r.stderr and "layers/0/" in r.stderr
  r = _run(["experiments/compress.py", "--config", "configs/rtn_w4g64.py",
            "--config.compression.kwargs.bits=5", *common])
  assert r.returncode != 0 and "bits must be one of" in r.stderr
  r = _run(["experiments/compress.py", "--config", "configs/rtn_w4g64.py",
            r"--config.compression.where=layers/\d+/attn/qkv_proj/kernel", *common])
  assert r.returncode != 0 and "matched no parameter" in r.stderr
  r = _run(["experiments/compress.py", "--config", "configs/rtn_w4g64.py",
            f"--config.model={tmp_path}/missing.gguf", *common[1:]])
  assert r.returncode != 0 and "missing.gguf" in r.stderr
  assert not os.path.exists(tmp_path / "ckpt")


def test_colab_notebook_is_valid_and_uses_the_public_api():
  nb = json.load(open(os.path.join(REPO, "colab", "quickstart.ipynb")))
  src = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
  compile(src, "quickstart.ipynb", "exec")  # syntax
  import compressjax.calibration, compressjax.generate, compressjax.io  # noqa: F401
  from compressjax import accounting, checkpoint, data, evaluate, transforms
  for name in ("select", "rtn", "gptq", "plan", "apply", "to_abstract"):
    assert hasattr(transforms, name), name
  for mod, name in ((data, "protocol_eval_windows"), (data, "protocol_calibration_windows"),
                    (evaluate, "perplexity"), (checkpoint, "save"), (accounting, "size_report")):
    assert hasattr(mod, name), name


# 3-bit codes are packed 10 per uint32: on the tiny model a K=64 column takes 7 words (3.5 bits
# per code) and a K=128 one (down_proj) 13 words (3.25 bits): 3.444 bits per code overall.
W3_TINY = (28672 * 3.5 + 8192 * 3.25) / 36864


@pytest.mark.parametrize("name, bits", [
    ("gptq_w3g64", W3_TINY + 0.25), ("awq_w3g64", W3_TINY + 0.25),
    pytest.param("spqr_w3g16", None, marks=pytest.mark.slow), ("owq_w3", None),  # spqr: ~30 s
    ("sparsegpt_50_w4g64", (3.2, 3.3)), ("wanda_2of4", 9.0), ("magnitude_50_lamp", 9.0),
    ("structured_20", (20.0, 28.0)), ("gptq_w3g64_eora16", (W3_TINY + 0.25, 16.0)), ("asvd_80", (10, 13))])
def test_data_aware_configs_run_end_to_end(tiny_gguf, tiny_data, tmp_path, name, bits):
  """Each issue-3/4/5 recipe: calibrate, compress, evaluate, save, and reload bit for bit."""
  import importlib

  from compressjax import pipeline
  cfg = importlib.import_module(f"configs.{name}").get_config()
  cfg.model, cfg.data.dir = tiny_gguf[0], tiny_data
  cfg.data.seq_len, cfg.data.num_eval_windows, cfg.data.batch_size = 64, 2, 2
  cfg.calibration.num_windows, cfg.calibration.seq_len, cfg.calibration.batch_size = 4, 64, 2
  cfg.eval_before = False
  cfg.output_dir = str(tmp_path / "ck")
  if name == "gptq_w3g64":  # the engine's bfloat16 matmuls through the config
    cfg.calibration.matmul_dtype = "bfloat16"
  rec = pipeline.run_compress(cfg)
  assert rec["ppl_wiki"] > 1
  if pipeline.needs_calibration(cfg.compression):
    assert rec["calibration"]["num_windows"] == 4
    assert rec["calibration"]["matmul_dtype"] == ("bfloat16" if name == "gptq_w3g64" else
                                                  "float32")
  else:
    assert rec["calibration"] is None
  if isinstance(bits, tuple):
    assert bits[0] <= rec["bits_per_param"] <= bits[1]
  elif bits is not None:
    assert rec["bits_per_param"] == pytest.approx(bits)
  else:  # higher-precision extras (statistics, outliers, kept rows) cost something
    assert 3.0 < rec["bits_per_param"] < 5.0
  again = pipeline.run_eval(cfg.output_dir)
  assert all(r["matches_saved"] for r in again.values())


def test_every_config_builds_its_recipe_and_every_bench_entry_exists():
  """A typo in a config (method, kwarg) or a bench entry without a config fails here, not an hour
  into a benchmark run."""
  import importlib

  from compressjax import pipeline
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  try:
    bench_quality = importlib.import_module("bench_quality")
  finally:
    sys.path.pop(0)
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                 if f.endswith(".py") and f != "__init__.py")
  out_dirs = {}
  from compressjax.finetune import job
  for name in names:
    cfg = importlib.import_module(f"configs.{name}").get_config()
    if "finetune" in cfg and "compression" not in cfg:  # a `compressjax finetune` config
      job.distill_config(cfg.finetune)
      continue
    pipeline.build_transform(cfg.compression)
    assert cfg.output_dir not in out_dirs, (name, out_dirs.get(cfg.output_dir))
    out_dirs[cfg.output_dir] = name
  for bench, configs in bench_quality.BENCHES.items():
    missing = [c for c in configs if c not in names]
    assert not missing, (bench, missing)


_FT_DATA = ["--config.data.seq_len=64", "--config.data.num_eval_windows=2",
            "--config.data.batch_size=2"]


@pytest.fixture(scope="module")
def tiny_student(tiny_gguf, tiny_data, tmp_path_factory):
  """A 2-bit RTN checkpoint of the tiny model (the student of the finetune job tests)."""
  path, _ = tiny_gguf
  student = tmp_path_factory.mktemp("ft") / "student"
  r = _run(["experiments/compress.py", "--config", "configs/rtn_w4g64.py", f"--config.model={path}",
            "--config.eval_before=False", "--config.compression.kwargs.bits=2",
            f"--config.output_dir={student}", f"--config.data.dir={tiny_data}", *_FT_DATA])
  assert r.returncode == 0, r.stderr[-3000:]
  return student


def test_finetune_job_tunes_a_saved_checkpoint(tiny_gguf, tiny_data, tiny_student, tmp_path):
  path, _ = tiny_gguf
  data = [f"--config.data.dir={tiny_data}", *_FT_DATA]
  student = tiny_student
  out, results = tmp_path / "tuned", tmp_path / "ft.jsonl"
  args = ["-m", "compressjax.cli", "finetune", "--config", "configs/finetune_kd.py",
          f"--config.model={path}", f"--config.checkpoint={student}", *data,
          "--config.calibration.num_windows=4", "--config.calibration.heldout_windows=2",
          "--config.calibration.seq_len=64", "--config.finetune.steps=3",
          "--config.finetune.accum=2", "--config.finetune.chunk=32", "--config.finetune.lr=1e-3",
          f"--config.output_dir={out}", f"--config.results_file={results}",
          f"--config.resume_dir={tmp_path / 'resume'}"]
  r = _run(args)
  assert r.returncode == 0, r.stderr[-3000:]
  rec = json.loads(results.read_text().strip().splitlines()[-1])
  assert rec["method"] == "rtn-w4g64+kd" and rec["steps"] == 3 and len(rec["loss_curve"]) == 3
  assert rec["bits_per_param"] == pytest.approx(2 + 16 / 64)
  assert rec["heldout_kd_after"] is not None and rec["ppl_wiki"] > 1
  assert os.path.exists(tmp_path / "resume" / "loss_log.jsonl")
  r = _run(["experiments/eval.py", "--checkpoint", str(out), "--data-dir", tiny_data])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "yes" in r.stdout and "NO" not in r.stdout
  # Refusals: no checkpoint; an output path inside the student checkpoint.
  r = _run(["-m", "compressjax.cli", "finetune", "--config", "configs/finetune_kd.py",
            f"--config.model={path}", *data])
  assert r.returncode == 1 and "checkpoint" in r.stderr


@pytest.mark.slow  # ~22 s; the finetune job: test_finetune_job_tunes_a_saved_checkpoint
def test_finetune_job_pv_mode_end_to_end(tiny_gguf, tiny_data, tiny_student, tmp_path):
  """``compressjax finetune --config configs/finetune_pv.py`` on the tiny 2-bit checkpoint, a
  few steps: the record says mode "pv", the tuned checkpoint evaluates."""
  path, _ = tiny_gguf
  out, results = tmp_path / "tuned", tmp_path / "ft.jsonl"
  r = _run(["-m", "compressjax.cli", "finetune", "--config", "configs/finetune_pv.py",
            f"--config.model={path}", f"--config.checkpoint={tiny_student}",
            f"--config.data.dir={tiny_data}", *_FT_DATA,
            "--config.calibration.num_windows=4", "--config.calibration.heldout_windows=2",
            "--config.calibration.seq_len=32", "--config.finetune.steps=2",
            "--config.finetune.accum=1", "--config.finetune.chunk=32",
            "--config.finetune.tau=0.05", "--config.finetune.lr_v=2e-2",
            f"--config.output_dir={out}", f"--config.results_file={results}"])
  assert r.returncode == 0, r.stderr[-3000:]
  rec = json.loads(results.read_text().strip().splitlines()[-1])
  assert rec["mode"] == "pv" and rec["method"] == "rtn-w4g64+pv" and rec["steps"] == 2
  assert rec["settings"]["finetune"]["tau"] == 0.05
  assert rec["heldout_kd_after"] is not None and rec["ppl_wiki"] > 1
  assert rec["bits_per_param"] == pytest.approx(2 + 16 / 64)
  r = _run(["experiments/eval.py", "--checkpoint", str(out), "--data-dir", tiny_data])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "yes" in r.stdout and "NO" not in r.stdout
