#!/usr/bin/env bash
# Download into DIR every wheel that scripts/gpu_check.sh installs beyond what the lent GPU machines' image has
# (their 'cuda' image: CPython 3.12, torch 2.11, numpy, opencv, pytest, ... and no package index), so that
# `WHEELS=DIR bash scripts/gpu_check.sh` works there:
#
#   bash scripts/gpu_wheels.sh DIR [--python-version 3.12]   # with an index; prints each wheel and the total
#   bash scripts/gpu_wheels.sh --image                       # the image's packages: name, or name==version
#   bash scripts/gpu_wheels.sh --stubs DIR                   # metadata-only wheels standing for the pinned ones
#
# The wheels are manylinux x86_64 binaries for CPython (3.12 by default), one version of each package, chosen by
# pip's own resolver over the index plus stub wheels that stand for the image's packages at their versions, so
# every choice fits what the image has. Packages the image has are left out. The set must stay within the
# 64 MiB that travels with a working tree; the script fails if it does not. W&B and submitit are not in it: the
# check does not use them (scripts/gpu_check.sh --requirements). PYTHON picks the interpreter that runs pip.
set -euo pipefail
HERE=$(dirname "$0")
PYTHON=${PYTHON:-python3}
BUDGET_MIB=64
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

image() {  # the image's packages, one a line: name==version where a version is known, else the name
  # Names: /work/.library/device/KINDS.md, read on a machine running the image on 2026-11-17.
  cat <<'EOF' | tr ' ' '\n' | grep -v '^$'
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
EOF
}

pins() {  # versions of the image's packages: read there, or stood in for where the check's requirements reach
  # Read on the image (KINDS.md, 2026-11).
  cat <<'EOF'
numpy==2.5.2
onnx==1.23.1
onnxruntime==1.30.0
safetensors==0.8.0
torch==2.11.0
torchvision==0.26.0
triton==3.6.0
EOF
  # Not read there: the versions this project's venv resolved from PyPI in 2026-11 (the image is no older: its numpy
  # is 2.5.2, the newest on PyPI here 2.4.6). Only lower bounds reach these from the check's requirements, so older
  # stand-ins are the stricter test. These are the image packages those requirements name (pytest's, matplotlib's
  # and requests' own dependencies are the image's business).
  cat <<'EOF'
opencv-python-headless==5.1.0.95
pillow==13.0.0
matplotlib==3.11.2
pyyaml==6.0.4
tqdm==4.70.1
pytest==9.2.0
scipy==1.17.1
typing-extensions==4.16.0
requests==2.34.2
EOF
}

image_pins() {  # the pins as the stubs carry them: name==version+image
  pins | sed 's/$/+image/'
}

image_list() {  # --image: every image package, with its pinned version where there is one
  "$PYTHON" - <(image) <(pins) <<'EOF'
import re
import sys

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pinned = {norm(line.split("==")[0]): line.strip() for line in open(sys.argv[2]) if "==" in line}
print("\n".join(pinned.get(norm(name), norm(name)) for name in open(sys.argv[1]).read().split()))
EOF
}

stubs() {  # stubs DIR: one metadata-only wheel (METADATA, WHEEL, RECORD; no code, no dependencies) per pinned package
  # Their versions carry the local label +image, which no index has: pinned to it (image_pins), pip takes the stub,
  # not the index's wheel of the same version with its own dependencies (the image's business).
  mkdir -p "$1"
  "$PYTHON" - "$1" <(pins) <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

out = Path(sys.argv[1])
for line in open(sys.argv[2]).read().split():
    name, version = line.split("==")
    version += "+image"
    dist = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"
    files = {f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: cityseg-gpu-wheels\nRoot-Is-Purelib: true\n"
                                         "Tag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(out / f"{dist}-py3-none-any.whl", "w") as whl:
        for path, text in {**files, f"{dist}.dist-info/RECORD": record}.items():
            whl.writestr(path, text)
EOF
}

main() {
  local dir="" pyver=3.12
  while [ $# -gt 0 ]; do
    case $1 in
      --image) image_list; return ;;
      --stubs) stubs "${2:?--stubs needs a directory}"; return ;;
      --python-version) pyver=${2:?--python-version needs a version, e.g. 3.12}; shift ;;
      -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; return ;;
      -*) echo "gpu_wheels: unknown option $1 (see --help)" >&2; return 2 ;;
      *) dir=$1 ;;
    esac
    shift
  done
  if [ -z "$dir" ]; then
    echo "gpu_wheels: pass the directory to download into: bash scripts/gpu_wheels.sh DIR" >&2
    return 2
  fi
  mkdir -p "$dir"
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  stubs "$TMP/stubs"
  image_pins > "$TMP/pins.txt"
  # shellcheck disable=SC2207  # one requirement a line, none with spaces
  local reqs=($(PYTHON=$PYTHON bash "$HERE/gpu_check.sh" --requirements))
  echo "gpu_wheels: resolving ${reqs[*]} for CPython $pyver, manylinux x86_64, over the image's packages"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed --target "$TMP/target" \
    --report "$TMP/report.json" --only-binary=:all: --python-version "$pyver" --implementation cp "${PLATFORMS[@]}" \
    --find-links "$TMP/stubs" -c "$TMP/pins.txt" "${reqs[@]}"
  # what the image lacks, as name==version; refuse wheels already in DIR that are not part of the set
  local wanted
  wanted=$("$PYTHON" - "$TMP/report.json" "$dir" <(image) <<'EOF'
import json
import re
import sys
from pathlib import Path

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
report, folder = json.load(open(sys.argv[1])), Path(sys.argv[2])
image = set(map(norm, open(sys.argv[3]).read().split()))
wanted = {norm(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]
          if norm(item["metadata"]["name"]) not in image}
for whl in sorted(folder.glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    if wanted.get(norm(name)) != version:
        sys.exit(f"gpu_wheels: {whl} is not part of this set (pip would see two versions, or a package the check does "
                 f"not need); remove it, or download into an empty directory.")
print("\n".join(f"{name}=={version}" for name, version in sorted(wanted.items())))
EOF
  )
  # shellcheck disable=SC2086  # one name==version a line
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$pyver" --implementation cp "${PLATFORMS[@]}" -d "$dir" $wanted
  "$PYTHON" - "$dir" "$BUDGET_MIB" <<'EOF'
import sys
from pathlib import Path

wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
total, budget = sum(w.stat().st_size for w in wheels), int(sys.argv[2]) * 2**20
for w in wheels:
    print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
print(f"{total / 2**20:8.2f} MiB  in all, {len(wheels)} wheels in {sys.argv[1]} (budget {sys.argv[2]} MiB)")
if total > budget:
    sys.exit(f"gpu_wheels: {total / 2**20:.1f} MiB is more than the {sys.argv[2]} MiB that travel with a working tree.")
EOF
}

main "$@"
