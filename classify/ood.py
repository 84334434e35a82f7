"""How far an image's features are from every class: the "unknown" score exported with each model.

The score is the smallest squared Mahalanobis distance from the features to a class mean, with one
covariance shared by all classes: the within-class scatter of the training features, shrunk with
Ledoit-Wolf so that thousands of dimensions from a few hundred images stay well conditioned. Measured
on this project's data sets (``bench/ood_bench.py``) it separates the other data set's photos from the
training classes far better than the classifier's own confidence (max probability, max logit or
energy), which stays high on images of no class at all.

The covariance is kept in a reduced form, so that its cost does not grow with the cube of the feature
width D: its ``components`` largest principal directions (a D x k basis, k <= 1024, with their own
variances) and one variance for everything orthogonal to them (the mean of the remaining eigenvalues).
The score is then the Mahalanobis distance inside the k directions plus the squared norm of the
residual outside them divided by that variance (the probabilistic-PCA form of the covariance). When
the residuals span at most k directions (fewer images than ``components``) this equals the full
Ledoit-Wolf Mahalanobis distance. k = 1024 keeps the quality of the full D x D form on
EfficientNet-Lite0 features (D = 1280, docs/bench/ood.md); k = 512 measured a little worse on TrashNet
(lower AUROC, fewer unknown images flagged). The fit never forms a D x D matrix when D exceeds the number of
images: it works on their n x n Gram matrix, and finds the top directions by subspace iteration when
that matrix is more than twice as large as k plus a margin (exact eigenvectors otherwise). The exported graph carries the D x k basis, not a D x D
matrix (``classify/ood_graph.py``).

The fit runs its BLAS on one thread: the last bits of a multi-threaded product depend on the thread
count, and the exported matrices are part of the model's id (a digest of the graph), so the same store
and head must give the same bits whatever the machine's thread settings.

The threshold is calibrated without looking at the test split: each training and validation image
is scored by a scorer fitted on the other folds (out of fold, so its own features did not shape the
means and covariance), and the threshold is the ``quantile`` of those scores: about
``1 - quantile`` of new in-class images are expected above it.

Example::

    scorer = MahalanobisScorer().fit(features, labels)
    unknown = scorer.score_samples(new_features) > scorer.threshold_
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import scipy.linalg
from sklearn.base import BaseEstimator, _fit_context
from sklearn.model_selection import StratifiedKFold
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

METHOD = "mahalanobis-shared-covariance-ledoit-wolf-top-k-plus-residual"
OVERSAMPLE = 64  # extra directions the subspace iteration carries, so that the k it keeps converge
ITERATIONS = 6  # subspace iterations: CNN features' spectra fall fast, the kept directions settle in a few


@dataclass(frozen=True)
class Geometry:
    """What the score needs: ``mean`` (D,), ``basis`` (D, k) orthonormal, ``scales`` (k,) = 1/sqrt of the
    shrunk variance along each basis direction, ``residual_scale`` = 1/sqrt of the shrunk variance left
    outside them (0 when the basis spans every dimension), and ``class_means`` (C, D)."""

    mean: np.ndarray
    basis: np.ndarray
    scales: np.ndarray
    residual_scale: float
    class_means: np.ndarray

    def score(self, X: np.ndarray) -> np.ndarray:
        """``min_c`` of the squared distance to class mean ``c``; memory (N, C, D) in blocks of rows."""
        return np.concatenate([self._score_block(X[start:start + 256]) for start in range(0, len(X), 256)])

    def _score_block(self, X: np.ndarray) -> np.ndarray:
        inside, outside = self.parts(X - self.mean)
        means_inside, means_outside = self.parts(self.class_means - self.mean)
        distances = (((inside[:, None, :] - means_inside[None]) ** 2).sum(axis=2)
                     + ((outside[:, None, :] - means_outside[None]) ** 2).sum(axis=2))
        return distances.min(axis=1)

    def whitening(self) -> np.ndarray:
        """The D x D matrix ``W`` with ``|centred @ W|^2`` = the distance ``parts`` computes (symmetric)."""
        width = len(self.mean)
        return (self.basis * (self.scales - self.residual_scale)) @ self.basis.T + self.residual_scale * np.eye(width)

    def parts(self, centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whitened coordinates in the basis, and the scaled residual orthogonal to it."""
        projected = centred @ self.basis
        return projected * self.scales, (centred - projected @ self.basis.T) * self.residual_scale


class MahalanobisScorer(BaseEstimator):
    """Out-of-distribution score: min over classes of the squared Mahalanobis distance to the class mean.

    Learned: ``geometry_`` (a ``Geometry``: mean, D x k basis, scales, residual scale, class means),
    ``class_means_`` (C, D), ``threshold_`` (calibrated out of fold), ``calibration_`` (how it was calibrated).
    """

    _parameter_constraints = {
        "quantile": [Interval(Real, 0.5, 1, closed="neither")],
        "folds": [Interval(Integral, 2, None, closed="left")],
        "components": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, quantile: float = 0.95, folds: int = 5, components: int = 1024, random_state: int | None = 0):
        self.quantile = quantile
        self.folds = folds
        self.components = components
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        labels = np.unique(y)
        seed = 0 if self.random_state is None else self.random_state
        with threadpool_limits(limits=1, user_api="blas"):  # the same bits whatever the thread settings
            self.geometry_ = fit_geometry(X, y, labels, self.components, seed)
            folds = min(self.folds, int(np.bincount(np.searchsorted(labels, y)).min()))
            if folds >= 2:
                out_of_fold = np.empty(len(X))
                split = StratifiedKFold(folds, shuffle=True, random_state=self.random_state).split(X, y)
                for fit_rows, held_out in split:
                    fold = fit_geometry(X[fit_rows], y[fit_rows], labels, self.components, seed)
                    out_of_fold[held_out] = fold.score(X[held_out])
                how = f"{folds}-fold out-of-fold scores of {len(X)} in-class images"
            else:  # a class with one image: no honest held-out score exists, fall back to in-sample
                out_of_fold = self.geometry_.score(X)
                how = f"in-sample scores of {len(X)} images (a class has too few images for folds)"
        self.class_means_ = self.geometry_.class_means
        self.threshold_ = float(np.quantile(out_of_fold, self.quantile))
        self.calibration_ = {
            "method": METHOD, "threshold": self.threshold_, "quantile": self.quantile,
            "calibrated_on": how, "expected_in_class_flagged": round(1 - self.quantile, 6),
            "directions": int(self.geometry_.basis.shape[1]), "features": int(X.shape[1]),
        }
        return self

    def score_samples(self, X) -> np.ndarray:
        """Higher means farther from every class."""
        check_is_fitted(self, "threshold_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self.geometry_.score(X)


def fit_geometry(X: np.ndarray, y: np.ndarray, labels: np.ndarray, components: int, seed: int) -> Geometry:
    """Class means and the reduced Ledoit-Wolf covariance of the within-class residuals of ``X``."""
    class_means = np.stack([X[y == label].mean(axis=0) for label in labels])
    residuals = X - class_means[np.searchsorted(labels, y)]
    n, width = residuals.shape
    gram = n <= width  # the smaller of the n x n Gram matrix and the D x D scatter: same nonzero spectrum
    moments = (residuals @ residuals.T if gram else residuals.T @ residuals) / n
    shrinkage, average = ledoit_wolf_shrinkage(moments, (residuals**2).sum(axis=1), n, width)
    variances, vectors = top_eigenpairs(moments, min(components, width), seed)
    if gram:  # eigenvectors of the Gram matrix -> the feature directions they stand for
        vectors = residuals.T @ vectors / np.sqrt(n * variances)
    left = max(np.trace(moments) - variances.sum(), 0.0) / (width - len(variances)) if width > len(variances) else 0.0
    floor = 1e-12 * max(variances.max(initial=0.0), average, 1e-300)
    shrunk = np.maximum((1 - shrinkage) * variances + shrinkage * average, floor)
    residual = max((1 - shrinkage) * left + shrinkage * average, floor) if width > len(variances) else np.inf
    return Geometry(X.mean(axis=0), vectors, 1 / np.sqrt(shrunk), float(1 / np.sqrt(residual)), class_means)


def top_eigenpairs(moments: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (at most) ``k`` largest eigenvalues of the symmetric PSD ``moments`` that are not zero, and
    their eigenvectors: exact for a small matrix, by subspace iteration with Rayleigh-Ritz otherwise."""
    size = len(moments)
    if size <= 2 * (k + OVERSAMPLE):
        values, vectors = scipy.linalg.eigh(moments)
    else:
        basis = np.random.default_rng(seed).standard_normal((size, k + OVERSAMPLE))
        for _ in range(ITERATIONS):
            basis, _ = np.linalg.qr(moments @ basis)
        values, rotation = scipy.linalg.eigh(basis.T @ moments @ basis)
        vectors = basis @ rotation
    order = np.argsort(values)[::-1][:k]
    values, vectors = values[order], vectors[:, order]
    kept = values > 1e-9 * max(values[0], 0.0) if len(values) else values > 0
    return values[kept], vectors[:, kept]


def ledoit_wolf_shrinkage(moments: np.ndarray, squared_norms: np.ndarray, n: int, width: int) -> tuple[float, float]:
    """Ledoit-Wolf's shrinkage and target variance (the mean eigenvalue), as scikit-learn's
    ``ledoit_wolf_shrinkage(assume_centered=True)`` computes them, from the Gram matrix or scatter
    ``moments`` (both have the covariance's nonzero eigenvalues, so the same trace and Frobenius norm)
    and each row's squared norm, instead of D x D products of the features."""
    average = np.trace(moments) / width
    frobenius = float((moments**2).sum())
    beta = ((squared_norms**2).sum() / n - frobenius) / (width * n)
    delta = (frobenius - average**2 * width) / width
    beta = min(beta, delta)
    return (0.0 if beta == 0 else float(beta / delta)), float(average)


def unknown_scorer(features, quantile: float = 0.95) -> MahalanobisScorer:
    """The scorer exported with a head: fitted and calibrated on every non-test row of a ``FeatureSet``."""
    rows = np.asarray(features.splits) != "test"
    return MahalanobisScorer(quantile=quantile).fit(features.features[rows], features.labels[rows])
