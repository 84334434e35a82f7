"""Heads: scikit-learn conformance, choices by cross-validation, calibration, persistence, ONNX, reports."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import CLASSES, make_feature_store
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import SVC
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.estimator_checks import parametrize_with_checks

from classify.data import fingerprint
from classify.dense import cross_entropy, forward, train_dense
from classify.errors import HeadFileError, HeadMismatch, TrainingDataError
from classify.heads import HEAD_KINDS, MLPHead, RBFHead, SoftmaxHead, SVMHead, make_head
from classify.persist import CONFIG_NAME, WEIGHTS_NAME, load_head
from classify.report import REPORT_FILES, evaluate
from classify.svm import class_scores, fit_pair_svm
from classify.train import choose, fit_heads
from extract.errors import StoreError
from extract.store import FeatureStore


@pytest.fixture
def store(tmp_path) -> Path:
    return make_feature_store(tmp_path / "features.h5")


@pytest.fixture(scope="module")
def _mlp_head(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlp-head")
    fit_heads(make_feature_store(root / "features.h5"), kind="mlp", out=root / "head", seed=0)
    return root / "head"


@pytest.fixture
def trained(_mlp_head, tmp_path) -> Path:
    """A saved mlp head (the kind with the most arrays), a copy of its own to tamper with."""
    return Path(shutil.copytree(_mlp_head, tmp_path / "head"))


def _split(store: Path, split: str):
    return FeatureStore(store).read().subset(split)


def _labelled(store: Path):
    """The rows heads are fitted on: train and validation."""
    features = FeatureStore(store).read()
    keep = features.splits != "test"
    return features.features[keep], features.labels[keep]


def _blobs(n_per_class: int, spread: float, seed: int, dim: int = 8, classes: int = 3, draw: int = 0):
    """Gaussian blobs (overlapping when ``spread`` is small) and their labels; ``draw`` gives new
    rows around the same centres."""
    centres = np.random.default_rng(seed).normal(0, spread, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + np.random.default_rng([seed, draw]).normal(0, 1, (len(y), dim)), y


# ---------------------------------------------------------------- scikit-learn conformance

# Small grids and folds keep scikit-learn's ~50 checks per head fast; the code paths are the defaults'.
# No check is skipped by this suite: scikit-learn itself skips check_array_api_input (SCIPY_ARRAY_API
# unset) and check_classifier_data_not_an_array (pandas not installed), and says so in the report.
@parametrize_with_checks([SVMHead(Cs=(0.1, 1.0), cv=2), SoftmaxHead(Cs=(0.1, 1.0), cv=2),
                          MLPHead(hidden=(16,), max_epochs=30), RBFHead(Cs=(1.0,), gammas=(1.0,), cv=2)])
def test_heads_pass_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_clone_set_params_and_the_errors_users_meet(store):
    X, y = _labelled(store)
    head = MLPHead(hidden=(32, 16), dropout=0.1, seed=3)
    copy = clone(head).set_params(dropout=0.2)
    assert copy.get_params() == {**head.get_params(), "dropout": 0.2} and head.dropout == 0.1
    with pytest.raises(NotFittedError):
        head.predict(X)
    with pytest.raises(InvalidParameterError, match="max_epochs"):
        MLPHead(max_epochs=2.5).fit(X, y)
    with pytest.raises(ValueError, match="hidden"):
        MLPHead(hidden=(0,)).fit(X, y)
    with pytest.raises(ValueError, match="Cs"):
        SVMHead(Cs=()).fit(X, y)
    with pytest.raises(ValueError, match="gammas"):
        RBFHead(gammas=(-1.0,)).fit(X, y)
    head.fit(X, y)
    assert head.n_features_in_ == 16 and [W.shape for W in head.coefs_] == [(16, 32), (32, 16), (16, 3)]
    with pytest.raises(ValueError, match="X has 15 features, but MLPHead is expecting 16 features"):
        head.predict(X[:, :15])


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_every_kind_learns_separable_features(store, tmp_path, kind):
    (row,) = fit_heads(store, kind=kind, out=tmp_path / kind, seed=0)
    assert row["kind"] == kind and row["saved"]
    assert row["test_accuracy"] > 0.9 and row["cv_accuracy"] > 0.9 and row["cv_folds"] == 5
    assert row["n_train"] == 3 * 24 and row["n_val"] == 3 * 8 and row["n_test"] == 3 * 8


# ---------------------------------------------------------------- choices by cross-validation


def test_C_is_the_argmax_of_the_cv_accuracy():
    """The search's scores match scikit-learn's own CV of the same SVM, and C_ is their argmax."""
    X, y = _blobs(40, spread=1.0, seed=4)
    Cs = (1e-4, 1e-2, 1.0)
    head = SVMHead(Cs=Cs, seed=5).fit(X, y)
    standardised = (X - X.mean(axis=0)) / X.std(axis=0)
    folds = StratifiedKFold(5, shuffle=True, random_state=5)
    expected = [cross_val_score(SVC(kernel="linear", C=C, break_ties=True), standardised, y, cv=folds).mean()
                for C in Cs]
    assert list(head.cv_accuracy_.values()) == pytest.approx(expected)
    assert len(set(np.round(expected, 6))) == 3  # the Cs differ: the worst and the best are not the same
    assert head.C_ == Cs[int(np.argmax(expected))]


@pytest.mark.parametrize("kind", ["svm", "softmax", "rbf"])
def test_ties_go_to_the_smaller_C(kind):
    X, y = _blobs(20, spread=20.0, seed=1)  # separable: every C scores 1.0 on every fold
    head = make_head(kind).fit(X, y)
    assert set(head.cv_scores_) == {1.0} and head.C_ == min(head.Cs)


def test_kind_all_ties_go_to_the_first_kind_listed(store, tmp_path):
    assert choose([0.9, 0.95, 0.95, 0.95]) == 1
    rows = fit_heads(store, kind="all", out=tmp_path / "head", seed=0)
    assert [r["kind"] for r in rows] == list(HEAD_KINDS)
    assert {r["cv_accuracy"] for r in rows} == {1.0}  # separable blobs: every kind is perfect
    assert [r["saved"] for r in rows] == [True] + [False] * (len(rows) - 1)


def _written_order(sizes: dict) -> tuple[np.ndarray, np.ndarray]:
    """Labels and splits of make_feature_store's rows, in the order it writes them."""
    rows = [(index, split) for index, counts in enumerate(sizes.values()) for split, n in counts.items()
            for _ in range(n)]
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def test_kind_all_keeps_the_kind_with_the_best_cv_accuracy(tmp_path):
    """Two classes on concentric spheres: no linear head separates them, the RBF head does."""
    sizes = {"inner": {"train": 40, "validation": 10, "test": 20}, "outer": {"train": 40, "validation": 10, "test": 20}}
    labels, _ = _written_order(sizes)
    directions = np.random.default_rng(0).normal(size=(len(labels), 6))
    spheres = directions / np.linalg.norm(directions, axis=1, keepdims=True) * np.where(labels == 0, 1.0, 3.0)[:, None]
    store = make_feature_store(tmp_path / "spheres.h5", classes=tuple(sizes), sizes=sizes, dim=6, features=spheres)
    rows = {r["kind"]: r for r in fit_heads(store, kind="all", out=tmp_path / "head", seed=0)}
    assert rows["rbf"]["cv_accuracy"] > 0.95 > 0.8 > max(rows["svm"]["cv_accuracy"], rows["softmax"]["cv_accuracy"])
    saved = next(kind for kind, row in rows.items() if row["saved"])
    assert rows[saved]["cv_accuracy"] == max(row["cv_accuracy"] for row in rows.values())


def test_the_test_split_never_changes_the_choice(tmp_path):
    """Two stores that differ only in their test rows give the same heads, scores and choice."""
    a = make_feature_store(tmp_path / "a.h5", spread=0.8, seed=2)
    _, splits = _written_order({name: {"train": 24, "validation": 8, "test": 8} for name in CLASSES})
    features = FeatureStore(a).read()
    assert sorted(features.splits.tolist()) == sorted(splits.tolist())
    written = np.array([features.features[features.paths.index(p)] for p in _paths_in_written_order()])
    written[splits == "test"] = np.random.default_rng(9).normal(0, 5, written[splits == "test"].shape)
    b = make_feature_store(tmp_path / "b.h5", spread=0.8, seed=2, features=written)
    rows_a = fit_heads(a, kind="all", out=tmp_path / "head-a", seed=0)
    rows_b = fit_heads(b, kind="all", out=tmp_path / "head-b", seed=0)
    keep = ("kind", "cv_accuracy", "cv_std", "params", "learned", "saved")
    assert [{k: r[k] for k in keep} for r in rows_a] == [{k: r[k] for k in keep} for r in rows_b]
    assert [r["test_accuracy"] for r in rows_a] != [r["test_accuracy"] for r in rows_b]
    assert (tmp_path / "head-a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "head-b" / WEIGHTS_NAME).read_bytes()


def _paths_in_written_order() -> list[str]:
    return [f"{name}/{split}_{i}.jpg" for name in CLASSES for split, n in (("train", 24), ("validation", 8), ("test", 8))
            for i in range(n)]


def test_a_store_without_validation_split_trains(tmp_path):
    sizes = {name: {"train": 20, "validation": 0, "test": 6} for name in CLASSES}
    rows = fit_heads(make_feature_store(tmp_path / "s.h5", sizes=sizes), kind="all", out=tmp_path / "head")
    assert all(r["n_val"] == 0 and r["cv_folds"] == 5 and r["test_accuracy"] > 0.9 for r in rows)


def test_mlp_keeps_the_weights_of_its_best_epoch():
    X, y = _blobs(30, spread=0.6, seed=3, dim=20)  # noisy and small: the network overfits early
    X_val, y_val = _blobs(30, spread=0.6, seed=3, dim=20, draw=1)
    fit = train_dense(X, y, X_val, y_val, 3, (64,), 0.0, 1e-2, 0.0, 16, 200, 5, 0)
    assert fit.best_epoch < fit.epochs
    assert cross_entropy(forward(fit.layers, X_val.astype(np.float32)), y_val) == pytest.approx(fit.best_val_loss,
                                                                                                 rel=1e-5)


def test_the_fitted_temperature_lowers_the_held_out_log_loss():
    """The SVM's vote scores are in votes, not log-odds: the temperature fitted on out-of-fold
    decisions must give better probabilities on rows the head never saw than no temperature."""
    X, y = _blobs(60, spread=1.5, seed=6)
    X_new, y_new = _blobs(60, spread=1.5, seed=6, draw=1)
    for head in (SVMHead().fit(X, y), RBFHead().fit(X, y)):
        fitted = cross_entropy(head.predict_proba(X_new), y_new)
        head.temperature_ = 1.0
        assert fitted < cross_entropy(head.predict_proba(X_new), y_new) - 0.05


def test_svm_scores_reproduce_scikit_learn():
    """The pair-decision matrices and vote scores equal libsvm's (scikit-learn's "ovr" shape)."""
    X, y = _blobs(25, spread=2.0, seed=8)
    K = X @ X.T
    svm = fit_pair_svm(K, y, 0.1, 3)
    reference = SVC(kernel="precomputed", C=0.1, decision_function_shape="ovo").fit(K, y)
    decisions = svm.decisions(K[:, svm.support])
    assert np.allclose(decisions, reference.decision_function(K))
    ovr = reference.set_params(decision_function_shape="ovr").decision_function(K)
    assert np.allclose(class_scores(decisions, 3) + 1.0, ovr)  # votes counted from 0 instead of -(3-1)/2


def test_same_seed_same_head_and_numbers(store, tmp_path):
    first = fit_heads(store, kind="all", out=tmp_path / "a", seed=7)
    second = fit_heads(store, kind="all", out=tmp_path / "b", seed=7)
    strip = [{k: v for k, v in row.items() if k not in ("fit_seconds", "head")} for row in first]
    assert strip == [{k: v for k, v in row.items() if k not in ("fit_seconds", "head")} for row in second]
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()
    X, y = _labelled(store)
    other = make_head("mlp", seed=2).fit(X, y)
    assert not np.array_equal(other.coefs_[0], make_head("mlp", seed=1).fit(X, y).coefs_[0])


def test_all_saves_a_head_with_its_record(store, tmp_path):
    rows = fit_heads(store, kind="all", out=tmp_path / "head", seed=0)
    saved = next(r for r in rows if r["saved"])
    config = json.loads((tmp_path / "head" / CONFIG_NAME).read_text())
    assert config["kind"] == saved["kind"] and config["metrics"]["cv_accuracy"] == saved["cv_accuracy"]
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
    fresh = make_head(kind, seed=0).fit(*_labelled(store))
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
    "edited support vector count": (lambda h: _rewrite_json(h, lambda c: c["learned"].update(n_support_vectors_=2)),
                                    "shape"),
    "complex weights": (lambda h: _rewrite_weights(h, {**_arrays(h), "mean_": np.zeros(16, np.complex64)}),
                        "dtype"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_head_is_refused(store, tmp_path, trained, case):
    tamper, message = TAMPERING[case]
    if "support vector" in case:
        fit_heads(store, kind="rbf", out=trained, seed=0)
    tamper(trained)
    with pytest.raises(HeadFileError, match=message):
        load_head(trained)


def test_missing_head_is_a_clear_error(tmp_path):
    with pytest.raises(HeadFileError, match="no head at"):
        load_head(tmp_path)


# ---------------------------------------------------------------- ONNX

VOTES = ["Sign", "MatMul", "MatMul", "Abs", "Add", "Mul", "Div", "Add", "Mul", "Softmax"]
ONNX_OPS = {"svm": ["MatMul", "Add", *VOTES], "softmax": ["MatMul", "Add", "Softmax"],
            "mlp": ["MatMul", "Add", "Relu", "MatMul", "Add", "Softmax"],
            "rbf": ["Sub", "Div", "Mul", "ReduceSum", "Mul", "MatMul", "Add", "Add", "Min", "Exp", "MatMul", "Add",
                    *VOTES]}


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_onnx_head_matches_predict_proba(tmp_path, kind):
    store = make_feature_store(tmp_path / "noisy.h5", spread=0.8, seed=1)  # overlapping: probabilities not 0/1
    fit_heads(store, kind=kind, out=tmp_path / "head", seed=0)
    trained = load_head(tmp_path / "head")
    model = trained.to_onnx(opset=17)
    assert [node.op_type for node in model.graph.node] == ONNX_OPS[kind]
    assert all(node.domain == "" for node in model.graph.node)  # standard operators only, no custom op
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["class_names"]) == list(CLASSES) and metadata["head_kind"] == kind
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    X = FeatureStore(store).read().features
    (onnx_proba,) = session.run(None, {"features": X})
    expected = trained.predict_proba(X)
    assert onnx_proba.shape == (len(X), len(CLASSES)) and 0.05 < expected.max(axis=1).min()
    assert np.abs(onnx_proba - expected).max() < 1e-5


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
    ({"café": {"train": 1, "validation": 0, "test": 2}, "thé": {"train": 5, "validation": 2, "test": 2}},
     "class 'café' has 1 training image"),
    ({"café": {"train": 5, "validation": 2, "test": 2}}, "at least 2"),
    ({"café": {"train": 0, "validation": 1, "test": 9}, "thé": {"train": 5, "validation": 0, "test": 2}},
     "class 'café' has 1 training image"),
])
def test_untrainable_stores_are_refused(tmp_path, sizes, message):
    store = make_feature_store(tmp_path / "bad.h5", classes=tuple(sizes), sizes=sizes)
    with pytest.raises(TrainingDataError, match=message):
        fit_heads(store, kind="svm", out=tmp_path / "head")
