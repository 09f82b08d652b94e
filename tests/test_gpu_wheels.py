"""What the GPU check needs on the lent GPU machines, which have no package index: the wheels of
scripts/gpu_wheels.sh are all that scripts/gpu_check.sh installs beyond their image (proved by pip's own resolver,
offline, over stub wheels standing for the image's packages), and nothing the check runs imports W&B, submitit or
Jupyter, which are not among them. The wheels come from PyPI once per session; without PyPI those tests skip."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from conftest import REPO, TINY

PLATFORMS = ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform",
             "manylinux2014_x86_64"]
#: What travels with a working tree to the GPU machine.
BUDGET = 64 * 2**20
#: What pip says when it cannot reach an index at all (a skip), as opposed to a set it cannot resolve (a failure).
OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
           "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ProxyError")
#: Not on the GPU machines, and not in the wheels.
ABSENT = {"wandb", "submitit", "nbclient", "ipykernel"}


def norm(name: str) -> str:
    """A project name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """scripts/gpu_wheels.sh with ``args``, run by this interpreter's pip."""
    return subprocess.run(["bash", "scripts/gpu_wheels.sh", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def requirements() -> list[str]:
    """What scripts/gpu_check.sh installs."""
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--requirements"], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable}).stdout.split()


@pytest.fixture(scope="session")
def wheel_set(tmp_path_factory) -> Path:
    """The folder scripts/gpu_wheels.sh fills (one download per session)."""
    folder = tmp_path_factory.mktemp("gpu_wheels")
    proc = wheels_script(str(folder), env={"PIP_RETRIES": "1", "PIP_DEFAULT_TIMEOUT": "30"})  # offline: fail soon
    if proc.returncode:
        offline = [line for line in (proc.stdout + proc.stderr).splitlines() if any(m in line for m in OFFLINE)]
        if offline:
            pytest.skip(f"PyPI is unreachable: {offline[0].strip()[:200]}")
        raise AssertionError(proc.stdout + proc.stderr)
    return folder.resolve()


@pytest.fixture
def image(tmp_path) -> tuple[set[str], Path]:
    """The image's package names, and a folder of stub wheels standing for those with versions."""
    names = {norm(line.split("==")[0]) for line in wheels_script("--image").stdout.split()}
    stubs = tmp_path / "image"
    assert wheels_script("--stubs", str(stubs)).returncode == 0
    return names, stubs.resolve()


def resolve_offline(tmp_path: Path, *folders: Path) -> tuple[subprocess.CompletedProcess, dict[str, Path]]:
    """pip's resolver with no index and no configuration (this machine's find-links and mirrors left out), for the
    GPU machine (CPython 3.12, manylinux x86_64), on what the GPU check installs, from ``folders`` only: its exit,
    and each package it would install with the folder it takes it from."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                           "--disable-pip-version-check", "--no-index", "--ignore-installed", "--only-binary=:all:",
                           "--python-version", "3.12", "--implementation", "cp", *PLATFORMS,
                           "--target", str(tmp_path / "target"), "--report", str(report),
                           *(f"--find-links={f}" for f in folders), *requirements()],
                          capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode:
        return proc, {}
    items = json.loads(report.read_text())["install"]
    return proc, {norm(i["metadata"]["name"]): Path(unquote(urlparse(i["download_info"]["url"]).path)).parent.resolve()
                  for i in items}


def test_the_wheels_are_all_the_gpu_check_installs_beyond_the_image(wheel_set, image, tmp_path):
    names, stubs = image
    proc, source = resolve_offline(tmp_path, wheel_set, stubs)
    assert proc.returncode == 0, proc.stderr
    lacking = {name for name in source if name not in names}
    assert {name for name, folder in source.items() if folder == wheel_set} == lacking  # all from the wheels
    assert all(folder == stubs for name, folder in source.items() if name in names)  # the image's own, as they are
    wheels = sorted(wheel_set.glob("*.whl"))
    assert sorted(norm(w.name.split("-")[0]) for w in wheels) == sorted(lacking)  # each used, one version each
    # the image lacks these three of cityseg's dependencies (KINDS.md's list), and has no W&B, submitit or Jupyter
    assert {"pyspng", "albumentations", "cityscapesscripts"} <= lacking and not ABSENT & set(source)
    assert sum(w.stat().st_size for w in wheels) <= BUDGET


def test_without_one_of_the_wheels_the_offline_resolution_fails(wheel_set, image, tmp_path):
    # The proof above can fail: take away the wheel of a dependency's dependency and pip finds no way.
    _, stubs = image
    partial = tmp_path / "partial"
    shutil.copytree(wheel_set, partial)
    direct = {norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements()}
    missing = next(w for w in sorted(partial.glob("*.whl")) if norm(w.name.split("-")[0]) not in direct)
    missing.unlink()
    proc, _ = resolve_offline(tmp_path, partial, stubs)
    name = missing.name.split("-")[0]
    assert proc.returncode != 0 and re.search(f"No matching distribution found for {name}", proc.stderr, re.I), (
        name, proc.stderr[-2000:])


#: A sitecustomize that makes ABSENT unimportable in every process started with it on PYTHONPATH.
BLOCK = f'''
import sys


class _NotOnTheGPUMachines:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {sorted(ABSENT)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machines)", name=name)
        return None


sys.meta_path.insert(0, _NotOnTheGPUMachines())
'''


#: Runs each ``[script, *args]`` of the JSON list in argv[1] as ``python script args`` would, in turn.
RUN_SCRIPTS = """
import json, runpy, sys
statuses = []
for script, *args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        statuses.append(0)
    except SystemExit as e:
        statuses.append(e.code if isinstance(e.code, int) else int(e.code is not None))
print("statuses", statuses)
"""


def test_what_the_gpu_check_runs_needs_no_wandb_submitit_or_jupyter(synthetic_root, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        """This interpreter on ``args``, with the block."""
        return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    assert "not on the GPU machines" in run("-c", "import wandb").stderr  # the block works
    # collecting every test the check runs (--all), then what they run, on the CPU: train.py with W&B off as
    # their flags say, evaluate.py exporting PNGs, and the benchmark's command line
    listed = subprocess.run(["bash", "scripts/gpu_check.sh", "--list", "--all"], cwd=REPO, capture_output=True,
                            text=True, check=True, timeout=60).stdout.splitlines()
    ids = [a for line in listed if line.split()[3] == "pytest" for a in line.split()[4:]]
    collected = run("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", *ids)
    assert collected.returncode == 0 and "17 tests collected" in collected.stdout, collected.stdout + collected.stderr
    out = tmp_path / "run"
    # train.py, evaluate.py and bench/gpu.py --help one after the other in one interpreter, each as `python script`
    scripts = [["train.py", "--data-root", str(synthetic_root), "--out-dir", str(out), *TINY, "--max-iters", "2",
                "--eval-every", "2", "--num-pictures", "0"],
               ["evaluate.py", "--checkpoint", str(out / "last.pt"), "--data-root", str(synthetic_root), "--device",
                "cpu", "--workers", "0", "--num-pictures", "0", "--out-dir", str(tmp_path / "eval"), "--export-dir",
                str(tmp_path / "pred")],
               ["bench/gpu.py", "--help"]]
    ran = run("-c", RUN_SCRIPTS, json.dumps(scripts))
    assert ran.returncode == 0 and ran.stdout.splitlines()[-1] == "statuses [0, 0, 0]", ran.stdout + ran.stderr
    assert len(list((tmp_path / "pred").rglob("*.png"))) == 5
