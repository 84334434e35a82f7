"""What a head remembers of the store it was fitted on, to tell later whether the store changed.

``head.json``'s ``store`` holds (``training_store``):

- ``fingerprint``: one sha256 over every row of every split, features included (heads of every
  version have it; checking it means reading the whole backbone);
- ``split_fingerprints`` (heads from fit-head since per-split reads): for each split, ``rows``, a
  sha256 of its rows' paths, content sha256 and labels (with the backbones, weights and classes),
  read without a single feature, and ``features``, a sha256 of ``rows`` and the split's features
  as float32, hashed a chunk at a time.

``evaluate`` on one split checks that split's ``features`` (it reads them anyway) and the ``rows``
of the splits the head learned from (train and validation: their paths, content and labels, not
their features). A train image replaced by another file, relabelled, added or removed is seen;
train features recomputed from the same images (other weights would be refused by their record
already) are not, which is the price of not reading them.

    >>> store = training_store("features.h5", features)        # what fit-head saves
    >>> changed_splits(trained.split_fingerprints, rows_now, test_features, "test")   # [] when unchanged
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from classify.errors import HeadFileError
from classify.streamed import row_chunks
from edge.imageio import strict_json
from extract.splits import SPLITS, split_counts
from extract.store_types import FeatureSet

WHOLE_FINGERPRINT = "fingerprint"  # the keys under head.json's "store"
SPLIT_FINGERPRINTS = "split_fingerprints"
LEARNED_FROM = ("train", "validation")  # the splits a head is fitted on


@dataclass(frozen=True)
class SplitFingerprint:
    rows: str  # "sha256:..." of the split's paths, content sha256 and labels
    features: str  # "sha256:..." of ``rows`` and the split's features as float32

    @classmethod
    def from_dict(cls, value, where: str) -> "SplitFingerprint":
        if not (isinstance(value, dict) and set(value) == {"rows", "features"}
                and all(isinstance(v, str) and v.startswith("sha256:") for v in value.values())):
            raise HeadFileError(f"{where} is damaged: store.{SPLIT_FINGERPRINTS} must give 'rows' and 'features' "
                                f"sha256 values for every split; re-run fit-head")
        return cls(**value)


def _add_features(features: FeatureSet, digests: dict) -> None:
    """Feed each digest the float32 bytes of its split's rows in order (key None: of every row), in
    one pass over the rows, a chunk at a time (no float32 copy of them all)."""
    for part in row_chunks(len(features.features)):
        block = np.ascontiguousarray(features.features[part], dtype=np.float32)
        splits = features.splits[part]
        for split, digest in digests.items():
            digest.update((block if split is None else block[splits == split]).tobytes())


def _store_identity(features: FeatureSet) -> dict:
    """The backbones, weights and classes every fingerprint starts with (keys and order are part of
    the fingerprints already in head files: keep them)."""
    return {"backbone": "+".join(record.name for record in features.records),
            "weights": "+".join(record.weights.id for record in features.records),
            "classes": features.class_names}


def _whole_header(features: FeatureSet):
    digest = hashlib.sha256()
    digest.update(strict_json({
        **_store_identity(features),
        "paths": features.paths,
        "splits": features.splits.tolist(),
        "labels": features.labels.tolist(),
    }).encode())  # the same text as json.dumps(ensure_ascii=False) for names that are valid UTF-8
    return digest


def fingerprint(features: FeatureSet) -> str:
    """sha256 over the backbone, weights, classes, rows (path, split, label) and feature values
    (as float32, whatever dtype they are held in): every split at once."""
    digest = _whole_header(features)
    _add_features(features, {None: digest})
    return "sha256:" + digest.hexdigest()


def rows_fingerprint(features: FeatureSet, split: str) -> str:
    """sha256 of ``split``'s rows (paths, content sha256, labels) with the backbones, weights and
    classes; needs no feature (``features`` may be read ``with_features=False``)."""
    rows = np.flatnonzero(features.splits == split)
    return "sha256:" + hashlib.sha256(strict_json({
        **_store_identity(features),
        "split": split,
        "paths": [features.paths[i] for i in rows],
        "sha256": [features.sha256[i] for i in rows],
        "labels": features.labels[rows].tolist(),
    }).encode()).hexdigest()


def features_fingerprint(features: FeatureSet, split: str) -> str:
    """sha256 of ``split``'s rows fingerprint and its features as float32 (a chunk at a time)."""
    digest = hashlib.sha256(rows_fingerprint(features, split).encode())
    _add_features(features, {split: digest})
    return "sha256:" + digest.hexdigest()


def training_store(store: str | Path, features: FeatureSet) -> dict:
    """head.json's ``store``: the path, the whole-store fingerprint, split counts and per-split
    fingerprints, the features hashed in one pass for all of them."""
    rows = {split: rows_fingerprint(features, split) for split in SPLITS}
    whole, per_split = _whole_header(features), {split: hashlib.sha256(rows[split].encode()) for split in SPLITS}
    _add_features(features, {None: whole, **per_split})
    return {"path": str(Path(store).resolve()), WHOLE_FINGERPRINT: "sha256:" + whole.hexdigest(),
            "split_counts": split_counts(features.splits),
            SPLIT_FINGERPRINTS: {split: asdict(SplitFingerprint(rows[split], f"sha256:{digest.hexdigest()}"))
                                 for split, digest in per_split.items()}}


def recorded_split_fingerprints(store: dict, where: str) -> dict[str, SplitFingerprint] | None:
    """The per-split fingerprints of a head's ``store`` entry; None for a head saved before them."""
    if SPLIT_FINGERPRINTS not in store:
        return None
    recorded = store[SPLIT_FINGERPRINTS]
    if not isinstance(recorded, dict) or set(recorded) != set(SPLITS):
        raise HeadFileError(f"{where} is damaged: store.{SPLIT_FINGERPRINTS} must name the splits "
                            f"{', '.join(SPLITS)}; re-run fit-head")
    return {split: SplitFingerprint.from_dict(recorded[split], where) for split in SPLITS}


def same_whole_store(store: dict, features: FeatureSet) -> bool:
    """Whether ``features`` (every split) are those a head's ``store`` entry was fitted on."""
    return fingerprint(features) == store.get(WHOLE_FINGERPRINT)


def changed_splits(recorded: dict[str, SplitFingerprint], rows: FeatureSet, evaluated: FeatureSet,
                   split: str) -> list[str]:
    """The splits that differ from the fit: ``split`` by its rows and features (from ``evaluated``),
    the splits the head learned from by their rows (from ``rows``, which needs no features)."""
    changed = {s for s in LEARNED_FROM if s != split and rows_fingerprint(rows, s) != recorded[s].rows}
    if features_fingerprint(evaluated, split) != recorded[split].features:
        changed.add(split)
    return [s for s in SPLITS if s in changed]
