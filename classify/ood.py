"""How far an image's features are from every class: the "unknown" score exported with each model.

The score is the smallest squared Mahalanobis distance from the features to a class mean, with one
covariance shared by all classes (the within-class scatter of the training features, shrunk with
Ledoit-Wolf so that 1280 dimensions from a few hundred images stay well conditioned). Measured on
this project's data sets (``bench/ood_bench.py``) it separates the other data set's photos from the
training classes far better than the classifier's own confidence (max probability, max logit or
energy), which stays high on images of no class at all.

The threshold is calibrated without looking at the test split: each training and validation image
is scored by a scorer fitted on the other folds (out of fold, so its own features did not shape the
means and covariance), and the threshold is the ``quantile`` of those scores: about
``1 - quantile`` of new in-class images are expected above it.

Example::

    scorer = MahalanobisScorer().fit(features, labels)
    unknown = scorer.score_samples(new_features) > scorer.threshold_
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, _fit_context
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import StratifiedKFold
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

METHOD = "mahalanobis-shared-covariance-ledoit-wolf"


class MahalanobisScorer(BaseEstimator):
    """Out-of-distribution score: min over classes of the squared Mahalanobis distance to the class mean.

    Learned: ``class_means_`` (C, D), ``whitening_`` (D, D) with ``precision = whitening_ @ whitening_.T``,
    ``threshold_`` (calibrated out of fold), ``calibration_`` (how it was calibrated).
    """

    _parameter_constraints = {
        "quantile": [Interval(Real, 0.5, 1, closed="neither")],
        "folds": [Interval(Integral, 2, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, quantile: float = 0.95, folds: int = 5, random_state: int | None = 0):
        self.quantile = quantile
        self.folds = folds
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        labels = np.unique(y)
        self.class_means_, self.whitening_ = _fit_geometry(X, y, labels)
        folds = min(self.folds, int(np.bincount(np.searchsorted(labels, y)).min()))
        out_of_fold = np.empty(len(X))
        if folds >= 2:
            split = StratifiedKFold(folds, shuffle=True, random_state=self.random_state).split(X, y)
            for fit_rows, held_out in split:
                means, whitening = _fit_geometry(X[fit_rows], y[fit_rows], labels)
                out_of_fold[held_out] = _min_distance(X[held_out], means, whitening)
            how = f"{folds}-fold out-of-fold scores of {len(X)} in-class images"
        else:  # a class with one image: no honest held-out score exists, fall back to in-sample
            out_of_fold = _min_distance(X, self.class_means_, self.whitening_)
            how = f"in-sample scores of {len(X)} images (a class has too few images for folds)"
        self.threshold_ = float(np.quantile(out_of_fold, self.quantile))
        self.calibration_ = {
            "method": METHOD, "threshold": self.threshold_, "quantile": self.quantile,
            "calibrated_on": how, "expected_in_class_flagged": round(1 - self.quantile, 6),
        }
        return self

    def score_samples(self, X) -> np.ndarray:
        """Higher means farther from every class."""
        check_is_fitted(self, "threshold_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return _min_distance(X, self.class_means_, self.whitening_)


def _fit_geometry(X: np.ndarray, y: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and a whitening matrix ``W`` (``x @ W`` has identity within-class covariance)."""
    means = np.stack([X[y == label].mean(axis=0) for label in labels])
    residuals = X - means[np.searchsorted(labels, y)]
    covariance = LedoitWolf(assume_centered=True).fit(residuals).covariance_
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    whitening = eigenvectors / np.sqrt(np.maximum(eigenvalues, 1e-12 * eigenvalues.max()))
    return means, whitening


def _min_distance(X: np.ndarray, means: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """``min_k |x W - m_k W|^2``, expanded so memory stays (N, C), not (N, C, D)."""
    z, centres = X @ whitening, means @ whitening
    squared = (z**2).sum(axis=1)[:, None] - 2 * z @ centres.T + (centres**2).sum(axis=1)[None, :]
    return np.maximum(squared, 0).min(axis=1)


def unknown_scorer(features, quantile: float = 0.95) -> MahalanobisScorer:
    """The scorer exported with a head: fitted and calibrated on every non-test row of a ``FeatureSet``."""
    rows = np.asarray(features.splits) != "test"
    return MahalanobisScorer(quantile=quantile).fit(features.features[rows], features.labels[rows])
