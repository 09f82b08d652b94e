#!/usr/bin/env bash
# The CUDA path, checked and measured on a GPU machine, in tiers sized for a short lease on one H100/H200
# (the times are the phases' estimates; --list shows them):
#
#   bash scripts/gpu_check.sh --quick           # about 3 minutes of work (no compile, no evaluation)
#   bash scripts/gpu_check.sh                   # full: about 6 minutes (every one-GPU test, the bench's eager rows)
#   bash scripts/gpu_check.sh --all             # full, the resume test without --deterministic, and the whole
#                                               # bench (compiled row, loop, evaluation): about 9 minutes
#   WHEELS=DIR bash scripts/gpu_check.sh ...    # a node without an index: dependencies from DIR only
#                                               # (bash scripts/gpu_wheels.sh DIR fills it on a machine with one)
#   OUT_DIR=$OUT bash scripts/gpu_check.sh ...  # where the results go (default gpu_check/)
#   bash scripts/gpu_check.sh --list [--quick|--all]   # the phases: name, estimated s, limit s, what runs
#   bash scripts/gpu_check.sh --requirements    # what it installs, one requirement a line
#
# It uses the torch already installed (it never installs or replaces torch, nor the installed numpy) and installs
# only what the check imports (not W&B, which it runs without, nor submitit). The phases run in the order most
# likely to find a defect first (CUDA SyncBN, the bf16 step, host syncs, compile, torchrun, evaluation, then the
# benchmark), each under a time limit, and after every phase OUT_DIR holds what is known so far, so that a run cut
# short keeps what it measured: summary.json and summary.txt (each phase's status, seconds and pytest's last line;
# "pending" for those not reached, "running" for the one cut short), checks.log (every phase's output),
# report.txt (the tests' findings) and results_gpu.json (the benchmark, rewritten after each row); five files.
# PYTHON picks the interpreter (default: python3). Without a torch it fails; without CUDA it says so and exits 0.
# The exit status is 0 when every phase passed, else that of the first phase that did not.
set -f -uo pipefail  # -f: the pytest node ids hold brackets

GPU_TESTS=tests/test_gpu.py
# Estimates are for one H100 or H200 with 16 cores, each process's start (torch, CUDA, cuDNN autotuning)
# included; a limit stops a phase that hangs (a collective waiting forever) before it eats the lease.
INSTALL_ESTIMATE_S=20
INSTALL_LIMIT_S=300

plan() {  # the phases of tier $1 (quick, full, all), one a line: name, estimated s, limit s, pytest|bench, arguments
  local tier=$1 t=$GPU_TESTS
  local step="$t::test_a_bf16_step_has_the_loss_and_gradient_of_an_fp32_step"
  local layout="$t::test_parameters_and_inputs_stay_channels_last"
  local resume="$t::test_torchrun_sigterm_and_resume_on_cuda"
  echo "syncbn 15 120 pytest $t::test_cuda_sync_batchnorm_equals_batchnorm_on_the_concatenated_batch"
  if [ "$tier" = quick ]; then
    echo "bf16 20 180 pytest $step $layout"
  else  # bf16 training over 30 steps; fp16's inf step and the GradScaler's state across a resume
    echo "bf16 60 300 pytest $step $layout $t::test_bf16_training_lowers_the_loss" \
         "$t::test_fp16_skips_an_inf_step_and_its_scaler_survives_a_resume"
  fi
  echo "host_sync 20 180 pytest $t::test_no_host_synchronisation_inside_the_training_step"
  if [ "$tier" != quick ]; then  # one cold inductor compilation of the width-16 U-Net, forward and backward
    echo "compile 75 300 pytest $t::test_compile_matches_eager_and_does_not_recompile"
  fi
  # torchrun, one process (the two-GPU tests skip with one GPU and run with two)
  case $tier in
    quick) echo "torchrun 45 240 pytest $resume[deterministic]" ;;
    full) echo "torchrun 60 300 pytest $resume[deterministic]" \
               "$t::test_a_task_that_sees_one_gpu_takes_it_whatever_its_local_rank" \
               "$t::test_two_ranks_use_nccl_and_cuda_sync_batchnorm_without_host_syncs" \
               "$t::test_two_gpus_of_two_train_like_one_gpu_of_four" ;;
    all) echo "torchrun 95 420 pytest $resume $t::test_a_task_that_sees_one_gpu_takes_it_whatever_its_local_rank" \
              "$t::test_two_ranks_use_nccl_and_cuda_sync_batchnorm_without_host_syncs" \
              "$t::test_two_gpus_of_two_train_like_one_gpu_of_four" ;;
  esac
  if [ "$tier" != quick ]; then  # a model trained 150 steps, 2 images of 1024x2048, 5 runs of evaluate.py
    echo "evaluation 65 300 pytest $t::test_full_resolution_bf16_evaluation_agrees_with_fp32" \
         "$t::test_exported_pngs_agree_between_two_bf16_runs"
  fi
  # the reference recipe's step (width 64, 4 x 512x1024, bf16), eager; its rows: python bench/gpu.py --help
  if [ "$tier" != all ]; then
    echo "bench 45 240 bench --only step --rows eager_nchw,eager_channels_last,eager_syncbn"
  else  # and the compiled row (a second cold compilation), the loop, and full-resolution evaluation
    echo "bench 200 600 bench --only step,loop,eval"
  fi
}

requirements() {  # what the check installs: pyproject's dependencies but those below, and pytest
  "$PYTHON" - <<'EOF'
import re
from pathlib import Path

# torch: the installed one is used. wandb: every run of the check logs with --wandb off, and cityseg imports W&B
# only when it logs. submitit: SLURM submission only. Of the test extra, tests/test_gpu.py needs pytest alone.
NOT_USED = {"torch", "wandb", "submitit"}
text = Path("pyproject.toml").read_text()
listed = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1))
tests = re.findall(r'"([^"]+)"', re.search(r"^test = \[(.*)\]$", text, re.M).group(1))
name = lambda requirement: re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()
print("\n".join([d for d in listed if name(d) not in NOT_USED] + [t for t in tests if name(t) == "pytest"]))
EOF
}

# -- the summary, rewritten after every phase ----------------------------------------------------------------------
NAMES=()
declare -A STATUS=() SECS=() DETAIL=()
TIER=full
ENVIRONMENT=""

init_summary() {  # init_summary PHASE...: every phase pending
  NAMES=("$@")
  local name
  for name in "$@"; do STATUS[$name]=pending; SECS[$name]=""; DETAIL[$name]=""; done
  write_summary
}

write_summary() {  # OUT_DIR/summary.json and summary.txt from the phases' records (each file replaced whole)
  local name records=""
  for name in "${NAMES[@]}"; do
    records+=$(printf '%s\t%s\t%s\t%s' "$name" "${STATUS[$name]}" "${SECS[$name]}" "${DETAIL[$name]//$'\t'/ }")$'\n'
  done
  GPU_CHECK_RECORDS=$records "$PYTHON" - "$OUT_DIR" "$TIER" "$ENVIRONMENT" <<'EOF'
import json
import os
import sys

out, tier, environment = sys.argv[1:4]
phases = [dict(zip(("phase", "status", "seconds", "detail"), line.split("\t")))
          for line in os.environ["GPU_CHECK_RECORDS"].splitlines()]
for p in phases:
    p["seconds"] = int(p["seconds"]) if p["seconds"] else None
doc = {"tier": tier, "environment": environment, "passed": all(p["status"] == "passed" for p in phases),
       "seconds": sum(p["seconds"] or 0 for p in phases), "phases": phases}
table = "".join(f"{p['phase']:<11} {p['status']:<26} {'' if p['seconds'] is None else p['seconds']:>5}  "
                f"{p['detail']}\n" for p in phases)
for name, text in (("summary.json", json.dumps(doc, indent=2) + "\n"), ("summary.txt", table)):
    tmp = os.path.join(out, "." + name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, name))
EOF
}

outcome() {  # the one line that says how a phase went: pytest's failures and last line, or the command's last line
  local output=$1 failed last
  failed=$(printf '%s\n' "$output" | grep -E "^(FAILED|ERROR) " | cut -c1-160 | paste -sd';' -)
  last=$(printf '%s\n' "$output" | grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran" \
         | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  [ -n "$last" ] || last=$(printf '%s\n' "$output" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-200)
  echo "${failed:+$failed; }$last"
}

run_phase() {  # run_phase NAME LIMIT_S COMMAND...: run one phase into checks.log under a time limit; record it
  local name=$1 limit=$2 start=$SECONDS offset code
  shift 2
  STATUS[$name]=running
  write_summary
  echo "== $name (limit ${limit} s): $*" >> "$LOG"
  offset=$(stat -c %s "$LOG")
  # timeout signals its whole process group on expiry: DataLoader workers and torchrun's ranks go too
  PYTHONUNBUFFERED=1 timeout -k 15 "$limit" "$@" < /dev/null >> "$LOG" 2>&1
  code=$?
  SECS[$name]=$(( SECONDS - start ))
  case $code in
    0) STATUS[$name]=passed ;;
    124) STATUS[$name]="timed out (limit ${limit} s)" ;;
    137) if (( SECONDS - start >= limit )); then STATUS[$name]="timed out (limit ${limit} s)"
         else STATUS[$name]="killed (SIGKILL: out of memory?)"; fi ;;
    5) STATUS[$name]="failed: no tests ran" ;;  # pytest: the selection matched nothing (a renamed test?)
    *) STATUS[$name]="failed (exit $code)" ;;
  esac
  DETAIL[$name]=$(outcome "$(tail -c +$(( offset + 1 )) "$LOG")")
  write_summary
  printf 'gpu_check: %-11s %-26s %4s s  %s\n' "$name" "${STATUS[$name]}" "${SECS[$name]}" "${DETAIL[$name]}"
  return "$code"
}

# -- the check -----------------------------------------------------------------------------------------------------
usage() {
  sed -n '2,/^set -f/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

main() {
  cd "$(dirname "$0")/.."
  PYTHON=${PYTHON:-python3}
  OUT_DIR=${OUT_DIR:-gpu_check}
  local list=0 arg
  for arg in "$@"; do
    case $arg in
      --quick) TIER=quick ;;
      --all) TIER=all ;;
      --full) TIER=full ;;
      --list) list=1 ;;
      --requirements) requirements; return ;;
      -h|--help) usage; return ;;
      *) echo "gpu_check: unknown argument $arg (see --help)"; return 2 ;;
    esac
  done
  if [ "$list" = 1 ]; then
    echo "install $INSTALL_ESTIMATE_S $INSTALL_LIMIT_S pip $(requirements | paste -sd' ' -)"
    plan "$TIER"
    return
  fi
  local torch_version
  if ! torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    echo "gpu_check: $PYTHON cannot import torch; install the CUDA build of PyTorch for this machine first" \
         "(or set PYTHON to the interpreter that has it)."
    return 1
  fi
  if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: torch $torch_version here sees no CUDA GPU; nothing to check."
    return 0
  fi
  mkdir -p "$OUT_DIR"
  LOG=$OUT_DIR/checks.log
  : > "$LOG"
  : > "$OUT_DIR/report.txt"
  rm -f "$OUT_DIR/results_gpu.json"  # a file from an earlier run must not pass for this one's
  local phases=() names=() line
  mapfile -t phases < <(plan "$TIER")
  for line in "${phases[@]}"; do names+=("${line%% *}"); done
  local estimate=$INSTALL_ESTIMATE_S
  for line in "${phases[@]}"; do estimate=$(( estimate + $(echo "$line" | cut -d' ' -f2) )); done
  init_summary install "${names[@]}"
  echo "gpu_check: $TIER tier, about $(( (estimate + 30) / 60 )) min; results in $OUT_DIR (summary.txt, checks.log)"
  install_requirements "$torch_version" || return 1
  ENVIRONMENT=$("$PYTHON" -c '
import platform, torch
gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"Python {platform.python_version()}, GPUs: {gpus}")' 2>&1)
  write_summary
  echo "gpu_check: $ENVIRONMENT"
  export GPU_CHECK_REPORT=$OUT_DIR/report.txt
  local first=0 code name estimate_s limit kind args
  for line in "${phases[@]}"; do
    read -r name estimate_s limit kind args <<< "$line"
    if [ "$kind" = bench ]; then
      # shellcheck disable=SC2086  # $args: the phase's arguments, split on spaces
      run_phase "$name" "$limit" "$PYTHON" bench/gpu.py --json "$OUT_DIR/results_gpu.json" --out-dir "$OUT_DIR" $args
    else
      # shellcheck disable=SC2086
      run_phase "$name" "$limit" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider --durations=5 $args
    fi
    code=$?
    if [ "$first" = 0 ] && [ "$code" != 0 ]; then first=$code; fi
  done
  [ -s "$OUT_DIR/report.txt" ] && cat "$OUT_DIR/report.txt"
  echo "gpu_check: $TIER tier done in $SECONDS s; $OUT_DIR/summary.txt:"
  cat "$OUT_DIR/summary.txt"
  return "$first"
}

install_requirements() {  # the requirements, constrained so that the installed torch and numpy stay; from WHEELS if set
  local torch_version=$1 constraints reqs
  constraints=$(mktemp)
  # opencv 5 asks for numpy >= 2, which would otherwise replace an older numpy that the installed torch was built
  # with; -c also keeps any other requirement from pulling a different torch
  { echo "torch==$torch_version"; "$PYTHON" -c "import numpy; print('numpy==' + numpy.__version__)" 2>/dev/null; } \
    > "$constraints"
  reqs=$(requirements)
  local source_args=()
  if [ -n "${WHEELS:-}" ]; then
    source_args=(--no-index --find-links "$WHEELS" --only-binary=:all:)
  fi
  # ${arr[@]+"${arr[@]}"}: an empty array is an unbound variable under set -u in bash <= 4.3
  # shellcheck disable=SC2086  # $reqs: one requirement a line
  run_phase install "$INSTALL_LIMIT_S" "$PYTHON" -m pip install --quiet --disable-pip-version-check \
    ${source_args[@]+"${source_args[@]}"} -c "$constraints" $reqs
  local code=$?
  rm -f "$constraints"
  if [ "$code" != 0 ]; then
    if grep -q "externally-managed-environment" "$LOG"; then
      echo "gpu_check: $PYTHON belongs to the operating system (PEP 668) and pip may not install into it; make a" \
           "venv that sees its torch and run with it: $PYTHON -m venv --system-site-packages .venv-gpu &&" \
           "PYTHON=.venv-gpu/bin/python bash scripts/gpu_check.sh"
    else
      echo "gpu_check: installing cityseg's dependencies failed; see $LOG"
      tail -n 5 "$LOG"
    fi
    return 1
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # sourced (tests/test_launch.py), it only defines the functions
  main "$@"
fi
