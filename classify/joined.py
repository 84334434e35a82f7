"""Heads over several backbones: ``--backbone efficientnet_lite0+efficientnet_lite1``.

The store's features of each named backbone are joined image by image (same path and same content
sha256; only images that every backbone has a row for) and concatenated in the order given. The
head file then records every backbone's record in that order (``classify.persist``), and the
exported model computes them all from one photo (``export.composite``).

A name is what the store keeps the features under (``store info`` lists them): a backbone,
``BACKBONE@int8`` or ``BACKBONE@flip``.

    >>> features = read_features("features.h5", "efficientnet_lite0@flip+efficientnet_lite2@flip")
    >>> features.features.shape, [r.name for r in features.records]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from classify.errors import HeadMismatch
from extract.int8 import stored_name
from extract.store import FeatureSet, FeatureStore
from extract.store_types import SPLITS

SEPARATOR = "+"


def split_names(backbone: str | None) -> list[str | None]:
    """``"a+b"`` -> ``["a", "b"]``; None (the store's only backbone) -> ``[None]``; refuses repeats."""
    if backbone is None:
        return [None]
    names = [name.strip() for name in backbone.split(SEPARATOR)]
    if not all(names):
        raise HeadMismatch(f"--backbone {backbone!r}: join backbone names with '+', e.g. "
                           f"efficientnet_lite0+efficientnet_lite1")
    if len(set(names)) != len(names):
        raise HeadMismatch(f"--backbone {backbone!r} names a backbone twice")
    return names


def joined_name(records) -> str:
    """How a head's features are named: ``efficientnet_lite0+efficientnet_lite1@flip``."""
    return SEPARATOR.join(stored_name(record) for record in records)


def read_features(store: str | Path, backbone: str | None = None, splits: tuple[str, ...] = SPLITS,
                  dtype: type | None = np.float32, with_features: bool = True) -> FeatureSet:
    """The rows of ``backbone`` (``a+b``: of every named backbone, joined and concatenated), as ``dtype``
    (None: as stored); ``with_features=False``: the rows without their features (``FeatureStore.read``)."""
    names = split_names(backbone)
    reader = FeatureStore(store)
    if len(names) == 1:
        return reader.read(names[0], splits, dtype, with_features)
    missing = [name for name in names if name not in reader.backbones]
    if missing:
        raise HeadMismatch(f"{store} has no features for {', '.join(missing)} (it has: "
                           f"{', '.join(reader.backbones) or 'none'}); extract them into it first")
    return join([reader.read(name, splits, dtype, with_features) for name in names])


def join(parts: list[FeatureSet]) -> FeatureSet:
    """Rows of the images (path and sha256) every part has, in the first part's (canonical) order."""
    keys = [list(zip(part.paths, part.sha256)) for part in parts]
    common = set(keys[0]).intersection(*keys[1:])
    keep = [i for i, key in enumerate(keys[0]) if key in common]
    columns = []
    for part, part_keys in zip(parts, keys):
        where = {key: i for i, key in enumerate(part_keys)}
        columns.append(part.features[[where[keys[0][i]] for i in keep]])
    first = parts[0]
    return FeatureSet(
        features=np.concatenate(columns, axis=1) if keep else np.zeros((0, sum(c.shape[1] for c in columns)),
                                                                        np.float32),
        labels=first.labels[keep], splits=first.splits[keep], paths=[first.paths[i] for i in keep],
        class_names=first.class_names, backbone=first.backbone, store_attrs=first.store_attrs,
        sha256=[first.sha256[i] for i in keep], joined=[part.backbone for part in parts])


def resized(batch: np.ndarray, size: int) -> np.ndarray:
    """A uint8 NHWC batch brought to ``size`` x ``size`` with Pillow's bilinear filter (the decoder's)."""
    from PIL import Image

    from edge.imageio import RESIZE

    if batch.shape[1:3] == (size, size):
        return batch
    method = Image.Resampling[RESIZE.upper()]
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), method)) for image in batch])


class JoinedEngine:
    """The features a head takes, from a uint8 batch at the largest input size of its backbones:
    each backbone's engine on the batch resized to its size (mirror-averaged when its record says
    so), concatenated in the head's order."""

    def __init__(self, records, engines):
        self.records, self.engines = list(records), list(engines)
        self.name = self.engines[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        from extract.tta import mirror_averaged

        blocks = []
        for record, engine in zip(self.records, self.engines):
            x = resized(batch, record.input_size)
            blocks.append(mirror_averaged(engine, x) if record.tta else np.asarray(engine(x), np.float32))
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
