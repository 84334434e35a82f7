"""Fit heads on a feature store, choose by cross-validation, and keep the best one.

    >>> rows = fit_heads("features.h5", kind="all", backbone=None, out="head/", seed=0)
    >>> [(r["kind"], r["cv_accuracy"], r["cv_std"], r["test_accuracy"], r["saved"]) for r in rows]

Every head is fitted on the train and validation rows together (a store may have no validation
split) and chooses its hyper-parameters by stratified k-fold CV on them; ``--kind all`` keeps the
kind with the best mean CV accuracy (ties: the first in ``HEAD_KINDS``). The same seed gives the
same folds to every kind. The test split is read only after the choice is made, to report it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from classify.data import check_trainable
from classify.estimator import DEFAULT_FOLDS, Head, fit_and_cross_validate
from classify.fingerprints import training_store
from classify.heads import HEAD_KINDS, KIND_CHOICES, make_head
from classify.joined import joined_name, read_features
from classify.parallel import run_side_by_side
from classify.persist import TrainedHead, save_head
from classify.progress import FitProgress, KindBar
from classify.scoring import scores
from classify.selection import best_index
from classify.svm import sharing_grams
from extract.engine import default_threads
from extract.splits import split_counts
from extract.store import FeatureSet

SLOWEST_FIRST = ("mlp", "rbf", "svm", "softmax")


def _fit_one(kind: str, X: np.ndarray, y: np.ndarray, folds: int, seed: int,
             progress: FitProgress) -> tuple[Head, list[float], float]:
    """The fitted head, its accuracy on each CV fold (at its chosen setting), and the seconds it
    took; ``progress`` hears of every fit (the search's, and the CV folds of heads without one)."""
    started = time.perf_counter()
    head = make_head(kind, seed)
    if "cv" in head.get_params():  # a search: its CV scores are the chosen setting's
        head.set_params(cv=folds).fit(X, y, progress=progress)
        cv = head.cv_scores_
    else:  # none (the mlp): its CV folds are fits of their own
        head, cv = fit_and_cross_validate(head, X, y, folds, seed, progress)
    return head, [float(s) for s in cv], time.perf_counter() - started


def choose(cv_means: list[float]) -> int:
    """Index of the kind to keep: the best mean CV accuracy, ties to the first listed."""
    return best_index(cv_means)


def fit_candidates(kinds: list[str], X: np.ndarray, y: np.ndarray, folds: int, seed: int,
                   progress: bool = False) -> list[tuple[Head, list[float], float]]:
    """Fit each kind on ``(X, y)``: side by side on a thread per core, each fit with BLAS on one
    thread, and a thread with no kind left to start taking the others' CV fits (classify.parallel);
    the svm and rbf heads share their Gram matrix. Results come back in ``kinds`` order and are those
    of fitting the kinds one after another. ``progress``: one bar per kind on stderr, a tick per fit
    of its search (``C=0.01 fold 2/5``), one line per kind when done. On Ctrl-C no more fits start."""
    bars = {kind: KindBar(kind, position, enabled=progress) for position, kind in enumerate(kinds)}
    order = _slowest_first(kinds)
    try:
        with threadpool_limits(limits=1, user_api="blas"), sharing_grams():
            fitted = run_side_by_side(lambda kind: _fit_one(kind, X, y, folds, seed, bars[kind]), order,
                                      default_threads())
        return [fitted[order.index(kind)] for kind in kinds]
    finally:
        for bar in bars.values():
            bar.close()


def _slowest_first(kinds: list[str]) -> list[str]:
    """The order the kinds start in: the longest fits first, so that the last one to start is a
    short one whose fits both threads share (on TrashNet: mlp, rbf, svm, softmax)."""
    return sorted(kinds, key=lambda kind: SLOWEST_FIRST.index(kind) if kind in SLOWEST_FIRST else len(SLOWEST_FIRST))


def labelled_rows(features: FeatureSet) -> slice | np.ndarray:
    """The train and validation rows: a slice (a view, no copy) in the canonical order, where the
    test rows come last."""
    rows = np.flatnonzero(features.splits != "test")
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def _row(kind: str, head: Head, cv: list[float], seconds: float, features: FeatureSet, seed: int) -> dict:
    counts = split_counts(features.splits)
    X_test, y_test = features.subset("test")
    test = scores(y_test, head.predict(X_test)) if len(y_test) else {}
    return {
        "kind": kind,
        "cv_accuracy": float(np.mean(cv)), "cv_std": float(np.std(cv)), "cv_folds": len(cv),
        "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
        "fit_seconds": round(seconds, 3),
        "n_train": counts["train"], "n_val": counts["validation"], "n_test": counts["test"],
        "backbone": joined_name(features.records), "seed": seed,
        "params": head.get_params(), "learned": head.get_learned_info(),
    }


def fit_heads(store: str | Path, kind: str = "all", backbone: str | None = None, out: str | Path = "head",
              seed: int = 0, folds: int = DEFAULT_FOLDS, progress: bool = False) -> list[dict]:
    """Fit ``kind`` (or every kind for ``"all"``), save the best to ``out``; one metrics dict per head.

    ``progress``: a bar per kind on stderr, a tick per fit of its hyper-parameter search."""
    if kind not in KIND_CHOICES:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(KIND_CHOICES)}")
    features = read_features(store, backbone, dtype=None)  # as stored: heads convert what they need
    check_trainable(features, store)
    labelled = labelled_rows(features)
    kinds = list(HEAD_KINDS) if kind == "all" else [kind]
    fitted = fit_candidates(kinds, features.features[labelled], features.labels[labelled], folds, seed, progress)
    best = choose([float(np.mean(cv)) for _, cv, _ in fitted])  # chosen before the test split is looked at
    rows = [_row(name, *fit, features, seed) for name, fit in zip(kinds, fitted)]
    saved = save_head(TrainedHead(
        head=fitted[best][0], class_names=features.class_names, backbone=features.backbone, joined=features.joined,
        store=training_store(store, features),
        metrics=rows[best],
    ), out)
    return [{**row, "saved": i == best, "head": str(saved) if i == best else None} for i, row in enumerate(rows)]
