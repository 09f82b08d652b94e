#!/usr/bin/env bash
# Create .venv (if missing) and install cityseg with its test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to 2.13.0 in pyproject.toml; with a CUDA build of it already installed, pip keeps that one.
.venv/bin/python -m pip install --quiet -e ".[test]"
