"""Cityscapes on disk: layout detection, image/label pairing, the dataset, samplers and loaders."""

from __future__ import annotations

import os
import re
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import pyspng
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils import signal_handling

from .cache import default_cache_dir, find_cache
from .errors import DataError
from .labels import IGNORE_INDEX, NUM_CLASSES, ids_to_train_ids, invalid_label_ids, invalid_train_ids

IMG_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
TRAIN_LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
#: The two layouts people have: what the downloads unpack to, and the one with *_trainvaltest wrappers.
LAYOUTS = {
    "downloads": ("leftImg8bit", "gtFine"),
    "trainvaltest": ("leftImg8bit_trainvaltest/leftImg8bit", "gtFine_trainvaltest/gtFine"),
}


def detect_layout(root: str | Path) -> tuple[Path, Path]:
    """Return ``(leftImg8bit dir, gtFine dir)`` for a Cityscapes root in either layout."""
    root = Path(root).expanduser()
    if not str(root) or not root.is_dir():
        raise DataError(f"--data-root {root}: no such directory; point it at your Cityscapes root "
                        f"(or write a synthetic one with `python -m cityseg.synthetic --out {root or 'DIR'}`).")
    for img_rel, gt_rel in LAYOUTS.values():
        if (root / img_rel).is_dir():
            return root / img_rel, root / gt_rel
    raise DataError(f"--data-root {root}: holds neither leftImg8bit/ nor leftImg8bit_trainvaltest/leftImg8bit/; "
                    f"point it at the directory that contains them.")


@dataclass(frozen=True)
class Sample:
    """One image of a split and its label file (``None`` when the split has no labels)."""

    image: Path
    label: Path | None

    @property
    def name(self) -> str:
        """``city_seq_frame``, the Cityscapes id of the image."""
        return self.image.name[: -len(IMG_SUFFIX)]


def _label_for(gt_dir: Path, image: Path) -> Path | None:
    stem = image.name[: -len(IMG_SUFFIX)]
    for suffix in (LABEL_SUFFIX, TRAIN_LABEL_SUFFIX):
        candidate = gt_dir / image.parent.name / (stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def list_samples(root: str | Path, split: str, labels: bool = True) -> list[Sample]:
    """Pair every ``*_leftImg8bit.png`` of a split with its gtFine label (checked up front)."""
    img_root, gt_root = detect_layout(root)
    img_dir, gt_dir = img_root / split, gt_root / split
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: split '{split}' not found; expected {img_dir}/CITY/*{IMG_SUFFIX}.")
    images = sorted(img_dir.glob(f"*/*{IMG_SUFFIX}"))
    if not images:
        raise DataError(f"{img_dir}: no *{IMG_SUFFIX} files in its city folders.")
    if not labels:
        return [Sample(p, _label_for(gt_dir, p)) for p in images]
    samples = []
    for p in images:
        label = _label_for(gt_dir, p)
        if label is None:
            raise DataError(f"{p}: no label file; expected {gt_dir / p.parent.name / (p.name[:-len(IMG_SUFFIX)] + LABEL_SUFFIX)}.")
        samples.append(Sample(p, label))
    have = {p.name[: -len(IMG_SUFFIX)] for p in images}
    for suffix in (LABEL_SUFFIX, TRAIN_LABEL_SUFFIX):
        for lab in sorted(gt_dir.glob(f"*/*{suffix}")):
            if lab.name[: -len(suffix)] not in have:
                raise DataError(f"{lab}: label without its image; expected "
                                f"{img_dir / lab.parent.name / (lab.name[:-len(suffix)] + IMG_SUFFIX)}.")
    return samples


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode(path: Path, channels: int) -> np.ndarray:
    """Decode ``path`` to uint8 RGB (``channels=3``) or to the file's own single channel (``channels=1``).

    PNGs already in that form (every Cityscapes file) are decoded by libspng, about a fifth faster than
    OpenCV's libpng on one core; anything else (JPEG, grey or alpha images, 16-bit) goes through OpenCV. Every
    failure, of either library and of any kind (an empty file included), is one :class:`DataError` naming
    the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}).") from e
    if not data:
        raise DataError(f"{path}: empty file (0 bytes), as an interrupted copy or a full disk leaves; re-extract "
                        f"or re-download it.")
    if data.startswith(PNG_SIGNATURE):
        try:
            img = pyspng.load(data)
        except Exception:  # libspng's errors have several types; OpenCV has the last word below
            img = None
        if img is not None and img.dtype == np.uint8 and img.shape[2:] == ((3,) if channels == 3 else ()):
            return img
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_UNCHANGED)
    except cv2.error:
        img = None
    if img is None:
        raise DataError(f"{path}: not a readable image (truncated or corrupt); re-extract or re-download it.")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if channels == 3 else img


def read_image(path: Path) -> np.ndarray:
    """Decode an 8-bit image as HxWx3 RGB uint8."""
    return _decode(path, 3)


def read_label(path: Path) -> np.ndarray:
    """Decode a labelIds (or labelTrainIds) PNG into trainIds (255 = ignore), validating its values."""
    lab = _decode(path, 1)
    if lab.ndim != 2 or lab.dtype != np.uint8:
        raise DataError(f"{path}: a label must be a single-channel 8-bit PNG, got shape {lab.shape} {lab.dtype}.")
    if path.name.endswith(TRAIN_LABEL_SUFFIX):
        bad = invalid_train_ids(lab)
        if bad:
            raise DataError(f"{path}: trainIds {bad} are not Cityscapes train ids (0-{NUM_CLASSES - 1} or 255).")
        return lab
    bad = invalid_label_ids(lab)
    if bad:
        raise DataError(f"{path}: label ids {bad} are not in the Cityscapes label table (0-33).")
    return ids_to_train_ids(lab)


Transform = Callable[[np.ndarray, np.ndarray, int, int], "tuple[np.ndarray, np.ndarray]"]


class CityscapesDataset(Dataset):
    """A Cityscapes split. Keys are ``index`` or ``(epoch, index)``; the latter seeds the augmentation.

    When ``python -m cityseg.prepare`` has decoded the split into ``cache_dir`` (default
    ``ROOT/cityseg_cache``; ``"none"`` disables it), pixels come from that memory map instead of PNGs.
    """

    def __init__(self, root: str | Path, split: str, transform: Transform | None = None, labels: bool = True,
                 cache_dir: str | Path | None = None):
        self.samples = list_samples(root, split, labels=labels)
        self.split = split
        self.transform = transform
        self.labels = labels
        self.cache = None
        if labels and str(cache_dir) != "none":
            self.cache = find_cache(cache_dir or default_cache_dir(root), split, [s.name for s in self.samples],
                                    required=bool(cache_dir))

    def describe(self) -> str:
        """Where the pixels come from, for the log."""
        where = f"the decoded cache {self.cache.dir}" if self.cache is not None else "PNG files"
        return f"split {self.split}: {len(self)} images, read from {where}"

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read image and trainId label of one sample, checking that their sizes match."""
        if self.cache is not None:
            return self.cache.load(index)
        s = self.samples[index]
        image = read_image(s.image)
        if s.label is None or not self.labels:
            return image, np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        label = read_label(s.label)
        if label.shape != image.shape[:2]:
            raise DataError(f"{s.label}: label is {label.shape[1]}x{label.shape[0]} but its image "
                            f"{s.image.name} is {image.shape[1]}x{image.shape[0]} (WxH); they must match.")
        return image, label

    def __getitem__(self, key: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        epoch, index = (0, key) if isinstance(key, int) else (int(key[0]), int(key[1]))
        image, label = self.load(index)
        if self.transform is not None:
            image, label = self.transform(image, label, epoch, index)
        image, label = (a if a.flags.writeable and a.flags.c_contiguous else np.array(a) for a in (image, label))
        return torch.from_numpy(image), torch.from_numpy(label), index


class TrainSampler(Sampler):
    """Shards each epoch's global batches over ranks; yields ``(epoch, index)`` keys for this rank.

    Epoch ``e`` shuffles all indices with a generator seeded by ``(seed, e)``; global batch ``k`` is
    ``perm[k*G:(k+1)*G]`` with ``G = world_size * batch_size`` and rank ``r`` takes its ``r``-th slice of
    ``batch_size``. So 1 process and N processes walk the same global order, and starting at step ``k`` of
    an epoch costs nothing (no batch is loaded and thrown away).
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.batch, self.world, self.rank, self.seed = num_samples, batch_size, world_size, rank, seed
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {num_samples} images, fewer than one global batch of "
                            f"{self.global_batch} ({world_size} processes x --batch-size {batch_size}); "
                            f"lower --batch-size or use fewer processes.")
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch to walk and the step of it to start at."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def permutation(self, epoch: int) -> torch.Tensor:
        """The global order of epoch ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm = self.permutation(self.epoch).tolist()
        for k in range(self.start_step, self.steps_per_epoch):
            lo = k * self.global_batch + self.rank * self.batch
            for idx in perm[lo: lo + self.batch]:
                yield (self.epoch, idx)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch


class ShardSampler(Sampler):
    """Evaluation sharding: rank ``r`` takes indices ``r, r + W, ...`` so each image is seen exactly once."""

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0, limit: int = 0):
        self.indices = list(range(min(num_samples, limit) if limit else num_samples))[rank::world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


#: Seconds a DataLoader worker keeps serving after a SIGTERM, so the training step in flight can finish.
WORKER_TERM_GRACE_S = 30.0


# OpenCV runs single-threaded in every cityseg process: DataLoader workers are the parallelism. This must
# hold before the first OpenCV call: a forked worker that inherits a started OpenCV thread pool and then
# reconfigures it deadlocks.
cv2.setNumThreads(1)


def _worker_init(_: int) -> None:
    # SLURM and terminals signal every process of a job, workers included. The training process decides when
    # to stop, and its workers must keep serving batches until it has finished its step and saved; it then
    # shuts them down through their queues. A SIGTERM therefore only starts a grace timer here.
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_after_grace)


def _exit_after_grace(signum: int, frame: object) -> None:
    timer = threading.Timer(WORKER_TERM_GRACE_S, os._exit, (128 + signum,))
    timer.daemon = True
    timer.start()


def shutdown(loader: DataLoader) -> None:
    """Stop a loader's worker processes now, through their queues (persistent workers outlive loops)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


#: Batches each DataLoader worker keeps ready; they wait in shared memory (/dev/shm).
PREFETCH = 4


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, pin: bool,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader with the settings every cityseg loader shares."""
    # PyTorch's SIGCHLD handler raises a dead worker's error from wherever the main thread happens to be, say
    # halfway through an optimizer step. Without it the loader itself reports the death (within 5 s) where
    # the trainer fetches batches, which can then stop every rank at a completed step (worker_death).
    signal_handling._SIGCHLD_handler_set = True
    # A generator of its own: each new iterator draws its workers' base seed from it, which would otherwise be a
    # draw from torch's global generator, at points that differ between a resumed run and one that never stopped
    # (the global generator draws the --drop-path masks, which resume bitwise). cityseg's samples are seeded by
    # (seed, epoch, index) anyway.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin, drop_last=drop_last, worker_init_fn=_worker_init,
                      persistent_workers=workers > 0, prefetch_factor=PREFETCH if workers > 0 else None,
                      generator=torch.Generator())


def worker_death(error: RuntimeError, loader: DataLoader) -> str:
    """One line for a DataLoader worker that died, with the signal that killed it ("" for another error)."""
    text = str(error)
    if "DataLoader worker" not in text:
        return ""
    found = re.search(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)", text)
    pids = {int(p) for p in re.findall(r"\d+", found.group(1))} if found else set()
    iterator = getattr(loader, "_iterator", None)
    codes = {w.pid: w.exitcode for w in getattr(iterator, "_workers", []) if w.pid in pids}
    pid = min(pids) if pids else "?"
    code = codes.get(pid)
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        cause = {signal.SIGKILL: ", most likely by the kernel's out-of-memory killer",
                 signal.SIGBUS: ", most likely for want of shared memory (/dev/shm)"}.get(sig, "")
        return f"a DataLoader worker (pid {pid}) was killed by {sig.name}{cause}"
    return f"a DataLoader worker (pid {pid}) died (exit status {code})"


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image, from a PNG's header when it is one (no decoding)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR":
        return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
    return read_image(path).shape[:2]


def sample_bytes(dataset: "CityscapesDataset") -> int:
    """Bytes of one full image and its label as a loader passes them (from the first image's PNG header); a
    Cityscapes image's 8 MiB when that file cannot be read (the loader reports it, with a checkpoint)."""
    try:
        h, w = image_size(dataset.samples[0].image)
    except (DataError, OSError):
        h, w = 1024, 2048
    return h * w * 4


def check_shared_memory(loaders: Sequence[tuple[int, int]], processes: int, flag: str = "--workers",
                        path: str = "/dev/shm") -> None:
    """Refuse to start when the batches the DataLoader workers keep in flight cannot fit in ``path``.

    ``loaders`` holds (workers, bytes per batch) of each loader of one process; ``processes`` run on this node.
    A worker that runs out of shared memory dies with a bare "Bus error"; Docker gives containers 64 MiB."""
    need = processes * sum(w * PREFETCH * size for w, size in loaders)
    try:
        st = os.statvfs(path)
    except OSError:
        return  # no /dev/shm here: nothing to check
    have = st.f_frsize * st.f_blocks
    if need <= have:
        return
    per_worker = processes * sum(PREFETCH * size for w, size in loaders if w)
    fits = max(0, int(have // max(per_worker, 1)))
    raise DataError(f"{path}: {have / 2**20:.0f} MiB, but the DataLoader workers of the {processes} process(es) "
                    f"on this node keep about {need / 2**20:.0f} MiB of batches there, and die with 'Bus error' "
                    f"when it runs out; give the container more (docker --shm-size=2g, or --ipc=host), or lower "
                    f"{flag} (at most {fits} would fit).", collective=True)
