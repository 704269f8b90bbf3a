"""The notebooks in colab/ run top to bottom (nbclient) in their small CPU setting.

Each notebook is executed in a fresh kernel with ``COMPRESSJAX_NB_SMALL=1`` (few, short windows;
a tiny random model in the extreme notebook) and ``COMPRESSJAX_NB_OFFLINE=1`` (the shipped corpora,
no network) and ``COMPRESSJAX_NB_LAYERS=4`` (the quickstart keeps the reference model's first 4
blocks: compiling all 30 for each of its programs was most of its run time), this checkout first
on the path; a cell that raises fails the test. Set
``COMPRESSJAX_NB_OUT=dir`` to keep the executed notebooks.
"""

import os
import time

import pytest

from conftest import REPO, require

NOTEBOOKS = ["quickstart.ipynb", "compare_methods.ipynb", "extreme.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, monkeypatch):
  nbformat = require("nbformat")
  nbclient = require("nbclient")
  require("ipykernel")
  require("matplotlib")
  monkeypatch.setenv("COMPRESSJAX_NB_SMALL", "1")
  monkeypatch.setenv("COMPRESSJAX_NB_OFFLINE", "1")
  monkeypatch.setenv("COMPRESSJAX_NB_LAYERS", "4")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  colab = os.path.join(REPO, "colab")
  nb = nbformat.read(os.path.join(colab, name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                   resources={"metadata": {"path": colab}})
  t0 = time.time()
  client.execute()  # raises CellExecutionError naming the failing cell
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert os.path.join(REPO, "compressjax") in outputs, "the notebook imported another compressjax"
  if name == "quickstart.ipynb":  # COMPRESSJAX_NB_LAYERS honoured (else CI compiles all 30 blocks)
    assert "num_layers=4," in outputs, "the quickstart ignored COMPRESSJAX_NB_LAYERS"
  print(f"{name}: {time.time() - t0:.1f} s")
  if os.environ.get("COMPRESSJAX_NB_OUT"):  # keep the executed notebook (outputs) for reading
    os.makedirs(os.environ["COMPRESSJAX_NB_OUT"], exist_ok=True)
    nbformat.write(nb, os.path.join(os.environ["COMPRESSJAX_NB_OUT"], name))
