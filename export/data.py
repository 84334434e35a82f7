"""Labelled images for fine-tuning, parity checks, calibration and accuracy: the store's split, on disk.

Everything here sees the same train/validation/test assignment as the feature store: with a store,
its own rows (paths, labels, splits) are used; with a folder, ``discover`` runs with the store's (or
the model's) split settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.imageio import ImageDecodeError, load_image
from extract.dataset import discover
from extract.errors import TransferKitError
from extract.leak_free import ANCHORS_ATTR
from extract.store import DEFAULT_SPLITS, FeatureSet

SPLIT_ORDER = ("test", "validation", "train")


def split_settings(attrs: dict | None) -> dict:
    """The split settings (``DEFAULT_SPLITS`` keys) from store attributes (defaults where absent),
    with the near-duplicate anchors of a ``--split-group-by near-duplicates`` store."""
    attrs = attrs or {}
    settings = {key: type(default)(attrs.get(key, default)) for key, default in DEFAULT_SPLITS.items()}
    return {**settings, ANCHORS_ATTR: str(attrs.get(ANCHORS_ATTR, ""))}


@dataclass
class LabelledImages:
    root: Path
    relpaths: list[str]
    labels: np.ndarray  # (n,) int index into class_names
    splits: np.ndarray  # (n,) str: train / validation / test
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.relpaths)

    @property
    def paths(self) -> list[str]:
        return [str(self.root / p) for p in self.relpaths]

    def take(self, indices) -> "LabelledImages":
        indices = np.asarray(indices, dtype=np.int64)
        return LabelledImages(self.root, [self.relpaths[i] for i in indices], self.labels[indices],
                              self.splits[indices], self.class_names)

    def subset(self, split: str) -> "LabelledImages":
        return self.take(np.flatnonzero(self.splits == split))

    def first(self, count: int) -> "LabelledImages":
        """The first ``count`` images, test split first: those a model has not been fitted on."""
        return self.take(sorted(range(len(self)), key=lambda i: SPLIT_ORDER.index(self.splits[i]))[:count])


def from_folder(images_dir: str | Path, settings: dict, class_names: list[str] | None = None) -> LabelledImages:
    """Images of a class folder with ``settings`` (``split_settings``) for their splits."""
    dataset = discover(images_dir, **settings)
    names = dataset.class_names
    if class_names is not None and names != list(class_names):
        raise TransferKitError(
            f"{images_dir} has classes {names} but the model was trained on {list(class_names)}; "
            f"use the same image folder"
        )
    index = {c: i for i, c in enumerate(names)}
    return LabelledImages(
        root=Path(images_dir),
        relpaths=[e.relpath for e in dataset.entries],
        labels=np.asarray([index[e.class_name] for e in dataset.entries], dtype=np.int64),
        splits=np.asarray([e.split for e in dataset.entries], dtype=str),
        class_names=list(names),
    )


def from_feature_set(features: FeatureSet, images_dir: str | Path | None = None) -> LabelledImages:
    """The images behind a store's rows, read from ``images_dir`` or the folder the store was made from."""
    root = Path(images_dir or features.store_attrs.get("images_root") or "")
    if not root.is_dir() or not features.paths or not (root / features.paths[0]).is_file():
        raise TransferKitError(
            f"the store's images are not at {root}; pass --images DIR with the folder the store was extracted from"
        )
    return LabelledImages(root, list(features.paths), features.labels, features.splits, list(features.class_names))


def load_batch(paths: list[str], size: int) -> tuple[np.ndarray, list[int]]:
    """Decode ``paths`` to a uint8 ``(n, size, size, 3)`` batch; also returns the indices that decoded."""
    arrays, kept = [], []
    for i, path in enumerate(paths):
        try:
            arrays.append(load_image(path, (size, size)))
        except ImageDecodeError:
            continue
        kept.append(i)
    batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return batch, kept


def iter_batches(images: LabelledImages, size: int, batch_size: int):
    """Yield ``(uint8 batch, labels)`` over ``images``, skipping files that do not decode."""
    paths = images.paths
    for start in range(0, len(paths), batch_size):
        batch, kept = load_batch(paths[start:start + batch_size], size)
        if len(kept):
            yield batch, images.labels[start:start + batch_size][kept]
