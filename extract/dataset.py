"""Find labelled images in a folder and give each one a stable train/validation/test split.

Two layouts are understood:
- ``DIR/<class>/...`` (like ``keras.utils.image_dataset_from_directory``): splits are assigned per
  image from a hash of its relative path and a seed, so adding images never moves an existing one
  (with a ``split_group`` pattern, of the path with the pattern's matches removed, so that copies
  of one photo share a split).
- ``DIR/{train,validation,test}/<class>/...`` (``val``/``valid`` accepted for validation): the
  folders give the splits. Without a validation folder (``train/`` and ``test/`` only), validation is
  carved out of ``train/`` by the same hash rule (``validation_split`` of it, drawn from the seed and
  each path); ``test/`` is never touched.

Images may sit in nested folders below their class folder. Hidden files and folders are skipped.
Class names are folder names (NFC-normalised, accents and spaces kept), sorted like Keras does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge.imageio import is_image_name
from extract.errors import DatasetError
from extract.splits import (VALIDATION_BY_HASH, VALIDATION_FOLDER, VALIDATION_FROM_TRAIN, SplitSettings,
                            split_counts)

SPLIT_FOLDERS = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
                 "valid": "validation", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class ImageEntry:
    relpath: str  # POSIX path relative to the dataset root, as on disk
    class_name: str
    split: str


@dataclass
class Dataset:
    root: Path
    layout: str  # "class-folders" or "split-folders"
    entries: list[ImageEntry]
    class_names: list[str]
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    validation_source: str = VALIDATION_BY_HASH  # where the validation images come from (extract.splits)

    def split_counts(self) -> dict[str, int]:
        return split_counts(e.split for e in self.entries)


def unit_hash(text: str) -> float:
    """A number in [0, 1) that depends only on ``text``.

    A file name that is not valid UTF-8 arrives surrogate-escaped (``os.fsdecode``); it is hashed
    as its original bytes, so such a file gets a split like any other."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_key(relpath: str, group: re.Pattern | None) -> str:
    """What an image's split is drawn from: its path, with every match of ``group`` removed.

    With the pattern ``_aug\\d+``, ``cat/img1.jpg`` and ``cat/img1_aug3.jpg`` share the key
    ``cat/img1.jpg`` and so one split: augmented or re-saved copies of one photo cannot straddle
    train and test.
    """
    return group.sub("", relpath) if group else relpath


def compile_group(split_group: str) -> re.Pattern | None:
    if not split_group:
        return None
    try:
        return re.compile(split_group)
    except re.error as exc:
        raise DatasetError(f"--split-group {split_group!r} is not a valid regular expression: {exc}") from None


def assign_split(relpath: str, settings: SplitSettings) -> str:
    """Deterministic split of one image: it depends on its own path and the settings, nothing else."""
    u = unit_hash(f"{settings.seed}\x00{relpath}")
    if u < settings.test_split:
        return "test"
    if u < settings.test_split + settings.validation_split:
        return "validation"
    return "train"


def shard_of(relpath: str, count: int) -> int:
    """Which of ``count`` shards an image belongs to (independent of the split seed)."""
    return int(unit_hash(f"shard\x00{relpath}") * count)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_files(folder: Path):
    """Relative-to-``folder`` POSIX paths of visible files, recursively, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        rel = Path(dirpath).relative_to(folder)
        for name in sorted(filenames):
            if _visible(name):
                yield (rel / name).as_posix()


def walk_image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (relative POSIX paths, sorted, hidden ones skipped), as extract finds them."""
    return [rel for rel in _walk_files(folder) if is_image_name(rel)]


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))


def _norm(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def discover(root: str | Path, settings: SplitSettings = SplitSettings(), split_anchors: str | dict = "") -> Dataset:
    """Images and classes under ``root``; see the module docstring for layouts and splits.

    ``split_anchors`` (``{path: anchor}``, or its JSON): an image listed there takes its anchor's
    split (``extract --split-group-by near-duplicates``, see ``extract/leak_free.py``).
    """
    root = Path(root)
    group = compile_group(settings.split_group)
    anchors = json.loads(split_anchors or "{}") if isinstance(split_anchors, str) else split_anchors
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder")
    top = _class_dirs(root)
    split_named = [d for d in top if d.name.lower() in SPLIT_FOLDERS]
    if split_named and len(split_named) != len(top):
        others = ", ".join(d.name for d in top if d not in split_named)
        raise DatasetError(
            f"{root} mixes split folders ({', '.join(d.name for d in split_named)}) with other folders "
            f"({others}); use either DIR/<class>/ or DIR/{{train,validation,test}}/<class>/"
        )
    entries: list[ImageEntry] = []
    ignored: list[str] = []
    groups = [(d, SPLIT_FOLDERS[d.name.lower()]) for d in split_named] if split_named else [(root, None)]
    source = _validation_source(split for _, split in groups)
    carve = replace(settings, test_split=0.0)  # validation out of train/, when there is no validation folder
    for base, split in groups:
        for class_dir in _class_dirs(base):
            class_name = _norm(class_dir.name)
            for rel in _walk_files(class_dir):
                relpath = (class_dir.relative_to(root) / rel).as_posix()
                if not is_image_name(rel):
                    ignored.append(relpath)
                    continue
                entry_split = split or assign_split(split_key(anchors.get(relpath, relpath), group), settings)
                if split == "train" and source == VALIDATION_FROM_TRAIN:
                    entry_split = assign_split(split_key(relpath, group), carve)
                entries.append(ImageEntry(relpath, class_name, entry_split))
    if not entries:
        raise DatasetError(
            f"no images found in {root}; expected DIR/<class>/<image> or DIR/train/<class>/<image>"
        )
    class_names = sorted({e.class_name for e in entries})
    entries.sort(key=lambda e: e.relpath)
    layout = "split-folders" if split_named else "class-folders"
    return Dataset(root=root, layout=layout, entries=entries, class_names=class_names, ignored=ignored,
                   validation_source=source)


def _validation_source(folder_splits) -> str:
    """``VALIDATION_BY_HASH`` for class folders (split None), else whether a validation folder exists."""
    splits = set(folder_splits)
    if splits == {None}:
        return VALIDATION_BY_HASH
    return VALIDATION_FOLDER if "validation" in splits else VALIDATION_FROM_TRAIN
