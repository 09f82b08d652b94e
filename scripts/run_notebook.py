"""Execute notebooks/quickstart.ipynb top to bottom and write its outputs back into it (what GitHub renders).

    .venv/bin/python scripts/run_notebook.py [NOTEBOOK] [--timeout SECONDS]

It runs in the notebook's folder with the kernel of this Python; QUICKSTART_ITERS (if set) shortens its training.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent


def execute(path: Path, timeout: float, workdir: Path | None = None) -> nbformat.NotebookNode:
    """The notebook at ``path``, executed in ``workdir`` (default: its folder); raises on the first error."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=int(timeout), kernel_name="python3",
                   resources={"metadata": {"path": str(workdir or path.parent)}}).execute()
    return nb


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebook", nargs="?", default=str(REPO / "notebooks" / "quickstart.ipynb"))
    p.add_argument("--timeout", type=float, default=1200, help="Seconds a cell may take.")
    args = p.parse_args()
    path = Path(args.notebook)
    t0 = time.perf_counter()
    nb = execute(path, args.timeout)
    nbformat.write(nb, path)
    print(f"executed {path} in {time.perf_counter() - t0:.0f} s and wrote its outputs back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
