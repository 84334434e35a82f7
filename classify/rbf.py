"""The RBF-kernel SVM head: the most accurate head on frozen features, at a known edge cost.

On standardised features, ``K(x, s) = exp(-gamma * |x - s|^2)`` with gamma a multiple of
``1 / n_features`` (the ``gammas`` grid; 1.0 is scikit-learn's ``"scale"`` on standardised data).
C and gamma are chosen by stratified k-fold CV on one Gram matrix per gamma (classify.svm), the
libsvm one-vs-one machines and their calibration then reduce to

    probabilities = softmax(K(x, support_vectors_) @ coef_ + intercept_)

which ``predict_proba`` computes in numpy and ``to_onnx`` writes as plain ONNX operators (the
kernel through one MatMul, no custom op). Its size and cost grow with the support vectors: about
``n_support_vectors_ x n_features`` floats, and as many multiply-adds per image (on TrashNet with
EfficientNet-Lite0 features: about 1,800 x 1,280, 9 MB and 2.4 MFLOP, against the backbone's 400).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from classify.estimator import DEFAULT_FOLDS, FOLDS_CONSTRAINT, POSITIVE_INT, SEED_CONSTRAINT, Head, check_grid
from classify.selection import stratified_folds
from classify.svm import fit_calibration, fit_pair_svm, search, squared_distances

if TYPE_CHECKING:
    import onnx

MAX_ROWS = 20_000  # the search holds one float64 Gram matrix per gamma: 20,000 rows is 3.2 GB each


def rbf_kernel(X: np.ndarray, support: np.ndarray, gamma: float) -> np.ndarray:
    return np.exp(-gamma * squared_distances(X, support))


class RBFHead(Head):
    """RBF-kernel SVM (libsvm one-vs-one) on standardised features; C and gamma by CV accuracy
    (ties: the smaller gamma, then the smaller C); probabilities calibrated like the linear SVM's."""

    kind = "rbf"
    _parameter_constraints: ClassVar[dict] = {"Cs": ["array-like"], "gammas": ["array-like"], "cv": FOLDS_CONSTRAINT,
                                              "n_jobs": POSITIVE_INT, "seed": SEED_CONSTRAINT}
    learned_info = ("C_", "gamma_", "n_support_vectors_", "cv_accuracy_", "cv_scores_")

    def __init__(self, Cs=(3.0, 10.0), gammas=(0.5, 1.0), cv: int = DEFAULT_FOLDS, n_jobs: int = 1, seed: int = 0):
        self.Cs = Cs
        self.gammas = gammas
        self.cv = cv
        self.n_jobs = n_jobs
        self.seed = seed

    def _check_params(self) -> None:
        check_grid(type(self).__name__, "Cs", self.Cs)
        check_grid(type(self).__name__, "gammas", self.gammas)

    def _fit(self, X, y) -> None:
        if len(X) > MAX_ROWS:
            raise ValueError(f"RBFHead: {len(X)} rows; the kernel search keeps {len(X)}^2 floats per gamma, "
                             f"so it stops at {MAX_ROWS} rows: use a linear head")
        n_classes = len(self.classes_)
        gammas = [g / X.shape[1] for g in check_grid("RBFHead", "gammas", self.gammas)]
        d2 = squared_distances(X, X)
        kernels = [np.exp(-gamma * d2) for gamma in gammas]
        del d2
        found = search(kernels, y, check_grid("RBFHead", "Cs", self.Cs), stratified_folds(y, self.cv, self.seed),
                       n_classes, self.n_jobs)
        k, self.C_ = found.settings[found.best]
        self.gamma_ = gammas[k]
        self.cv_accuracy_ = {f"gamma={gammas[i]:.4g},C={C:g}": float(np.mean(s))
                             for (i, C), s in zip(found.settings, found.fold_scores)}
        self.cv_scores_ = found.calibrated_scores
        svm = fit_pair_svm(kernels[k], y, self.C_, n_classes)
        W, b = fit_calibration(found.out_of_fold, y, n_classes)
        self.support_vectors_ = X[svm.support].astype(np.float32)
        self.n_support_vectors_ = len(svm.support)
        self.coef_ = (svm.dual @ W).astype(np.float32)
        self.intercept_ = (svm.intercept @ W + b).astype(np.float32)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        kernel = rbf_kernel(self._standardise(X), self.support_vectors_, self.gamma_)
        return kernel @ self.coef_.astype(np.float64) + self.intercept_

    def to_onnx(self, opset: int = 17, metadata: dict[str, str] | None = None) -> "onnx.ModelProto":
        from sklearn.utils.validation import check_is_fitted

        from classify.onnx_head import rbf_softmax_graph

        check_is_fitted(self)
        return rbf_softmax_graph(self.mean_, self.scale_, self.support_vectors_, self.gamma_,
                                 (self.coef_, self.intercept_), opset, name="rbf_head", metadata=metadata)

    def _arrays(self):
        return {"support_vectors_": self.support_vectors_, "coef_": self.coef_, "intercept_": self.intercept_}

    def _shapes(self, n_features, n_classes, learned):
        n_support = learned.get("n_support_vectors_")
        if not isinstance(n_support, int) or n_support < 1:
            raise ValueError(f"n_support_vectors_ must be a positive integer, got {n_support!r}")
        return {"support_vectors_": (n_support, n_features), "coef_": (n_support, n_classes),
                "intercept_": (n_classes,)}

    def _set_arrays(self, arrays):
        self.support_vectors_, self.coef_, self.intercept_ = (arrays["support_vectors_"], arrays["coef_"],
                                                              arrays["intercept_"])
