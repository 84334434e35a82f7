"""Shared test fixtures: small generated image folders (the suite never needs ../shared)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classify.data import fingerprint
from classify.heads import make_head
from classify.persist import TrainedHead, save_head
from extract.backbones import UnknownBackbone, get_backbone
from extract.job import run_extraction
from extract.record import BackboneRecord, Preprocessing, WeightsRecord, random_init_id
from extract.store import BackboneRows, FeatureStore, empty_state, write_state

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHARED = Path(os.environ.get("TRANSFERKIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def write_image(path: Path, colour, size=24, seed=0, fmt=None) -> Path:
    """A noisy solid-colour RGB image."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-25, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_image_folder(root: Path, per_class: int = 6, classes=None, size: int = 24, start: int = 0) -> Path:
    """``root/<class>/img_<i>.jpg`` (or png for every third), colours from COLOURS."""
    classes = classes or COLOURS
    for c_index, (name, colour) in enumerate(classes.items()):
        for i in range(start, start + per_class):
            ext = "png" if i % 3 == 2 else "jpg"
            write_image(root / name / f"img_{i}.{ext}", colour, size=size, seed=c_index * 1000 + i)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Converted engines and weights go to a per-session temp cache, never ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "transferkit-cache"
    monkeypatch.setenv("TRANSFERKIT_CACHE", os.environ.get("TRANSFERKIT_TEST_CACHE", str(cache)))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


# ------------------------------------------------------------------ synthetic feature stores (heads)


def fake_record(backbone: str, dim: int, input_size: int = 32, dtype: str = "float32", preprocessing: str = "tf",
                weights_seed: int = 0) -> BackboneRecord:
    """A real backbone record for made-up features (``dim`` wide, random weights from ``weights_seed``);
    ``backbone`` may be a name the registry does not know."""
    weights = WeightsRecord(kind="none", id=random_init_id(weights_seed), seed=weights_seed)
    try:
        spec = get_backbone(backbone)
        constructor, source = spec.constructor, spec.weights_source
    except UnknownBackbone:  # a name only these tests know
        constructor, source = "tests:unregistered", "none"
    return BackboneRecord(name=backbone, constructor=constructor, feature_dim=dim, weights_source=source,
                          input_size=input_size, preprocessing=Preprocessing(preprocessing), weights=weights,
                          dtype=dtype)

CLASSES = ("café", "crème brûlée", "thé vert")
SPLIT_SIZES = {"train": 24, "validation": 8, "test": 8}


def make_feature_store(path: Path, classes=CLASSES, sizes=None, dim: int = 16, spread: float = 4.0,
                       seed: int = 0, backbone: str = "mobilenet_v2", weights_seed: int = 0,
                       images_root: str = "/nonexistent/images", features: np.ndarray | None = None,
                       dtype=np.float32) -> Path:
    """A store whose features are Gaussian blobs, one per class (separable when ``spread`` is large),
    recorded as ``dim``-wide ``dtype`` features of ``backbone`` with random weights from
    ``weights_seed``; ``features`` replaces them, rows in the order written (class, then split, then index)."""
    sizes = sizes or {name: SPLIT_SIZES for name in classes}
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (len(classes), dim)) * spread
    state = empty_state(images_root=images_root, seed=0, validation_split=0.2, test_split=0.2, layout="class-folders")
    state.classes = list(classes)
    rows = []
    for index, name in enumerate(classes):
        for split, count in sizes[name].items():
            for i in range(count):
                relpath = f"{name}/{split}_{i}.jpg"
                for column, value in (("path", relpath), ("sha256", f"{index}-{split}-{i}"), ("class_name", name),
                                      ("split", split), ("size", 100), ("mtime_ns", 0)):
                    getattr(state.images, column).append(value)
                rows.append(centres[index] + rng.normal(0, 1, dim) + 3.0)
    record = fake_record(backbone, dim, weights_seed=weights_seed)
    state.backbones[backbone] = BackboneRows(record=record, path=list(state.images.path),
                                             sha256=list(state.images.sha256),
                                             features=np.asarray(rows if features is None else features, dtype))
    write_state(path, state)
    return path


# ------------------------------------------------- a real store and heads, built once (export, fine-tune)

STORE_SEED = 3  # not the default, so a split computed with default settings would differ


@dataclass
class Workspace:
    root: Path
    images: Path
    store: Path
    head: Path  # softmax head
    mlp_head: Path

    def features(self):
        return FeatureStore(self.store).read("mobilenet_v2")


def _fit_head(features, kind: str, out: Path) -> Path:
    labelled = features.splits != "test"
    head = make_head(kind, seed=0).fit(features.features[labelled], features.labels[labelled])
    store = {"path": "", "fingerprint": fingerprint(features)}  # no path: tests pass --store explicitly
    return save_head(TrainedHead(head, features.class_names, features.backbone, store), out)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    """Images, a store (random-init MobileNetV2, 32 px, split seed 3) and two heads, built once."""
    root = tmp_path_factory.mktemp("export-workspace")
    images = make_image_folder(root / "images", per_class=20, size=40)
    store = root / "features.h5"
    run_extraction(images, store, backbone="mobilenet_v2", weights="none", input_size=32, seed=STORE_SEED,
                   validation_split=0.2, test_split=0.2, engine="keras", progress=False)
    features = FeatureStore(store).read("mobilenet_v2")
    return Workspace(root, images, store, _fit_head(features, "softmax", root / "head"),
                     _fit_head(features, "mlp", root / "mlp-head"))


@pytest.fixture(scope="session")
def fine_tuned(workspace):
    """A model fine-tuned end to end on images for 2 epochs from the softmax head (and its FineTuneResult)."""
    from export.finetune import fine_tune

    out = workspace.root / "fine" / "model.keras"
    result = fine_tune(workspace.images, None, out, head=workspace.head, store=workspace.store, epochs=2,
                       batch_size=16, unfreeze="all", learning_rate=1e-4, cache_front=False)
    return out, result


