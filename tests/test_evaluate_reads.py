"""evaluate reads only the split it scores, and still tells a store that changed since the fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CLASSES, SPLIT_SIZES, make_feature_store

from classify.errors import HeadFileError
from classify.fingerprints import SPLIT_FINGERPRINTS
from classify.persist import CONFIG_NAME, load_head
from classify.report import evaluate
from classify.train import fit_heads
from extract.store import FeatureStore
from extract.store_types import SPLITS

DIM = 8


def _features(sizes: dict) -> np.ndarray:
    """Blob features in make_feature_store's row order, each row from its own (class, split, index) seed:
    a row keeps its values whatever other rows the store has."""
    rows = []
    for c, name in enumerate(CLASSES):
        for split, count in sizes[name].items():
            rows += [np.random.default_rng([c, SPLITS.index(split), i]).normal(0, 1, DIM) + 4.0 * c
                     for i in range(count)]
    return np.asarray(rows)


def _store(path, sizes=None, shift_split: str | None = None):
    sizes = sizes or {name: dict(SPLIT_SIZES) for name in CLASSES}
    features = _features(sizes)
    if shift_split:  # the same images with other feature values in one split
        order = [(split, i) for name in CLASSES for split, count in sizes[name].items() for i in range(count)]
        features[[k for k, (split, _) in enumerate(order) if split == shift_split]] += 0.5
    return make_feature_store(path, sizes=sizes, dim=DIM, features=features)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_reads")
    store = _store(root / "features.h5")
    fit_heads(store, kind="softmax", out=root / "head")
    return root, store, root / "head"


@pytest.fixture(autouse=True)
def _no_tsne(monkeypatch):
    """The t-SNE figure is most of a small report's time and has nothing to do with what is read."""
    monkeypatch.setattr("classify.plots.tsne_png", lambda *args, **kwargs: None)


@pytest.fixture
def reads(monkeypatch):
    """Every FeatureStore.read: (splits, with_features, rows returned)."""
    calls = []
    original = FeatureStore.read

    def spy(self, backbone=None, splits=SPLITS, dtype=np.float32, with_features=True):
        result = original(self, backbone, splits, dtype, with_features)
        calls.append((tuple(splits), with_features, result.features.shape))
        return result

    monkeypatch.setattr(FeatureStore, "read", spy)
    return calls


def test_evaluate_reads_the_features_of_the_test_split_only(fitted, reads, tmp_path):
    _, store, head = fitted
    metrics = evaluate(store, head, split="test", report_dir=tmp_path / "r")
    n_test = SPLIT_SIZES["test"] * len(CLASSES)
    with_features = [(splits, shape) for splits, features, shape in reads if features]
    assert with_features == [(("test",), (n_test, DIM))]
    assert all(shape[1] == 0 for _, features, shape in reads if not features)  # rows only: no feature read
    assert metrics["n"] == n_test
    assert metrics["same_store_as_training"] is True and metrics["changed_since_training"] == []


@pytest.mark.parametrize("changed", ["test", "train"])
def test_a_store_whose_split_changed_is_told(fitted, tmp_path, changed):
    """Test features changed: seen from the features read. A train image removed: seen from the
    train rows' fingerprint (paths, content, labels), without reading train features."""
    _, _, head = fitted
    sizes = {name: dict(SPLIT_SIZES) for name in CLASSES}
    if changed == "train":
        sizes[CLASSES[0]]["train"] -= 1
    other = _store(tmp_path / "other.h5", sizes, shift_split="test" if changed == "test" else None)
    metrics = evaluate(other, head, split="test", report_dir=tmp_path / "r")
    assert metrics["same_store_as_training"] is False
    assert metrics["changed_since_training"] == [changed]


def test_train_features_recomputed_from_the_same_images_are_not_checked(fitted, tmp_path):
    """The documented price of not reading them: the same train rows with other values pass."""
    _, _, head = fitted
    other = _store(tmp_path / "other.h5", shift_split="train")
    assert evaluate(other, head, split="test", report_dir=tmp_path / "r")["changed_since_training"] == []


def _old_head(head, tmp_path):
    """The head as saved before per-split fingerprints."""
    config = json.loads((head / CONFIG_NAME).read_text())
    del config["store"][SPLIT_FINGERPRINTS]
    old = tmp_path / "old-head"
    old.mkdir()
    (old / CONFIG_NAME).write_text(json.dumps(config))
    (old / "weights.npz").write_bytes((head / "weights.npz").read_bytes())
    return old


def test_an_older_head_reads_every_split_and_checks_the_whole_fingerprint(fitted, reads, tmp_path):
    _, store, head = fitted
    old = _old_head(head, tmp_path)
    metrics = evaluate(store, old, split="test", report_dir=tmp_path / "r")
    assert [splits for splits, features, _ in reads if features] == [SPLITS]
    assert metrics["same_store_as_training"] is True and metrics["changed_since_training"] is None
    changed = _store(tmp_path / "other.h5", shift_split="train")
    assert evaluate(changed, old, split="test", report_dir=tmp_path / "r2")["same_store_as_training"] is False


def test_a_damaged_split_fingerprint_is_refused_on_load(fitted, tmp_path):
    _, _, head = fitted
    old = _old_head(head, tmp_path)
    config = json.loads((old / CONFIG_NAME).read_text())
    config["store"][SPLIT_FINGERPRINTS] = {"test": {"rows": "x", "features": "y"}}
    (old / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(HeadFileError, match="split_fingerprints"):
        load_head(old)
