#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite on the CPU. Extra arguments go to pytest.
# As root (or in CI) it also starts the local one-node SLURM cluster the `slurm` tests run against
# (slurm/local_cluster.sh installs Debian's slurm packages when missing); elsewhere those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = 0 ] || [ -n "${CI:-}" ]; then
  bash slurm/local_cluster.sh up
fi
. .venv/bin/activate
python -m pytest -q "$@"
