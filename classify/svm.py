"""SVMs on a precomputed kernel, tuned by cross-validation, calibrated, and reduced to matrices.

libsvm (one-vs-one) on a precomputed Gram matrix: the kernel over all rows is computed once per
gamma with one BLAS product, and each fold's fit only slices it, so a C grid over 5 folds costs a
few hundred milliseconds on 2,000 rows (liblinear's LinearSVC took 2-9 s per fit on the same
features). Probabilities come from a multinomial logistic layer on the pair decisions, fitted on
the out-of-fold decisions of the chosen setting (a multiclass Platt scaling): decisions on the
training rows themselves sit at the margins and would make it over-confident.

Everything after the kernel is linear: ``logits = kernel(x, support) @ coef + intercept``, which is
what the head's ``predict_proba`` and its ONNX graph compute.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from classify.estimator import binary_to_two_columns
from classify.selection import Fold, best_index

CALIBRATION_C = 1.0  # the logistic layer has (pairs + 1) x classes weights: light regularisation suffices


def pairs(n_classes: int) -> list[tuple[int, int]]:
    """libsvm's one-vs-one order: (0, 1), (0, 2), ..., (1, 2), ..."""
    return [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]


def squared_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    d2 = (A * A).sum(axis=1)[:, None] + (B * B).sum(axis=1)[None, :] - 2.0 * (A @ B.T)
    return np.maximum(d2, 0.0, out=d2)


def votes(decisions: np.ndarray, n_classes: int) -> np.ndarray:
    """libsvm's prediction from pair decisions (positive: the pair's first class); ties: lowest index."""
    counts = np.zeros((len(decisions), n_classes))
    rows = np.arange(len(decisions))
    for p, (i, j) in enumerate(pairs(n_classes)):
        counts[rows, np.where(decisions[:, p] > 0, i, j)] += 1
    return counts.argmax(axis=1)


@dataclass
class PairSVM:
    """A fitted one-vs-one SVM as matrices: ``decisions = K(x, rows[support]) @ dual + intercept``."""

    support: np.ndarray  # (n_support,) indices into the training rows
    dual: np.ndarray  # (n_support, n_pairs)
    intercept: np.ndarray  # (n_pairs,)

    def decisions(self, kernel_to_support: np.ndarray) -> np.ndarray:
        return kernel_to_support @ self.dual + self.intercept


def fit_pair_svm(K: np.ndarray, y: np.ndarray, C: float, n_classes: int) -> PairSVM:
    """libsvm on the square Gram matrix ``K`` of the training rows (labels 0..n_classes-1, all present)."""
    from sklearn.svm import SVC

    svc = SVC(C=C, kernel="precomputed").fit(K, y)
    bounds = np.concatenate([[0], np.cumsum(svc.n_support_)])  # support vectors come grouped by class
    dual = np.zeros((len(svc.support_), len(pairs(n_classes))))
    if n_classes == 2:  # scikit-learn flips the binary decision to favour class 1: flip it back
        dual[:, 0], intercept = -svc.dual_coef_[0], -svc.intercept_
    else:
        for p, (i, j) in enumerate(pairs(n_classes)):
            dual[bounds[i]:bounds[i + 1], p] = svc.dual_coef_[j - 1, bounds[i]:bounds[i + 1]]
            dual[bounds[j]:bounds[j + 1], p] = svc.dual_coef_[i, bounds[j]:bounds[j + 1]]
        intercept = svc.intercept_
    return PairSVM(support=svc.support_, dual=dual, intercept=np.asarray(intercept, np.float64))


def fit_calibration(decisions: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of ``softmax(decisions @ W + b)``, a multinomial logistic regression on the decisions."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=CALIBRATION_C, max_iter=1000).fit(decisions, y)
    coef, intercept = model.coef_, model.intercept_
    if n_classes == 2:
        coef, intercept = binary_to_two_columns(coef, intercept)
    return coef.T, intercept


@dataclass
class Search:
    """Cross-validated SVM grid: fold accuracies per (kernel, C), and the chosen point's calibration."""

    settings: list[tuple[int, float]]  # (kernel index, C), in grid order
    fold_scores: list[list[float]]  # libsvm's vote accuracy per fold, per setting
    best: int
    calibrated_scores: list[float]  # per fold: SVM + calibration fitted on the other folds' decisions
    out_of_fold: np.ndarray  # (n, n_pairs) decisions of the chosen setting


def _fold_decisions(K: np.ndarray, y: np.ndarray, C: float, fold: Fold, n_classes: int) -> np.ndarray:
    train, held = fold
    svm = fit_pair_svm(K[np.ix_(train, train)], y[train], C, n_classes)
    return svm.decisions(K[np.ix_(held, train[svm.support])])


def search(kernels: list[np.ndarray], y: np.ndarray, Cs: list[float], folds: list[Fold], n_classes: int,
           n_jobs: int = 1) -> Search:
    """Every (kernel, C) on every fold; the best mean vote accuracy wins (ties: the earlier setting)."""
    settings = [(k, float(C)) for k in range(len(kernels)) for C in sorted(Cs)]
    oof = {s: np.zeros((len(y), len(pairs(n_classes)))) for s in settings}

    def run(task: tuple[tuple[int, float], Fold]) -> None:
        (k, C), fold = task
        oof[(k, C)][fold[1]] = _fold_decisions(kernels[k], y, C, fold, n_classes)

    tasks = [(s, fold) for s in settings for fold in folds]
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:  # libsvm releases the GIL
        list(pool.map(run, tasks))
    fold_scores = [[float(np.mean(votes(oof[s][held], n_classes) == y[held])) for _, held in folds]
                   for s in settings]
    best = best_index([np.mean(scores) for scores in fold_scores])
    chosen = oof[settings[best]]
    calibrated = []
    for train, held in folds:
        W, b = fit_calibration(chosen[train], y[train], n_classes)
        calibrated.append(float(np.mean((chosen[held] @ W + b).argmax(axis=1) == y[held])))
    return Search(settings, fold_scores, best, calibrated, chosen)
