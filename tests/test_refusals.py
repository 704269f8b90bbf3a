"""What the ``compress`` / ``eval`` jobs refuse, and when: before any long work, in one line.

Each test is a reproduction of a reported problem (data loss on save, silent wrong results,
late validation, unreadable errors) that now gives the right outcome.
"""

import contextlib
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import checkpoint, cli, pipeline
from compressjax.io import build_model, model_params
from conftest import REPO


def _run(args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("COMPRESSJAX_DEBUG", None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "experiments/compress.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _cfg(name, tiny_gguf, tiny_data, out=""):
  import importlib
  cfg = importlib.import_module(f"configs.{name}").get_config()
  cfg.model, cfg.data.dir = tiny_gguf[0], tiny_data
  cfg.data.seq_len, cfg.data.num_eval_windows, cfg.data.batch_size = 64, 2, 2
  cfg.calibration.num_windows, cfg.calibration.seq_len, cfg.calibration.batch_size = 4, 64, 2
  cfg.eval_before = False
  cfg.output_dir = str(out)
  return cfg


@pytest.fixture()
def common(tiny_gguf, tiny_data):
  return [f"--config.model={tiny_gguf[0]}", f"--config.data.dir={tiny_data}",
          "--config.data.seq_len=64", "--config.data.num_eval_windows=2",
          "--config.calibration.seq_len=64", "--config.calibration.num_windows=4",
          "--config.eval_before=False", "--config.output_dir="]


def _one_line_error(r, *fragments):
  assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
  err = [l for l in r.stderr.splitlines() if "compressjax compress: error:" in l]
  assert len(err) == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  for f in fragments:
    assert f in err[0], (f, err[0])
  return err[0]


# Impossible settings are errors before any work, naming the setting.
@pytest.mark.parametrize("key, value, fragments", [
    ("calibration.seq_len", 0, ["calibration.seq_len", "positive"]),
    ("calibration.num_windows", 0, ["calibration.num_windows"]),
    ("calibration.matmul_dtype", "float16", ["calibration.matmul_dtype", "bfloat16"]),
    ("calibration.num_windows", 100000, ["100000 calibration windows", "holds only"]),
    ("data.num_eval_windows", 0, ["data.num_eval_windows"]),
    ("data.num_eval_windows", 100000, ["num_windows=100000", "wiki"]),
    ("data.seq_len", 1000, ["data.seq_len=1000", "maximum position"]),
    ("calibration.seq_len", 1000, ["calibration.seq_len=1000", "maximum position"]),
    ("compression.kwargs.group_size", 48, ["group_size", "layers/0/"]),
    ("compression.kwargs.group_size", 0, ["group_size"]),
    ("compression.kwargs.percdamp", -0.5, ["percdamp"]),
    ("compression.where", r"layers/\d+/attn/qkv_proj/kernel", ["matched no parameter"]),
])
def test_impossible_settings_fail_before_any_work(tiny_gguf, tiny_data, monkeypatch, key, value,
                                                  fragments):
  cfg = _cfg("gptq_w4g64", tiny_gguf, tiny_data)
  cfg.eval_before = True
  node = cfg
  *parents, last = key.split(".")
  for k in parents:
    node = node[k]
  with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
    node[last] = value
  started = []  # neither the baseline evaluation nor calibration may have started
  monkeypatch.setattr(pipeline, "_eval_all", lambda *a, **k: started.append("eval"))
  monkeypatch.setattr(pipeline.calibration, "run_sequential",
                      lambda *a, **k: started.append("calibration"))
  with pytest.raises(ValueError) as e:
    pipeline.run_compress(cfg)
  for f in fragments:
    assert f in str(e.value), (f, str(e.value))
  assert not started


@pytest.mark.parametrize("args, fragments", [
    (["--config.calibration.seq_len=0"], ["calibration.seq_len", "positive"]),
    (["--config.compression.kwargs.group_size=48"], ["group_size", "layers/0/"]),
])
def test_cli_prints_one_line_and_exits_1(common, args, fragments):
  r = _run(["--config", "configs/gptq_w4g64.py", *common, *args])
  _one_line_error(r, *fragments)
  assert "calibrate" not in r.stderr  # no calibration progress bar: refused before the work


def test_whitespace_and_invalid_utf8_calibration_text(common, tmp_path):
  (tmp_path / "ws.txt").write_text("  \n\n\t ")
  (tmp_path / "bad.txt").write_bytes(b"some text \xff\xfe more")
  r = _run(["--config", "configs/gptq_w4g64.py", *common,
            f"--config.calibration.source={tmp_path / 'ws.txt'}"])
  _one_line_error(r, "ws.txt", "no text")
  r = _run(["--config", "configs/gptq_w4g64.py", *common,
            f"--config.calibration.source={tmp_path / 'bad.txt'}"])
  _one_line_error(r, "bad.txt", "UTF-8")


def test_debug_shows_the_traceback(common):
  r = _run(["--config", "configs/gptq_w4g64.py", *common, "--config.calibration.seq_len=0",
            "--debug"])
  assert r.returncode != 0 and "Traceback" in r.stderr
  r = _run(["--config", "configs/gptq_w4g64.py", *common, "--config.calibration.seq_len=0"],
           {"COMPRESSJAX_DEBUG": "1"})
  assert r.returncode != 0 and "Traceback" in r.stderr


def test_eval_cli_one_line_error(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("COMPRESSJAX_DEBUG", None)
  r = subprocess.run([sys.executable, "experiments/eval.py", "--checkpoint", str(tmp_path / "no")],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert "compressjax eval: error:" in r.stderr and str(tmp_path / "no") in r.stderr


@pytest.mark.slow  # three CLI jobs in subprocesses (~90 s alone); test_split_method_args_reads_literals stays
def test_method_arguments_settable_from_the_command_line(common, tmp_path):
  """``bits`` is not in configs/default.py's kwargs, ``percdamp`` not in gptq_w4g64's, and
  the second step of a chain is addressed by index."""
  res = tmp_path / "r.jsonl"
  r = _run(["--config", "configs/default.py", *common, "--config.compression.method=rtn",
            "--config.compression.kwargs.bits=3", "--config.compression.kwargs.group_size=32",
            f"--config.results_file={res}"])
  assert r.returncode == 0, r.stderr[-3000:]
  rec = json.loads(res.read_text().splitlines()[-1])
  assert rec["settings"]["kwargs"] == {"bits": 3, "group_size": 32}
  # 3-bit codes 10 per uint32 on the tiny model (K=64: 7 words, K=128: 13 words) + fp16 / 32.
  assert rec["bits_per_param"] == pytest.approx((28672 * 3.5 + 8192 * 3.25) / 36864 + 16 / 32)
  r = _run(["--config", "configs/sparsegpt_50_w4g64.py", *common,
            "--config.compression.steps.1.bits=3", "--config.compression.steps.0.sparsity=0.25",
            f"--config.results_file={res}"])
  assert r.returncode == 0, r.stderr[-3000:]
  rec = json.loads(res.read_text().splitlines()[-1])
  assert rec["settings"]["steps"][1]["bits"] == 3
  assert rec["settings"]["steps"][0]["sparsity"] == 0.25
  r = _run(["--config", "configs/sparsegpt_50_w4g64.py", *common,
            "--config.compression.steps.5.bits=3"])
  _one_line_error(r, "steps.5", "2 compression.steps entries")


def test_split_method_args_reads_literals():
  rest, ov = cli.split_method_args(["p", "--config.x=1", "--config.compression.kwargs.a=0.5",
                                    "--config.compression.kwargs.b=true",
                                    "--config.compression.rules.0.c=name",
                                    "--config.compression.kwargs.d=None"])
  assert rest == ["p", "--config.x=1"]
  assert ov == [("kwargs", None, "a", 0.5), ("kwargs", None, "b", True), ("rules", 0, "c", "name"),
                ("kwargs", None, "d", None)]


def test_nonfinite_weight_is_refused_naming_the_tensor(tmp_path, tiny_data):
  model = tiny.tiny_model(seed=2)
  params = model_params(model)
  k = np.array(params["layers"][1]["mlp"]["up_proj"]["kernel"])
  k[3, 4], k[5, 6] = np.nan, np.inf
  params["layers"][1]["mlp"]["up_proj"]["kernel"] = jnp.asarray(k)
  path = str(tmp_path / "nan.gguf")
  tiny.write_tiny_gguf(path, build_model(model.cfg, params))
  for name in ("rtn_w4g64", "gptq_w4g64"):
    cfg = _cfg(name, (path,), tiny_data)
    with pytest.raises(ValueError, match=r"layers/1/mlp/up_proj/kernel' has 2 non-finite"):
      pipeline.run_compress(cfg)
  cfg = _cfg("rtn_w4g64", (path,), tiny_data)
  cfg.allow_nonfinite = True  # the explicit option lets the job go on to the quantizer...
  with pytest.raises(ValueError, match="layers/1/mlp/up_proj/kernel"):  # ...which refuses it too
    pipeline.run_compress(cfg)


def test_save_never_deletes_what_it_did_not_write(tiny_gguf, tiny_data, tmp_path):
  """The README's first config used to set overwrite=True and delete whatever was at
  output_dir; now a non-checkpoint is refused before any work, overwrite or not."""
  user_dir = tmp_path / "mine"
  user_dir.mkdir()
  (user_dir / "notes.txt").write_text("precious")
  user_file = tmp_path / "file.txt"
  user_file.write_text("precious too")
  for out in (user_dir, user_file):
    for overwrite in (False, True):
      cfg = _cfg("rtn_w4g64", tiny_gguf, tiny_data, out)
      cfg.overwrite = overwrite
      with pytest.raises((checkpoint.CheckpointError, FileExistsError), match=str(out)):
        pipeline.run_compress(cfg)
  assert (user_dir / "notes.txt").read_text() == "precious"
  assert user_file.read_text() == "precious too"
  assert sorted(os.listdir(tmp_path)) == ["file.txt", "mine"]  # no temporary left behind
  # A checkpoint of ours is replaced only with overwrite.
  ck = tmp_path / "ck"
  pipeline.run_compress(_cfg("rtn_w4g64", tiny_gguf, tiny_data, ck))
  with pytest.raises((checkpoint.CheckpointError, FileExistsError), match="overwrite"):
    pipeline.run_compress(_cfg("rtn_w4g64", tiny_gguf, tiny_data, ck))
  cfg = _cfg("rtn_w4g64", tiny_gguf, tiny_data, ck)
  cfg.overwrite = True
  pipeline.run_compress(cfg)


def test_no_shipped_config_sets_overwrite():
  import importlib
  names = [f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
           if f.endswith(".py") and f != "__init__.py"]
  for name in names:
    assert not importlib.import_module(f"configs.{name}").get_config().overwrite, name


def test_refuses_to_write_into_the_input_models_directory(tmp_path, tiny_data):
  from compressjax.io import save_hf
  model = tiny.tiny_model(seed=3)
  hf = tmp_path / "hf_model"
  save_hf(str(hf), model.cfg, model_params(model))
  before = sorted(os.listdir(hf))
  for out in (hf, hf / "compressed", tmp_path):
    cfg = _cfg("rtn_w4g64", ("x",), tiny_data, out)
    cfg.model = str(hf)
    cfg.overwrite = True
    with pytest.raises((checkpoint.CheckpointError, FileExistsError, ValueError)):
      pipeline.run_compress(cfg)
  assert sorted(os.listdir(hf)) == before


@pytest.mark.slow  # two calibrated compress jobs (~40 s alone)
def test_same_seed_gives_bit_identical_checkpoints(tiny_gguf, tiny_data, tmp_path):
  """Two runs of one calibrated recipe with the same seed: every stored array identical."""
  manifests = []
  for run in ("a", "b"):
    cfg = _cfg("gptq_w4g64", tiny_gguf, tiny_data, tmp_path / run)
    pipeline.run_compress(cfg)
    manifests.append(checkpoint.read_manifest(str(tmp_path / run)))
  assert manifests[0]["leaves"] == manifests[1]["leaves"]  # per-array CRC32, shapes, formats
  pa, _ = checkpoint.restore(str(tmp_path / "a"))
  pb, _ = checkpoint.restore(str(tmp_path / "b"))
  import jax
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
