"""Labelled images for fine-tuning, parity checks, calibration and accuracy: the store's split, on disk.

Everything here sees the same train/validation/test assignment as the feature store: with a store,
its own rows and ``/images/split`` column are used (``from_store``, ``from_feature_set``); only
without a store does ``discover`` assign splits from ``SplitSettings`` (``from_folder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.imageio import ImageDecodeError, load_image
from extract.dataset import discover
from extract.errors import TransferKitError
from extract.splits import SplitSettings
from extract.store import FeatureSet, StoreState

SPLIT_ORDER = ("test", "validation", "train")


@dataclass
class LabelledImages:
    root: Path
    relpaths: list[str]
    labels: np.ndarray  # (n,) int index into class_names
    split: np.ndarray  # (n,) str: each image's split, train / validation / test
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.relpaths)

    @property
    def paths(self) -> list[str]:
        return [str(self.root / p) for p in self.relpaths]

    def take(self, indices) -> "LabelledImages":
        indices = np.asarray(indices, dtype=np.int64)
        return LabelledImages(self.root, [self.relpaths[i] for i in indices], self.labels[indices],
                              self.split[indices], self.class_names)

    def subset(self, split: str) -> "LabelledImages":
        return self.take(np.flatnonzero(self.split == split))

    def first(self, count: int) -> "LabelledImages":
        """The first ``count`` images, test split first: those a model has not been fitted on."""
        return self.take(sorted(range(len(self)), key=lambda i: SPLIT_ORDER.index(self.split[i]))[:count])


def from_folder(images_dir: str | Path, settings: SplitSettings, class_names: list[str] | None = None,
                anchors: str | dict = "") -> LabelledImages:
    """Images of a folder that has no store, split by ``settings`` (and the near-duplicate ``anchors``
    of a ``--split-group-by near-duplicates`` store, see ``extract/leak_free.py``)."""
    dataset = discover(images_dir, settings, split_anchors=anchors)
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
        split=np.asarray([e.split for e in dataset.entries], dtype=str),
        class_names=list(names),
    )


def _store_root(images_dir: str | Path | None, attrs: dict, relpaths: list[str]) -> Path:
    """``images_dir``, or the folder the store was made from; refuses one without the store's images."""
    root = Path(images_dir or attrs.get("images_root") or "")
    if not root.is_dir() or not relpaths or not (root / relpaths[0]).is_file():
        raise TransferKitError(
            f"the store's images are not at {root}; pass --images DIR with the folder the store was extracted from"
        )
    return root


def from_feature_set(features: FeatureSet, images_dir: str | Path | None = None) -> LabelledImages:
    """The images behind a store's rows, read from ``images_dir`` or the folder the store was made from."""
    root = _store_root(images_dir, features.store_attrs, features.paths)
    return LabelledImages(root, list(features.paths), features.labels, features.splits, list(features.class_names))


def from_store(state: StoreState, images_dir: str | Path | None = None) -> LabelledImages:
    """Every image of a store that decoded, with its class and the store's split column."""
    failed, table = set(state.failed), state.images
    rows = [i for i, p in enumerate(table.path) if p not in failed]
    relpaths = [table.path[i] for i in rows]
    index = {c: i for i, c in enumerate(state.classes)}
    return LabelledImages(
        root=_store_root(images_dir, state.attrs, relpaths), relpaths=relpaths,
        labels=np.asarray([index[table.class_name[i]] for i in rows], dtype=np.int64),
        split=np.asarray([table.split[i] for i in rows], dtype=str), class_names=list(state.classes),
    )


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
