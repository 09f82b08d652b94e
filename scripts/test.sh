#!/usr/bin/env bash
# Install (into .venv) and run the test suite on the CPU. Extra arguments go to pytest.
#   bash scripts/test.sh            # everything (what CI runs), on two pytest workers
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
  # two pytest workers (pytest-xdist): many tests wait on processes, daemons and timeouts rather than compute.
  # A file stays on one worker, the two slurm files share one (tests/conftest.py). CITYSEG_TEST_WORKERS=0: one
  # process, no workers.
  python -m pytest -q -n "${CITYSEG_TEST_WORKERS:-2}" --dist loadfile --durations=10 "$@"
fi
