"""Likely mislabels, outliers and the leak's effect on accuracy, from the stored features.

- Mislabels: out-of-fold class probabilities of a logistic regression (standardised features,
  ``C=MISLABEL_C``), 5-fold, stratified, with near-duplicate groups kept in one fold (a copy in
  another fold would vouch for its twin's label). An image is a suspect when its own class gets
  less probability than another class; suspects are ranked by the probability of their label.
- Outliers: cosine (centred features) to the nearest class mean; an image is an outlier when that
  is more than ``OUTLIER_MADS`` median absolute deviations below the median over all images.
- Leak effect: the same logistic regression fitted on train, scored on all test images and on the
  test images that have no copy in train.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from extract.neighbours import normalise

MISLABEL_C = 0.1
FOLDS = 5
OUTLIER_MADS = 4.0


def linear_head(seed: int = 0):
    return make_pipeline(StandardScaler(), LogisticRegression(C=MISLABEL_C, max_iter=500, random_state=seed))


def fold_count(labels: np.ndarray, groups: np.ndarray, n_classes: int) -> int:
    """``FOLDS``, or fewer when the smallest class or the number of groups (images, duplicate groups
    counting once) is smaller; under 2 there is nothing to cross-validate."""
    smallest = int(np.bincount(labels, minlength=n_classes)[np.unique(labels)].min())
    return min(FOLDS, max(2, smallest), len(np.unique(groups)))


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_classes: int,
                              seed: int = 0, progress=None) -> np.ndarray | None:
    """(n, n_classes) probabilities, each row from a head that never saw that image (or its copies);
    None when the images form fewer than 2 groups. Each fold's head starts from the previous fold's
    weights (the same optimum, about 40 % fewer iterations)."""
    folds = fold_count(labels, groups, n_classes)
    if folds < 2:
        return None
    probabilities = np.zeros((len(labels), n_classes))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    head = None
    with threadpool_limits(limits=1, user_api="blas"):  # small fits: BLAS threads only spin on 2 cores
        for train, held_out in splitter.split(features, labels, groups):
            seen = np.unique(labels[train])
            if len(seen) < 2:  # a fold that saw one class can only say that class
                probabilities[held_out, seen[0]] = 1.0
            else:
                if head is None or not np.array_equal(head.classes_, seen):  # warm start needs the same classes
                    head = linear_head(seed).set_params(logisticregression__warm_start=True)
                head.fit(features[train], labels[train])
                probabilities[np.ix_(held_out, head.classes_)] = head.predict_proba(features[held_out])
            if progress:
                progress(1)
    return probabilities


def mislabel_suspects(probabilities: np.ndarray, labels: np.ndarray) -> list[tuple[int, int, float, float]]:
    """``(row, suggested class, p(label), p(suggested))`` where another class beats the label, most doubtful first."""
    own = probabilities[np.arange(len(labels)), labels]
    suggested = probabilities.argmax(axis=1)
    rows = np.flatnonzero(suggested != labels)
    rows = rows[np.argsort(own[rows], kind="stable")]
    return [(int(r), int(suggested[r]), float(own[r]), float(probabilities[r, suggested[r]])) for r in rows]


def nearest_class_similarity(features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Cosine of each image to the nearest class mean (centred, unit-length features)."""
    unit = normalise(features)
    means = np.stack([unit[labels == c].mean(axis=0) if (labels == c).any() else np.zeros(unit.shape[1])
                      for c in range(n_classes)])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return (unit @ means.T).max(axis=1)


def outliers(similarity: np.ndarray) -> tuple[np.ndarray, float]:
    """Rows far from every class (least similar first) and the similarity cut that defines them."""
    median = float(np.median(similarity))
    mad = float(np.median(np.abs(similarity - median))) or 1e-6
    cut = median - OUTLIER_MADS * 1.4826 * mad
    rows = np.flatnonzero(similarity < cut)
    return rows[np.argsort(similarity[rows], kind="stable")], cut


def leak_effect(features: np.ndarray, labels: np.ndarray, splits: np.ndarray, leaked: np.ndarray,
                seed: int = 0) -> dict | None:
    """Test accuracy with and without the test images that have a copy in train (None without a test split)."""
    train, test = splits == "train", np.flatnonzero(splits == "test")
    if not test.size or len(np.unique(labels[train])) < 2:
        return None
    with threadpool_limits(limits=1, user_api="blas"):
        head = linear_head(seed).fit(features[train], labels[train])
        correct = head.predict(features[test]) == labels[test]
    clean = ~np.isin(test, leaked)
    return {
        "head": f"logistic regression (C={MISLABEL_C}) on standardised features, fitted on train",
        "test_images": int(test.size), "leaked_test_images": int((~clean).sum()),
        "accuracy_all": float(correct.mean()),
        "accuracy_without_leaked": float(correct[clean].mean()) if clean.any() else None,
        "accuracy_leaked_only": float(correct[~clean].mean()) if (~clean).any() else None,
    }


def leak_effect_sentence(effect: dict) -> str:
    """One line for people: the test accuracy with and without the leaked test images."""
    without = effect["accuracy_without_leaked"]
    return (f"test accuracy {effect['accuracy_all']:.3f} on all {effect['test_images']} test images, "
            + (f"{without:.3f} without the {effect['leaked_test_images']} that have a copy in train"
               if without is not None else "and none is without a copy in train"))
