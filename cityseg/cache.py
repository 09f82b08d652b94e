"""Read the decoded, memory-mapped copy of a split that ``python -m cityseg.prepare`` writes.

Decoding a 2048x1024 Cityscapes PNG costs tens of milliseconds of CPU; with crop-before-resize the training
augmentation touches only the source window of each crop, so a memory-mapped cache of decoded uint8 images
and trainId labels lets a single core feed a GPU. The dataset uses the cache automatically when it exists
and lists exactly the split's images; the pixels are identical to the PNG path, so are the samples and
their augmentation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError


INDEX = "index.json"
IMAGES, LABELS = "images.u8", "labels.u8"  # HxWx3 RGB and HxW trainIds, uint8, image after image


def default_cache_dir(data_root: str | Path) -> Path:
    """Where the cache lives unless ``--cache-dir`` says otherwise."""
    return Path(data_root) / "cityseg_cache"


class DecodedCache:
    """Read-only view of a prepared split; opens its memory maps lazily in each process (picklable)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        redo = "rerun `python -m cityseg.prepare` for this split, or pass --cache-dir none to read the PNGs"
        try:
            meta = json.loads((self.dir / INDEX).read_text())
            self.entries = meta["images"]
            self.names = [e["name"] for e in self.entries]
            pixels = sum(e["height"] * e["width"] for e in self.entries)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.dir / INDEX}: not a readable cache index ({type(e).__name__}); {redo}.") from None
        for name, size in ((IMAGES, 3 * pixels), (LABELS, pixels)):  # a cut copy would fail mid-run
            have = (self.dir / name).stat().st_size if (self.dir / name).is_file() else -1
            if have != size:
                raise DataError(f"{self.dir / name}: {'missing' if have < 0 else f'{have} bytes'}, but the cache's "
                                f"index lists {len(self.entries)} images of {size} bytes in all; {redo}.")
        self._maps: tuple[np.memmap, np.memmap] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # never pickle the mapped arrays into workers

    def _open(self) -> tuple[np.memmap, np.memmap]:
        if self._maps is None:
            self._maps = (np.memmap(self.dir / IMAGES, dtype=np.uint8, mode="r"),
                          np.memmap(self.dir / LABELS, dtype=np.uint8, mode="r"))
        return self._maps

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (HxWx3 RGB) and trainId label (HxW) of entry ``i`` as views into the maps (no copy)."""
        images, labels = self._open()
        e = self.entries[i]
        h, w = e["height"], e["width"]
        image = images[e["offset"] * 3: (e["offset"] + h * w) * 3].reshape(h, w, 3)
        label = labels[e["offset"]: e["offset"] + h * w].reshape(h, w)
        return image, label


def find_cache(cache_dir: str | Path, split: str, names: Sequence[str], required: bool = False) -> DecodedCache | None:
    """The prepared cache of ``split`` if it exists and holds exactly the images ``names`` (``city_seq_frame``),
    in that order; else None, or with ``required`` (a --cache-dir the user named) an error."""
    directory = Path(cache_dir) / split
    if not (directory / INDEX).is_file():
        if required:
            raise DataError(f"--cache-dir {cache_dir}: holds no decoded cache of split {split} ({directory / INDEX} "
                            f"is missing); run `python -m cityseg.prepare --split {split} --cache-dir {cache_dir}`, "
                            f"or pass --cache-dir none to read the PNGs.")
        return None
    cache = DecodedCache(directory)
    if cache.names != list(names):
        raise DataError(f"{directory}: the decoded cache lists other images than {split}; rerun "
                        f"`python -m cityseg.prepare` for this split, or delete the directory.")
    return cache
