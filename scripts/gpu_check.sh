#!/usr/bin/env bash
# The CUDA path, checked and measured in one command on a GPU machine (under 9 minutes on one H200):
#
#   bash scripts/gpu_check.sh                           # other dependencies from PyPI
#   WHEELS=/path/to/wheels bash scripts/gpu_check.sh    # from a local wheel folder (a node with no internet)
#
# It uses the torch already installed (it never installs torch), installs cityseg's other dependencies,
# runs the GPU-marked tests and bench/gpu.py, and writes their logs and results_gpu.json into OUT_DIR
# (default: gpu_check/). PYTHON picks the interpreter (default: python3). On a machine without CUDA it says so
# and exits 0. The exit status is that of the tests, or the benchmark's if the tests passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-gpu_check}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PYTHON's torch here; nothing to check."
  exit 0
fi
mkdir -p "$OUT_DIR"
t0=$SECONDS

# The dependencies of pyproject.toml but torch, constrained to the installed torch so nothing replaces it.
torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
echo "torch==$torch_version" > "$OUT_DIR/constraints.txt"
deps=$("$PYTHON" - <<'EOF'
import re
from pathlib import Path

text = Path("pyproject.toml").read_text()
listed = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1))
tests = re.findall(r'"([^"]+)"', re.search(r"^test = \[(.*?)\]", text, re.M).group(1))
print(" ".join(d for d in listed + tests if not re.match(r"torch\b", d)))
EOF
)
source_args=()
if [ -n "${WHEELS:-}" ]; then
  source_args=(--no-index --find-links "$WHEELS")
fi
# shellcheck disable=SC2086  # $deps is a list of requirement strings
if ! "$PYTHON" -m pip install --quiet "${source_args[@]}" -c "$OUT_DIR/constraints.txt" $deps \
    > "$OUT_DIR/install.log" 2>&1; then
  echo "gpu_check: installing cityseg's dependencies failed; see $OUT_DIR/install.log"
  tail -n 5 "$OUT_DIR/install.log"
  exit 1
fi
"$PYTHON" - > "$OUT_DIR/environment.txt" <<'EOF'
import platform, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"Python {platform.python_version()}")
for i in range(torch.cuda.device_count()):
    print(f"GPU {i}: {torch.cuda.get_device_name(i)}")
EOF
cat "$OUT_DIR/environment.txt"

echo "gpu_check: GPU tests -> $OUT_DIR/tests.log"
"$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider tests > "$OUT_DIR/tests.log" 2>&1
tests_status=$?
tail -n 15 "$OUT_DIR/tests.log"

echo "gpu_check: benchmark -> $OUT_DIR/bench.log, $OUT_DIR/results_gpu.json"
"$PYTHON" bench/gpu.py --json "$OUT_DIR/results_gpu.json" --out-dir "$OUT_DIR" > "$OUT_DIR/bench.log" 2>&1
bench_status=$?
cat "$OUT_DIR/bench.log"
echo "gpu_check: done in $(( SECONDS - t0 )) s (tests exit $tests_status, benchmark exit $bench_status)"
if [ "$tests_status" -ne 0 ]; then exit "$tests_status"; fi
exit "$bench_status"
