"""The Cityscapes label table, taken from cityscapesscripts and turned into lookup arrays."""

from __future__ import annotations

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import labels as _LABELS

IGNORE_INDEX = 255

#: Train classes in trainId order (19 for Cityscapes).
TRAIN_LABELS = sorted((lab for lab in _LABELS if 0 <= lab.trainId < IGNORE_INDEX), key=lambda lab: lab.trainId)
NUM_CLASSES = len(TRAIN_LABELS)
CLASS_NAMES = tuple(lab.name for lab in TRAIN_LABELS)
#: Categories of the train classes, in order of first appearance (flat, construction, ...).
CATEGORY_NAMES = tuple(dict.fromkeys(lab.category for lab in TRAIN_LABELS))
#: RGB colour of each trainId (the Cityscapes palette).
PALETTE = np.array([lab.color for lab in TRAIN_LABELS], dtype=np.uint8)
#: The labelIds that may appear in a ``*_gtFine_labelIds.png`` (ids 0..33; license plate is -1).
VALID_LABEL_IDS = frozenset(lab.id for lab in _LABELS if lab.id >= 0)


def _id_to_train_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lab in _LABELS:
        if lab.id >= 0:
            lut[lab.id] = lab.trainId if 0 <= lab.trainId < IGNORE_INDEX else IGNORE_INDEX
    return lut


def _train_to_id_lut() -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)  # ignore/unknown back to 'unlabeled' (id 0)
    for lab in TRAIN_LABELS:
        lut[lab.trainId] = lab.id
    return lut


#: ``ID_TO_TRAIN[label_id]`` is the trainId (255 for classes not trained on).
ID_TO_TRAIN = _id_to_train_lut()
#: ``TRAIN_TO_ID[train_id]`` is the Cityscapes labelId, for exporting predictions.
TRAIN_TO_ID = _train_to_id_lut()


def _flags(valid: "set[int] | frozenset[int]") -> np.ndarray:
    lut = np.ones(256, dtype=np.uint8)
    lut[sorted(valid)] = 0
    return lut


_INVALID_ID = _flags(VALID_LABEL_IDS)
_INVALID_TRAIN_ID = _flags(set(range(NUM_CLASSES)) | {IGNORE_INDEX})


def _invalid(values: np.ndarray, flags: np.ndarray) -> list[int]:
    # one table lookup and a max (about 1 ms for 2048x1024); the values are only listed when some are bad
    if values.size == 0 or not cv2.LUT(np.ascontiguousarray(values), flags).max():
        return []
    present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    return [int(v) for v in present if flags[v]]


def ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a uint8 labelIds image to trainIds (255 = ignore) through the official table."""
    return cv2.LUT(np.ascontiguousarray(label_ids), ID_TO_TRAIN)


def invalid_label_ids(label_ids: np.ndarray) -> list[int]:
    """The values in a uint8 labelIds image that are not ids of the Cityscapes table (empty when all are valid)."""
    return _invalid(label_ids, _INVALID_ID)


def invalid_train_ids(train_ids: np.ndarray) -> list[int]:
    """The values in a uint8 labelTrainIds image that are neither train ids nor 255 (empty when all are valid)."""
    return _invalid(train_ids, _INVALID_TRAIN_ID)


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """Paint a trainId map in the Cityscapes palette (ignore is black); returns HxWx3 uint8 RGB."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[train_ids]


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """trainIds (0-18; 255 or anything else -> 0, 'unlabeled') as Cityscapes labelIds, as the export writes them."""
    return TRAIN_TO_ID[np.asarray(train_ids, dtype=np.uint8)]
