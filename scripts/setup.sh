#!/usr/bin/env bash
# Create .venv and install uae-hf with its demo and test extras, at the tested versions (constraints.txt).
# TORCH_SPEC picks the torch build: the default matches the CPU machines this project is tested on; on a GPU
# machine use e.g. TORCH_SPEC="torch torchvision" (or a CUDA index via PIP_EXTRA_INDEX_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet $TORCH_SPEC
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[demo,test]"
