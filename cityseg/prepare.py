"""A decoded, memory-mapped copy of a split, so training reads pixels instead of decoding PNGs.

    python -m cityseg.prepare --data-root /path/to/cityscapes --split train [--cache-dir /local/ssd/cache]

Decoding a 2048x1024 Cityscapes PNG costs tens of milliseconds of CPU; with crop-before-resize the training
augmentation touches only the source window of each crop, so a memory-mapped cache of decoded uint8 images
and trainId labels lets a single core feed a GPU. The dataset uses the cache automatically when it exists
and lists exactly the split's images; the pixels are identical to the PNG path, so are the samples and
their augmentation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import DataError, Sample, list_samples, read_image, read_label
from .errors import report_user_errors

INDEX = "index.json"


def default_cache_dir(data_root: str | Path) -> Path:
    """Where the cache lives unless ``--cache-dir`` says otherwise."""
    return Path(data_root) / "cityseg_cache"


class DecodedCache:
    """Read-only view of a prepared split; opens its memory maps lazily in each process (picklable)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta = json.loads((self.dir / INDEX).read_text())
        self.names = [e["name"] for e in meta["images"]]
        self.entries = meta["images"]
        self._maps: tuple[np.memmap, np.memmap] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # never pickle the mapped arrays into workers

    def _open(self) -> tuple[np.memmap, np.memmap]:
        if self._maps is None:
            self._maps = (np.memmap(self.dir / "images.u8", dtype=np.uint8, mode="r"),
                          np.memmap(self.dir / "labels.u8", dtype=np.uint8, mode="r"))
        return self._maps

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (HxWx3 RGB) and trainId label (HxW) of entry ``i`` as views into the maps (no copy)."""
        images, labels = self._open()
        e = self.entries[i]
        h, w = e["height"], e["width"]
        image = images[e["offset"] * 3: (e["offset"] + h * w) * 3].reshape(h, w, 3)
        label = labels[e["offset"]: e["offset"] + h * w].reshape(h, w)
        return image, label


def find_cache(cache_dir: str | Path, split: str, samples: Sequence[Sample]) -> DecodedCache | None:
    """The prepared cache of ``split`` if it exists and holds exactly these images, else None."""
    directory = Path(cache_dir) / split
    if not (directory / INDEX).is_file():
        return None
    cache = DecodedCache(directory)
    if cache.names != [s.name for s in samples]:
        raise DataError(f"{directory}: the decoded cache lists other images than {split}; rerun "
                        f"`python -m cityseg.prepare` for this split, or delete the directory.")
    return cache


def prepare(data_root: str | Path, split: str, cache_dir: str | Path | None = None) -> Path:
    """Decode every image and label of ``split`` once into ``cache_dir/split`` (written atomically)."""
    samples = list_samples(data_root, split)
    target = Path(cache_dir or default_cache_dir(data_root)) / split
    tmp = target.with_name(f".{split}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    entries, offset = [], 0
    with open(tmp / "images.u8", "wb") as fi, open(tmp / "labels.u8", "wb") as fl:
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
    if target.exists():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    os.replace(tmp, target)
    return target


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
