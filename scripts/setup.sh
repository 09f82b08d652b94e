#!/usr/bin/env bash
# Create .venv (if missing) and install cityseg with its test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The exact torch this repository tests with, first: pyproject.toml only asks for a range (torch>=2.6.0a0), which
# a torch already in .venv (a CUDA build, say) satisfies; without one, a bare range would pull the newest
# CUDA build, several GB.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
