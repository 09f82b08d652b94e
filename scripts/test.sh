#!/usr/bin/env bash
# Install (into .venv) and run the test suite on the CPU. Extra arguments go to pytest.
#   bash scripts/test.sh            # everything (what CI runs)
#   bash scripts/test.sh --quick    # the quick tier (tests marked `quick`): every module of cityseg/ through a
#                                   # real path, in a few minutes; it fails if a module was not reached
# As root (or in CI) the full run also starts the local one-node SLURM cluster the `slurm` tests run against
# (slurm/local_cluster.sh installs Debian's slurm packages when missing); elsewhere those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then
  quick=1
  shift
fi
bash scripts/setup.sh
if [ "$quick" = 0 ] && { [ "$(id -u)" = 0 ] || [ -n "${CI:-}" ]; }; then
  bash slurm/local_cluster.sh up
fi
. .venv/bin/activate
if [ "$quick" = 1 ]; then
  CITYSEG_QUICK=1 python -m pytest -q -m quick "$@"
else
  python -m pytest -q "$@"
fi
