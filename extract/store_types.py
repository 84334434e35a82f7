"""What a feature store holds, as Python values (the file layout is in ``extract.store_files``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np

from extract.record import BackboneRecord
from extract.splits import SPLITS  # re-exported for the store modules


FORMAT = "transferkit-feature-store"
FORMAT_VERSION = 2
STR = h5py.string_dtype("utf-8")


@dataclass
class ImageTable:
    """One row per image file found in the folder (failed ones included)."""

    path: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    class_name: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)

    COLUMNS = ("path", "sha256", "class_name", "split", "size", "mtime_ns")

    def __len__(self) -> int:
        return len(self.path)

    def copies_across_splits(self) -> list[list[str]]:
        """Groups of byte-identical files that sit in more than one split.

        Splits are assigned per file path, so a photo saved twice under two names (common in
        scraped data sets) can land in train and in test and inflate the test score.
        """
        groups: dict[str, list[int]] = {}
        for i, sha in enumerate(self.sha256):
            if sha:  # "" is a file that could not be read: no content to compare
                groups.setdefault(sha, []).append(i)
        return [sorted(self.path[i] for i in rows) for rows in groups.values()
                if len(rows) > 1 and len({self.split[i] for i in rows}) > 1]

    def index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.path)}

    def wanted(self) -> dict[str, str]:
        """path -> sha256: the rows a backbone may hold."""
        return dict(zip(self.path, self.sha256))


@dataclass
class BackboneRows:
    """Features of one backbone held in memory (to build small stores); row i is file ``path[i]``."""

    record: dict
    path: list[str]
    sha256: list[str]
    features: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


@dataclass
class SegmentRef:
    """One immutable segment file of a backbone (a name inside the store's segment folder)."""

    file: str
    rows: int


@dataclass
class BackboneMeta:
    """A backbone as the root file describes it: its record and the segment files holding its rows."""

    record: dict
    dim: int
    dtype: str
    segments: list[SegmentRef]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def weights_id(self) -> str | None:
        return record_weights_id(self.record)


def record_weights_id(record: dict) -> str | None:
    """The weights id of a record as stored (not parsed: merge compares and refuses shards' partial or
    foreign records with its own message)."""
    return (record.get("weights") or {}).get("id")


@dataclass
class StoreState:
    attrs: dict
    classes: list[str]
    images: ImageTable
    failed: dict[str, tuple[str, str]]  # path -> (sha256, reason)
    backbones: dict  # name -> BackboneMeta (read from a store) or BackboneRows (to write with write_state)


@dataclass
class FeatureSet:
    """What heads train on: the rows of one backbone (or of several, joined image by image:
    ``classify.joined``) with the image table.

    Rows are in the canonical order (split in ``SPLITS`` order, then path), whatever built the
    store, so the same images always give the same head; ``subset`` is then a view, not a copy.
    """

    features: np.ndarray  # (n, dim) float32
    labels: np.ndarray  # (n,) int index into class_names
    splits: np.ndarray  # (n,) str: train / validation / test
    paths: list[str]
    class_names: list[str]
    backbone: BackboneRecord  # the store's record of these features (extract/record.py); the first when joined
    store_attrs: dict
    sha256: list[str] = field(default_factory=list)  # content hash of each row's image
    joined: list[BackboneRecord] = field(default_factory=list)  # every backbone's record, in column order, when joined

    @property
    def records(self) -> list[BackboneRecord]:
        """The records of the features' column blocks, in order (one for a single backbone)."""
        return list(self.joined) or [self.backbone]

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(self.splits == split)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # contiguous: no copy
            part = slice(int(rows[0]), int(rows[-1]) + 1)
            return self.features[part], self.labels[part]
        return self.features[rows], self.labels[rows]
