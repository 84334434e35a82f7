"""Choosing hyper-parameters (and head kinds) by stratified k-fold cross-validation.

A validation split of 250 images cannot rank settings that differ by a point (one image is 0.4
points), so every choice is made on the mean accuracy over k folds of all the labelled rows a head
is given. The folds depend only on the labels, k and the seed: every head fitted on the same rows
with the same seed sees the same folds, so their scores compare like with like.

    >>> folds = stratified_folds(y, n_folds=5, seed=0)
    >>> best = best_index([np.mean(s) for s in scores_by_setting])  # ties: the first (smaller) setting
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Fold = tuple[np.ndarray, np.ndarray]  # (training row indices, held-out row indices)
DEFAULT_FOLDS = 5


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> list[Fold]:
    """Stratified, shuffled folds; fewer than ``n_folds`` when the smallest class has fewer rows."""
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
    if smallest < 2:
        raise ValueError("cross-validation needs at least 2 samples of every class")
    splitter = StratifiedKFold(n_splits=min(n_folds, smallest), shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros((len(y), 1)), y))


def best_index(mean_scores: Sequence[float]) -> int:
    """Index of the highest score; on a tie the first one (grids are listed simplest first)."""
    scores = np.asarray(mean_scores, dtype=float)
    return int(np.flatnonzero(scores == scores.max())[0])


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) row indices: ``fraction`` of each class with 2+ rows held out."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        if len(rows) >= 2:
            held.extend(rows[:max(1, round(fraction * len(rows)))].tolist())
    if not held:
        raise ValueError("early stopping needs at least 2 samples of some class")
    held = np.sort(np.asarray(held))
    return np.setdiff1d(np.arange(len(y)), held), held

