"""Heads on synthetic feature stores: learning, determinism, persistence, tampering, ONNX, reports."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import CLASSES, make_feature_store
from PIL import Image

from classify.data import fingerprint
from classify.errors import HeadFileError, HeadMismatch, TrainingDataError
from classify.heads import HEAD_KINDS, MLPHead, SVMHead, make_head
from classify.persist import CONFIG_NAME, WEIGHTS_NAME, load_head
from classify.report import REPORT_FILES, evaluate
from classify.train import fit_heads
from extract.errors import StoreError
from extract.store import FeatureStore


@pytest.fixture
def store(tmp_path) -> Path:
    return make_feature_store(tmp_path / "features.h5")


@pytest.fixture
def trained(store, tmp_path) -> Path:
    """A saved mlp head (the kind with the most arrays)."""
    fit_heads(store, kind="mlp", out=tmp_path / "head", seed=0)
    return tmp_path / "head"


def _split(store: Path, split: str):
    return FeatureStore(store).read().subset(split)


# ---------------------------------------------------------------- estimators


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_every_kind_learns_separable_features(store, tmp_path, kind):
    (row,) = fit_heads(store, kind=kind, out=tmp_path / kind, seed=0)
    assert row["kind"] == kind and row["saved"]
    assert row["test_accuracy"] > 0.9 and row["val_accuracy"] > 0.9
    assert row["n_train"] == 3 * 24 and row["n_val"] == 3 * 8 and row["n_test"] == 3 * 8


def test_heads_follow_scikit_learn_conventions(store):
    X, y = _split(store, "train")
    X_val, y_val = _split(store, "validation")
    head = MLPHead(hidden=[32, 16], dropout=0.1, seed=3)
    assert head.get_params()["hidden"] == [32, 16]  # stored unchanged
    assert not any(name.endswith("_") for name in vars(head))
    assert head.fit(X, y, X_val, y_val) is head
    learned = [name for name in vars(head) if name not in head.get_params()]
    assert learned and all(name.endswith("_") for name in learned)
    proba = head.predict_proba(X_val)
    assert proba.shape == (len(X_val), 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(head.predict(X_val), proba.argmax(axis=1))
    assert [W.shape for W in head.coefs_] == [(16, 32), (32, 16), (16, 3)]


def test_invalid_params_are_refused_at_fit(store):
    X, y = _split(store, "train")
    with pytest.raises(ValueError, match="dropout"):
        MLPHead(dropout=1.5).fit(X, y, X, y)
    with pytest.raises(ValueError, match="Cs"):
        SVMHead(Cs=()).fit(X, y, X, y)


def test_svm_binary_problem_gives_two_probability_columns(tmp_path):
    store = make_feature_store(tmp_path / "two.h5", classes=("chat", "chien"))
    X, y = _split(store, "train")
    X_test, y_test = _split(store, "test")
    head = SVMHead().fit(X, y, *_split(store, "validation"))
    assert head.coef_.shape == (2, 16)
    assert (head.predict(X_test) == y_test).mean() > 0.9
    assert head.C_ in head.Cs and head.temperature_ > 0


def test_same_seed_same_head_and_numbers(store, tmp_path):
    first = fit_heads(store, kind="all", out=tmp_path / "a", seed=7)
    second = fit_heads(store, kind="all", out=tmp_path / "b", seed=7)
    strip = [{k: v for k, v in row.items() if k not in ("fit_seconds", "head")} for row in first]
    assert strip == [{k: v for k, v in row.items() if k not in ("fit_seconds", "head")} for row in second]
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()
    X, y = _split(store, "train")
    X_val, y_val = _split(store, "validation")
    for kind in HEAD_KINDS:
        a = make_head(kind, seed=1).fit(X, y, X_val, y_val)
        b = make_head(kind, seed=1).fit(X, y, X_val, y_val)
        for name, array in a.learned_arrays().items():
            assert np.array_equal(array, b.learned_arrays()[name]), (kind, name)
    other = make_head("mlp", seed=2).fit(X, y, X_val, y_val)
    assert not np.array_equal(other.coefs_[0], make_head("mlp", seed=1).fit(X, y, X_val, y_val).coefs_[0])


def test_all_saves_the_best_on_validation(store, tmp_path):
    rows = fit_heads(store, kind="all", out=tmp_path / "head", seed=0)
    assert [r["kind"] for r in rows] == list(HEAD_KINDS)
    saved = [r for r in rows if r["saved"]]
    assert len(saved) == 1 and saved[0]["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    config = json.loads((tmp_path / "head" / CONFIG_NAME).read_text())
    assert config["kind"] == saved[0]["kind"]
    assert config["class_names"] == list(CLASSES)
    assert config["backbone"]["weights"]["id"] == "random-init:seed=0"
    assert config["store"]["path"] == str(store.resolve())
    assert config["store"]["fingerprint"] == fingerprint(FeatureStore(store).read())


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_save_load_round_trip_gives_identical_probabilities(store, tmp_path, kind):
    fit_heads(store, kind=kind, out=tmp_path / "head", seed=0)
    loaded = load_head(tmp_path / "head" / CONFIG_NAME)  # the folder or its head.json
    X_test, _ = _split(store, "test")
    X, y = _split(store, "train")
    fresh = make_head(kind, seed=0).fit(X, y, *_split(store, "validation"))
    assert loaded.kind == kind and loaded.class_names == list(CLASSES)
    assert np.array_equal(loaded.predict_proba(X_test), fresh.predict_proba(X_test))
    assert loaded.head.get_learned_info() == json.loads(json.dumps(fresh.get_learned_info()))


def _rewrite_json(head: Path, change) -> None:
    config = json.loads((head / CONFIG_NAME).read_text())
    change(config)
    (head / CONFIG_NAME).write_text(json.dumps(config))


def _rewrite_weights(head: Path, arrays: dict) -> None:
    """Replace weights.npz and record its hash, as someone editing both files would."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # pickles object arrays: the loader must refuse them
    (head / WEIGHTS_NAME).write_bytes(buffer.getvalue())
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    _rewrite_json(head, lambda c: c["weights"].update(sha256=digest))


def _arrays(head: Path) -> dict:
    with np.load(head / WEIGHTS_NAME) as npz:
        return {name: npz[name] for name in npz.files}


TAMPERING = {
    "edited hidden size": (lambda h: _rewrite_json(h, lambda c: c["params"].update(hidden=[64])), "shape"),
    "edited feature count": (lambda h: _rewrite_json(h, lambda c: c.update(n_features=15)), "shape"),
    "swapped class names": (lambda h: _rewrite_json(h, lambda c: c["class_names"].reverse()), "class names"),
    "unknown kind": (lambda h: _rewrite_json(h, lambda c: c.update(kind="forest")), "unknown head kind"),
    "unknown param": (lambda h: _rewrite_json(h, lambda c: c["params"].update(trees=3)), "invalid params"),
    "weights changed": (lambda h: (h / WEIGHTS_NAME).write_bytes((h / WEIGHTS_NAME).read_bytes()[:-9] + b"123456789"),
                        "sha256"),
    "weights missing": (lambda h: (h / WEIGHTS_NAME).unlink(), "missing"),
    "not JSON": (lambda h: (h / CONFIG_NAME).write_text("{kind: mlp"), "not valid JSON"),
    "wrong array names": (lambda h: _rewrite_weights(h, {("W" if k == "coefs_0" else k): v
                                                         for k, v in _arrays(h).items()}), "arrays"),
    "object array": (lambda h: _rewrite_weights(h, {**_arrays(h), "coefs_0": np.array([{"x": 1}], dtype=object)}),
                     "cannot read"),
    "NaN weights": (lambda h: _rewrite_weights(h, {**_arrays(h), "intercepts_0": np.full(256, np.nan, np.float32)}),
                    "NaN"),
    "complex weights": (lambda h: _rewrite_weights(h, {**_arrays(h), "mean_": np.zeros(16, np.complex64)}),
                        "dtype"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_head_is_refused(trained, case):
    tamper, message = TAMPERING[case]
    tamper(trained)
    with pytest.raises(HeadFileError, match=message):
        load_head(trained)


def test_missing_head_is_a_clear_error(tmp_path):
    with pytest.raises(HeadFileError, match="no head at"):
        load_head(tmp_path)


# ---------------------------------------------------------------- ONNX


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_onnx_head_matches_predict_proba(store, tmp_path, kind):
    fit_heads(store, kind=kind, out=tmp_path / "head", seed=0)
    trained = load_head(tmp_path / "head")
    model = trained.to_onnx(opset=17)
    ops = [node.op_type for node in model.graph.node]
    assert set(ops) <= {"MatMul", "Add", "Relu", "Softmax"} and ops[-1] == "Softmax"
    assert ops.count("MatMul") == (2 if kind == "mlp" else 1)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["class_names"]) == list(CLASSES) and metadata["head_kind"] == kind
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    X = FeatureStore(store).read().features
    (onnx_proba,) = session.run(None, {"features": X})
    assert onnx_proba.shape == (len(X), len(CLASSES))
    assert np.abs(onnx_proba - trained.predict_proba(X)).max() < 1e-5


# ---------------------------------------------------------------- evaluation


def _check_png(path: Path, min_side: int = 300) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side
        assert len(set(image.convert("L").getdata())) > 10  # something was drawn


def test_evaluate_writes_all_report_files(tmp_path):
    # overlapping blobs so that some images are misclassified; images_root does not exist -> placeholders
    store = make_feature_store(tmp_path / "noisy.h5", spread=0.7, seed=1)
    fit_heads(store, kind="softmax", out=tmp_path / "head", seed=0)
    metrics = evaluate(store, tmp_path / "head", split="test", report_dir=tmp_path / "report")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(REPORT_FILES)
    for name in ("confusion_matrix.png", "tsne.png", "misclassified.png"):
        _check_png(tmp_path / "report" / name)
    with open(tmp_path / "report" / "per_class.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == list(CLASSES)
    assert sum(int(r["support"]) for r in rows) == metrics["n"] == 3 * 8
    report = (tmp_path / "report" / "classification_report.txt").read_text(encoding="utf-8")
    assert all(name in report for name in CLASSES)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text(encoding="utf-8"))
    assert saved["accuracy"] == metrics["accuracy"] < 1.0 and saved["same_store_as_training"] is True
    assert saved["misclassified"] and {"path", "true", "predicted", "probability"} <= set(saved["misclassified"][0])


def test_evaluate_shows_images_from_the_store_root(tmp_path):
    root = tmp_path / "images"
    store = make_feature_store(tmp_path / "noisy.h5", spread=0.7, seed=1, images_root=str(root))
    for name in CLASSES:
        for i in range(8):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (200, 20 * i, 10)).save(root / name / f"test_{i}.jpg")
    fit_heads(store, kind="svm", out=tmp_path / "head", seed=0)
    evaluate(store, tmp_path / "head", split="test", report_dir=tmp_path / "report")
    _check_png(tmp_path / "report" / "misclassified.png")
    with Image.open(tmp_path / "report" / "misclassified.png") as image:
        pixels = np.asarray(image.convert("RGB"), dtype=int)
    assert ((pixels[..., 0] > 150) & (pixels[..., 2] < 60)).sum() > 1000  # the red test images are drawn


# ---------------------------------------------------------------- bad input


def test_store_without_the_backbone(store, tmp_path):
    with pytest.raises(StoreError, match="no features for backbone 'resnet50'"):
        fit_heads(store, kind="svm", backbone="resnet50", out=tmp_path / "head")


def test_head_on_a_store_with_other_classes(trained, tmp_path):
    other = make_feature_store(tmp_path / "other.h5", classes=("café", "crème brûlée", "jus"))
    with pytest.raises(HeadMismatch, match="knows classes"):
        evaluate(other, trained, report_dir=tmp_path / "report")


def test_head_on_a_store_with_other_weights_or_backbone(trained, tmp_path):
    other = make_feature_store(tmp_path / "w.h5", weights_seed=1)
    with pytest.raises(HeadMismatch, match="random-init:seed=1"):
        evaluate(other, trained, report_dir=tmp_path / "report")
    other = make_feature_store(tmp_path / "b.h5", backbone="resnet50")
    with pytest.raises(HeadMismatch, match="trained on mobilenet_v2 features"):
        evaluate(other, trained, report_dir=tmp_path / "report")


def test_empty_split_is_refused(tmp_path):
    sizes = {name: {"train": 10, "validation": 4, "test": 0} for name in CLASSES}
    store = make_feature_store(tmp_path / "notest.h5", sizes=sizes)
    rows = fit_heads(store, kind="softmax", out=tmp_path / "head")
    assert rows[0]["test_accuracy"] is None and rows[0]["n_test"] == 0
    with pytest.raises(TrainingDataError, match="no test images"):
        evaluate(store, tmp_path / "head", split="test", report_dir=tmp_path / "report")


def test_a_class_absent_from_test_does_not_lower_macro_f1(tmp_path):
    sizes = {name: {"train": 20, "validation": 6, "test": 0 if name == "thé vert" else 6} for name in CLASSES}
    (row,) = fit_heads(make_feature_store(tmp_path / "s.h5", sizes=sizes), kind="svm", out=tmp_path / "head")
    assert row["test_accuracy"] == row["test_macro_f1"] == 1.0


@pytest.mark.parametrize("sizes, message", [
    ({"café": {"train": 1, "validation": 2, "test": 2}, "thé": {"train": 5, "validation": 2, "test": 2}},
     "class 'café' has 1 training image"),
    ({"café": {"train": 5, "validation": 2, "test": 2}}, "at least 2"),
    ({"café": {"train": 5, "validation": 0, "test": 2}, "thé": {"train": 5, "validation": 0, "test": 2}},
     "no validation images"),
])
def test_untrainable_stores_are_refused(tmp_path, sizes, message):
    store = make_feature_store(tmp_path / "bad.h5", classes=tuple(sizes), sizes=sizes)
    with pytest.raises(TrainingDataError, match=message):
        fit_heads(store, kind="svm", out=tmp_path / "head")
