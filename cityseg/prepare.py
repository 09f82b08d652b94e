"""Write the decoded, memory-mapped copy of a split (:mod:`cityseg.cache` reads it).

    python -m cityseg.prepare --data-root /path/to/cityscapes --split train [--cache-dir /local/ssd/cache]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .cache import IMAGES, INDEX, LABELS, default_cache_dir
from .data import list_samples, read_image, read_label
from .errors import DataError, report_user_errors


def prepare(data_root: str | Path, split: str, cache_dir: str | Path | None = None) -> Path:
    """Decode every image and label of ``split`` once into ``cache_dir/split`` (written atomically)."""
    samples = list_samples(data_root, split)
    target = Path(cache_dir or default_cache_dir(data_root)).expanduser() / split
    tmp = target.with_name(f".{split}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        _write(samples, split, tmp)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"--cache-dir {target.parent}: could not write the cache there ({e.strerror or e}); pass a "
                        f"writable --cache-dir with room for 4 bytes a pixel.") from None
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _write(samples: list, split: str, tmp: Path) -> None:
    """Decode the samples into ``tmp``'s image and label files, and write its index last."""
    entries, offset = [], 0
    with open(tmp / IMAGES, "wb") as fi, open(tmp / LABELS, "wb") as fl:
        for s in samples:
            image, label = read_image(s.image), read_label(s.label)
            if label.shape != image.shape[:2]:
                raise DataError(f"{s.label}: label and image sizes differ; they must match.")
            fi.write(np.ascontiguousarray(image).tobytes())
            fl.write(np.ascontiguousarray(label).tobytes())
            h, w = label.shape
            entries.append({"name": s.name, "height": h, "width": w, "offset": offset})
            offset += h * w
    (tmp / INDEX).write_text(json.dumps({"split": split, "images": entries}))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cityseg.prepare``."""
    p = argparse.ArgumentParser(prog="python -m cityseg.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="Cityscapes root, either layout.")
    p.add_argument("--split", action="append", help="Split(s) to prepare (repeatable; default: train).")
    p.add_argument("--cache-dir", default=None, help="Where to write (default: DATA_ROOT/cityseg_cache); "
                   "give the same --cache-dir to train.py.")
    args = p.parse_args(argv)
    with report_user_errors():
        for split in args.split or ["train"]:
            t0 = time.perf_counter()
            path = prepare(args.data_root, split, args.cache_dir)
            size = sum(f.stat().st_size for f in path.iterdir()) / 2**30
            print(f"{split}: decoded into {path} ({size:.2f} GiB) in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
