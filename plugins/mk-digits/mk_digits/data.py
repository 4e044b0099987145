"""The eight tasks: one set of real 8x8 digit images, eight input transforms and label maps.

Fixed by a data seed: a stratified 60/20/20 train/validation/test split of the 1,797 images, the
per-image shifts and the noise. Pixels are scaled to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

TASKS = ("upright", "rotated", "mirrored", "inverted", "shifted", "noisy", "parity", "mod3")
SPLITS = ("train", "validation", "test")
CLASSES = {"parity": 2, "mod3": 3}
DESCRIPTIONS = {
    "upright": "the digit, upright images",
    "rotated": "the digit, images rotated by 90 degrees",
    "mirrored": "the digit, images mirrored left-right",
    "inverted": "the digit, inverted intensities (16 - x)",
    "shifted": "the digit, images shifted by a fixed random 1-2 px (zero fill)",
    "noisy": "the digit, fixed Gaussian noise (sigma 4 on the 0-16 scale), clipped",
    "parity": "digit parity (2 classes), upright images",
    "mod3": "digit mod 3 (3 classes), upright images",
}


def num_classes(task: str) -> int:
    return CLASSES.get(task, 10)


@dataclass(frozen=True)
class TaskData:
    x: np.ndarray  # (n, 64) float32 in [0, 1]
    y: np.ndarray  # (n,) int64


@lru_cache(maxsize=4)
def _images(data_seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits.images.astype(np.float32), digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train, rest = train_test_split(index, train_size=0.6, stratify=labels, random_state=data_seed)
    val, test = train_test_split(rest, train_size=0.5, stratify=labels[rest], random_state=data_seed)
    return images, labels, {"train": np.sort(train), "validation": np.sort(val), "test": np.sort(test)}


_R = range(-2, 3)
SHIFTS: dict[str, tuple[tuple[int, int], ...]] = {
    "diagonal": tuple((dy, dx) for dy in _R for dx in _R if dy and dx),
    "axis": tuple((d, 0) for d in _R if d) + tuple((0, d) for d in _R if d),
    "ring": tuple((dy, dx) for dy in _R for dx in _R if dy or dx),
}
"""Offsets (dy, dx) in pixels the ``shifted`` task draws from, one per image: ``diagonal`` (both
axes 1-2 px, 16 offsets; benchmark version 1), ``axis`` (1-2 px along one axis, 8 offsets),
``ring`` (any offset of 1-2 px, 24). benchmarks/shifted_task.py measures them."""
SHIFT = "axis"


def shift_images(images: np.ndarray, offsets: tuple[tuple[int, int], ...], rng: np.random.Generator) -> np.ndarray:
    """Each (8, 8) image moved by an offset drawn from ``offsets``; pixels moved in are zero."""
    out = np.zeros_like(images)
    for i, img in enumerate(images):
        dy, dx = offsets[rng.integers(len(offsets))]
        src = img[max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)]
        out[i, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def task_views(task: str, data_seed: int = 0, shift: str = SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``task`` (1797, 8, 8) float32 on the 0-16 scale, and its labels (1797,) int64."""
    if task not in TASKS:
        raise KeyError(task)
    images, labels, _ = _images(data_seed)
    rng = np.random.default_rng(data_seed + 1000)
    if task == "rotated":
        views = np.rot90(images, k=1, axes=(1, 2))
    elif task == "mirrored":
        views = images[:, :, ::-1]
    elif task == "inverted":
        views = 16.0 - images
    elif task == "shifted":
        views = shift_images(images, SHIFTS[shift], rng)
    elif task == "noisy":
        views = np.clip(images + rng.normal(0.0, 4.0, images.shape), 0.0, 16.0)
    else:
        views = images
    y = labels % 2 if task == "parity" else labels % 3 if task == "mod3" else labels
    return np.ascontiguousarray(views), y.astype(np.int64)


def split_indices(split: str, data_seed: int = 0) -> np.ndarray:
    """Sorted indices of ``split`` (train, validation or test) into the 1,797 images."""
    return _images(data_seed)[2][split]


@lru_cache(maxsize=64)
def task_data(task: str, split: str, data_seed: int = 0) -> TaskData:
    """Inputs and labels of one task on one split (cached)."""
    views, y = task_views(task, data_seed)
    idx = split_indices(split, data_seed)
    x = (views[idx].reshape(len(idx), 64) / 16.0).astype(np.float32)
    return TaskData(x, y[idx])
