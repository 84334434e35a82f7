"""Out-of-fold probabilities when copies leave fewer groups than folds (classify/label_checks.py)."""

from __future__ import annotations

import numpy as np

from classify.label_checks import FOLDS, fold_count, mislabel_suspects, out_of_fold_probabilities


def _clusters(groups_per_class: int, copies: int, seed: int = 0):
    """Two classes, each ``groups_per_class`` groups of ``copies`` near-identical rows."""
    rng = np.random.default_rng(seed)
    centres = np.array([[3.0] * 8, [-3.0] * 8])
    features, labels, groups = [], [], []
    for label, centre in enumerate(centres):
        for g in range(groups_per_class):
            source = centre + rng.normal(size=8)
            features += [source + 0.01 * rng.normal(size=8) for _ in range(copies)]
            labels += [label] * copies
            groups += [label * groups_per_class + g] * copies
    return np.array(features, np.float32), np.array(labels), np.array(groups)


def test_fewer_duplicate_groups_than_folds_still_cross_validates():
    """4 groups of 5 copies: 20 images, 10 per class, but only 4 groups, fewer than 5 folds."""
    features, labels, groups = _clusters(groups_per_class=2, copies=5)
    assert fold_count(labels, groups, 2) == 4 < FOLDS
    probabilities = out_of_fold_probabilities(features, labels, groups, 2)
    assert probabilities.shape == (20, 2) and np.allclose(probabilities.sum(axis=1), 1)
    assert (probabilities.argmax(axis=1) == labels).all()  # the classes are far apart
    assert mislabel_suspects(probabilities, labels) == []


def test_one_group_per_class_predicts_from_the_other_class_only():
    """Two groups: each fold's head saw one class only, so it can only say that class."""
    features, labels, groups = _clusters(groups_per_class=1, copies=4)
    probabilities = out_of_fold_probabilities(features, labels, groups, 2)
    assert (probabilities.argmax(axis=1) != labels).all()


def test_a_single_group_cannot_be_cross_validated():
    features, labels, _ = _clusters(groups_per_class=1, copies=3)
    assert out_of_fold_probabilities(features, labels, np.zeros(len(labels), int), 2) is None


def test_audit_of_copies_only_reports_no_mislabel_check(tmp_path):
    """Every image is the same file: one group, no cross-validation; the report says so."""
    from PIL import Image

    from classify.audit import run_audit
    from test_audit import CLASSES, jpeg_bytes, write_toy_store

    data = jpeg_bytes(Image.new("RGB", (32, 32), (120, 40, 40)), 90)
    rows = []
    for name in CLASSES:
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "images" / name / f"{i}.jpg").write_bytes(data)
            rows.append((f"{name}/{i}.jpg", name, "train"))
    write_toy_store(tmp_path / "images", tmp_path / "f.h5", rows)
    report = run_audit(tmp_path / "f.h5", report_dir=tmp_path / "r", thumbnails=False, progress=False)
    assert report["summary"]["duplicate_groups"] == 1 and report["summary"]["label_conflict_groups"] == 1
    assert report["summary"]["out_of_fold_accuracy"] is None and report["mislabel_suspects"] == []
    assert "too few distinct images" in (tmp_path / "r" / "audit.html").read_text()
