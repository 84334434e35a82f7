"""The RBF-kernel SVM head: the most accurate head on frozen features, at a known edge cost.

On standardised features, ``K(x, s) = exp(-gamma * |x - s|^2)`` with gamma a multiple of
``1 / n_features`` (the ``gammas`` grid; 1.0 is scikit-learn's ``"scale"`` on standardised data).
C and gamma are chosen by stratified k-fold CV on one Gram matrix per gamma (classify.svm); the
libsvm one-vs-one machines then reduce to

    decisions = K(x, support_vectors_) @ coef_ + intercept_      # one per pair of classes

followed by the vote scoring of classify.svm, which ``predict_proba`` computes in numpy and
``to_onnx`` writes as plain ONNX operators (the kernel through one MatMul, no custom op). Its size
and cost grow with the support vectors: ``n_support_vectors_ x n_features`` floats, and as many
multiply-adds per image (on TrashNet with EfficientNet-Lite0 features 1,640 x 1,280: an 8.5 MB
weights file and 2.1 M multiply-adds per image, about 1 ms in onnxruntime against the backbone's
7 core-ms; see docs/bench/accuracy.md).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from classify.estimator import DEFAULT_FOLDS, FOLDS_CONSTRAINT, POSITIVE_INT, SEED_CONSTRAINT, check_grid
from classify.selection import stratified_folds
from classify.svm import PairwiseHead, gram, search, squared_distances

MAX_ROWS = 20_000  # the search holds one float64 Gram matrix per gamma: 20,000 rows is 3.2 GB each


def rbf_kernel(X: np.ndarray, support: np.ndarray, gamma: float) -> np.ndarray:
    return np.exp(-gamma * squared_distances(X, support))


class RBFHead(PairwiseHead):
    """RBF-kernel SVM (libsvm one-vs-one) on standardised features; C and gamma by CV accuracy
    (ties: the smaller gamma, then the smaller C); probabilities like the linear SVM's."""

    kind = "rbf"
    dense_layers = False  # a kernel machine: network() refuses
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

    def _fit(self, X, y, progress) -> None:
        if len(X) > MAX_ROWS:
            raise ValueError(f"RBFHead: {len(X)} rows; the kernel search keeps {len(X)}^2 floats per gamma, "
                             f"so it stops at {MAX_ROWS} rows: use a linear head")
        gammas = [g / X.shape[1] for g in check_grid("RBFHead", "gammas", self.gammas)]
        d2 = squared_distances(X, X, gram(X))  # the svm head's Gram matrix, under fit-head --kind all
        kernels = [np.multiply(d2, -gamma) for gamma in gammas]
        for K in kernels:
            np.exp(K, out=K)  # in place: one n x n array per gamma
        del d2
        names = [f"gamma={gamma:.4g}" for gamma in gammas]
        found = search(kernels, y, check_grid("RBFHead", "Cs", self.Cs), stratified_folds(y, self.cv, self.seed),
                       len(self.classes_), self.n_jobs, progress, names)
        k, self.C_ = found.settings[found.best]
        self.gamma_ = gammas[k]
        self.cv_accuracy_ = {f"gamma={gammas[i]:.4g},C={C:g}": float(np.mean(s))
                             for (i, C), s in zip(found.settings, found.fold_scores)}
        svm = self._finish(found, kernels[k], y, progress, f"{names[k]} C={self.C_:g}")
        self.support_vectors_ = X[svm.support].astype(np.float32)
        self.n_support_vectors_ = len(svm.support)
        self.coef_, self.intercept_ = svm.dual.astype(np.float32), svm.intercept.astype(np.float32)

    def _decisions(self, X: np.ndarray) -> np.ndarray:
        return rbf_kernel(X, self.support_vectors_, self.gamma_) @ self.coef_.astype(np.float64) + self.intercept_

    def network(self):
        from classify.errors import HeadMismatch

        raise HeadMismatch("an rbf head is a kernel machine, not dense layers a fine-tuned model can start "
                           "from: fit a softmax or mlp head for fine-tuning (fit-head --kind softmax)")

    def _front_graph(self):
        from classify.onnx_head import dense_nodes, rbf_kernel_nodes

        kernel_nodes, kernel_initializers, kernel = rbf_kernel_nodes(self.mean_, self.scale_, self.support_vectors_,
                                                                     self.gamma_)
        nodes, initializers, decisions = dense_nodes([(self.coef_, self.intercept_)], kernel, prefix="pairs_")
        return kernel_nodes + nodes, kernel_initializers + initializers, decisions

    def _arrays(self):
        return {**super()._arrays(), "support_vectors_": self.support_vectors_}

    def _shapes(self, n_features, n_classes, learned):
        n_support = learned.get("n_support_vectors_")
        if not isinstance(n_support, int) or n_support < 1:
            raise ValueError(f"n_support_vectors_ must be a positive integer, got {n_support!r}")
        n_pairs = n_classes * (n_classes - 1) // 2
        return {"support_vectors_": (n_support, n_features), "coef_": (n_support, n_pairs),
                "intercept_": (n_pairs,), "temperature_": ()}

    def _set_arrays(self, arrays):
        super()._set_arrays(arrays)
        self.support_vectors_ = arrays["support_vectors_"]
