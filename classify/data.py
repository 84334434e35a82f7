"""Features from the store for heads: the checks that turn bad input into one clear error."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from classify.errors import HeadMismatch, TrainingDataError
from classify.fingerprints import fingerprint  # noqa: F401  (re-exported: tests and older callers)
from classify.persist import TrainedHead
from classify.joined import read_features
from extract.int8 import stored_name
from extract.splits import SPLITS, split_counts
from extract.store import FeatureSet, FeatureStore


def unfinished_extraction(features: FeatureSet, store: str | Path) -> str | None:
    """Why the store has fewer rows than images, when an extraction did not finish; else None."""
    info = FeatureStore(store).info()
    short = [(stored_name(record), info["backbones"].get(stored_name(record), {}).get("rows", len(features.paths)))
             for record in features.records]
    short = [(name, rows) for name, rows in short if rows < info["images"]]
    if not short:
        return None
    name, rows = short[0]
    return (f"{store} has {name} features for only {rows} of its {info['images']} images because an extraction "
            f"did not finish (interrupted?); run the same extract command again to resume")


def check_trainable(features: FeatureSet, store: str | Path) -> None:
    """Refuse features a head cannot be cross-validated on: every class needs 2 labelled images
    (train or validation; the test split is kept for the report). Says so first when the store is
    short of rows because an extraction was interrupted."""
    try:
        _check_counts(features, store)
    except TrainingDataError as exc:
        gap = unfinished_extraction(features, store)
        if gap:
            raise TrainingDataError(f"{gap} ({exc})") from None
        raise


def _check_counts(features: FeatureSet, store: str | Path) -> None:
    names = features.class_names
    if len(names) < 2:
        raise TrainingDataError(f"{store} has {len(names)} class ({', '.join(names)}); a head needs at least 2")
    labelled = Counter(features.labels[features.splits != "test"].tolist())
    remedy = ("add images to its train/ folder (split folders give the splits)"
              if features.store_attrs.get("layout") == "split-folders"
              else "add images, or re-extract into a new --store with a smaller --test-split")
    for index, name in enumerate(names):
        if labelled.get(index, 0) < 2:
            raise TrainingDataError(
                f"class {name!r} has {labelled.get(index, 0)} training image(s) in {store}; a head needs at "
                f"least 2 per class (train and validation splits together): {remedy}"
            )


def split_rows(features: FeatureSet, split: str, store: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features, labels and image paths of one split; refuses an empty split."""
    if split not in SPLITS:
        raise TrainingDataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    mask = features.splits == split
    if not mask.any():
        counts = ", ".join(f"{k} {v}" for k, v in split_counts(features.splits).items())
        raise TrainingDataError(f"{store} has no {split} images (its splits: {counts})")
    paths = [p for p, keep in zip(features.paths, mask) if keep]
    return features.features[mask], features.labels[mask], paths


def features_for_head(trained: TrainedHead, store: str | Path, splits: tuple[str, ...] = SPLITS) -> FeatureSet:
    """The store's features of the head's backbone in ``splits`` (its int8 or mirror-averaged ones for a
    head trained on those; every backbone's, joined, for a head over several); refuses other weights,
    input size or classes."""
    names = [stored_name(record) for record in trained.records]
    available = FeatureStore(store).backbones
    for name in names:
        if name not in available:
            raise HeadMismatch(f"the head was trained on {trained.features_name} features; {store} has features "
                               f"for {', '.join(available) or 'no backbone'}")
    features = read_features(store, "+".join(names), splits)
    for wanted, found in zip(trained.records, features.records):
        if not wanted.same_features(found):
            raise HeadMismatch(f"the head was trained on {wanted.describe()}; {store} holds {found.describe()}")
    if features.features.shape[1] != trained.n_features:
        raise HeadMismatch(f"the head takes {trained.n_features} features; {store} gives "
                           f"{features.features.shape[1]} for {trained.features_name}")
    if features.class_names != trained.class_names:
        raise HeadMismatch(f"the head knows classes [{', '.join(trained.class_names)}]; {store} has "
                           f"[{', '.join(features.class_names)}]")
    return features
