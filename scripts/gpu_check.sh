#!/usr/bin/env bash
# The CUDA path, checked and measured in one command on a GPU machine (planned for about 5 minutes on one H200):
#
#   bash scripts/gpu_check.sh                           # other dependencies from PyPI
#   WHEELS=/path/to/wheels bash scripts/gpu_check.sh    # from a local wheel folder (a node with no internet)
#
# It uses the torch already installed (it never installs or replaces torch, nor the installed numpy), installs
# cityseg's other dependencies, runs the GPU-marked tests and bench/gpu.py, and writes their logs and
# results_gpu.json into OUT_DIR (default: gpu_check/), printing how long each phase took. PYTHON picks the
# interpreter (default: python3). Without a torch it fails; on a machine without CUDA it says so and exits 0.
# The exit status is that of the tests, or the benchmark's if the tests passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-gpu_check}

if ! torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "gpu_check: $PYTHON cannot import torch; install the CUDA build of PyTorch for this machine first" \
       "(or set PYTHON to the interpreter that has it)."
  exit 1
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: torch $torch_version here sees no CUDA GPU; nothing to check."
  exit 0
fi
mkdir -p "$OUT_DIR"
t0=$SECONDS
phase_start=$SECONDS
phase() {  # print the time of the phase that just ended
  echo "gpu_check: $1 took $(( SECONDS - phase_start )) s"
  phase_start=$SECONDS
}

# The dependencies of pyproject.toml but torch, constrained so that the installed torch and numpy stay (opencv 5
# asks for numpy >= 2, which would otherwise replace an older numpy that the installed torch was built with).
{
  echo "torch==$torch_version"
  "$PYTHON" -c "import numpy; print('numpy==' + numpy.__version__)" 2>/dev/null
} > "$OUT_DIR/constraints.txt"
deps=$("$PYTHON" - <<'EOF'
import re
from pathlib import Path

text = Path("pyproject.toml").read_text()
listed = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1))
tests = re.findall(r'"([^"]+)"', re.search(r"^test = \[(.*)\]$", text, re.M).group(1))
print(" ".join(d for d in listed + tests if not re.match(r"(torch|cityseg)\b", d)))
EOF
)
source_args=()
if [ -n "${WHEELS:-}" ]; then
  source_args=(--no-index --find-links "$WHEELS")
fi
# ${arr[@]+"${arr[@]}"}: an empty array is an unbound variable under set -u in bash <= 4.3
# shellcheck disable=SC2086  # $deps is a list of requirement strings
if ! "$PYTHON" -m pip install --quiet ${source_args[@]+"${source_args[@]}"} -c "$OUT_DIR/constraints.txt" $deps \
    > "$OUT_DIR/install.log" 2>&1; then
  if grep -q "externally-managed-environment" "$OUT_DIR/install.log"; then
    echo "gpu_check: $PYTHON belongs to the operating system (PEP 668) and pip may not install into it; make a" \
         "venv that sees its torch and run with it: $PYTHON -m venv --system-site-packages .venv-gpu &&" \
         "PYTHON=.venv-gpu/bin/python bash scripts/gpu_check.sh"
  else
    echo "gpu_check: installing cityseg's dependencies failed; see $OUT_DIR/install.log"
    tail -n 5 "$OUT_DIR/install.log"
  fi
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
phase "installing"

echo "gpu_check: GPU tests -> $OUT_DIR/tests.log, findings in $OUT_DIR/report.txt"
: > "$OUT_DIR/report.txt"
GPU_CHECK_REPORT="$OUT_DIR/report.txt" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider --durations=15 tests \
  > "$OUT_DIR/tests.log" 2>&1
tests_status=$?
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT_DIR/tests.log" | tail -n 20
cat "$OUT_DIR/report.txt"
phase "the GPU tests"

echo "gpu_check: benchmark -> $OUT_DIR/bench.log, $OUT_DIR/results_gpu.json"
# --no-compile: one cold inductor compilation (the GPU test's) is enough for the time budget
"$PYTHON" bench/gpu.py --no-compile --json "$OUT_DIR/results_gpu.json" --out-dir "$OUT_DIR" \
  > "$OUT_DIR/bench.log" 2>&1
bench_status=$?
cat "$OUT_DIR/bench.log"
phase "the benchmark"
echo "gpu_check: done in $(( SECONDS - t0 )) s (tests exit $tests_status, benchmark exit $bench_status)"
if [ "$tests_status" -ne 0 ]; then exit "$tests_status"; fi
exit "$bench_status"
