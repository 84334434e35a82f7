"""The head kinds, scikit-learn estimators whose hyper-parameters are chosen by cross-validation.

- ``svm``: linear SVM, C by CV, probabilities from its votes with a temperature fitted out of fold
  (classify.svm);
- ``softmax``: multinomial logistic regression, C by CV, warm-started along the C path;
- ``mlp``: one or two ReLU layers with dropout, early stopping on a held-out tenth (classify.dense);
- ``rbf``: RBF-kernel SVM on standardised features, C and gamma by CV (classify.rbf).

``fit(X, y)`` chooses on stratified k-fold CV over ``(X, y)`` (``classify.selection``: the best mean
accuracy, ties to the first grid value, the grids being listed in ascending order), refits on all
rows and records ``cv_scores_``, the chosen setting's accuracy on each fold. See
``classify.estimator`` for what every head shares.

    >>> head = make_head("softmax", seed=0).fit(X_train, y_train)
    >>> head.predict_proba(X_test).shape, head.C_, head.cv_scores_
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import ClassVar

import numpy as np
from sklearn.utils._param_validation import Interval

from classify.dense import Layers, fold_standardisation, train_dense
from classify.estimator import (DEFAULT_FOLDS, FOLDS_CONSTRAINT, POSITIVE_INT, SEED_CONSTRAINT, STREAM_CONSTRAINT,
                                Head, LinearHead, binary_to_two_columns, check_grid)
from classify.kinds import KIND_CHOICES, KIND_NAMES  # noqa: F401  (KIND_CHOICES re-exported)
from classify.parallel import map_tasks
from classify.rbf import RBFHead
from classify.progress import fold_label
from classify.selection import best_index, holdout_split, stratified_folds
from classify.streamed import search_C, streams
from classify.svm import PairwiseHead, class_scores, fit_temperature, gram, pair_signs, search


class _CGridStreamed:
    """What the svm and softmax heads share: a grid of C values, and a streamed fit above
    ``stream_above_rows`` labelled rows (classify.streamed)."""

    def _check_params(self) -> None:
        self._C_grid()

    def _C_grid(self) -> list[float]:
        """The validated C values (``check_grid``), named after the head in its errors."""
        return check_grid(type(self).__name__, "Cs", self.Cs)

    def _streams(self, n_rows):
        return streams(n_rows, self.stream_above_rows)


class SVMHead(_CGridStreamed, PairwiseHead):
    """Linear SVM (libsvm one-vs-one on the linear Gram matrix); C by CV accuracy (ties: the smaller C).

    The pair decisions are linear in x: ``coef_`` (pairs, features) and ``intercept_`` on
    standardised features, the standardisation folded into them for ONNX (classify.svm). The grid
    starts at 1e-3: 3e-4 was the worst C on TrashNet and fruits features (5-fold CV 0.838 against
    0.871 at the chosen 1e-2; 0.975 against 0.980 at 1e-3), and above 1e-2 TrashNet's CV stays flat.
    """

    kind = "svm"
    _parameter_constraints: ClassVar[dict] = {"Cs": ["array-like"], "cv": FOLDS_CONSTRAINT,
                                              "n_jobs": POSITIVE_INT, "seed": SEED_CONSTRAINT,
                                              "stream_above_rows": STREAM_CONSTRAINT}

    def __init__(self, Cs=(1e-3, 3e-3, 1e-2), cv: int = DEFAULT_FOLDS, n_jobs: int = 1, seed: int = 0,
                 stream_above_rows: int | None = None):
        self.Cs = Cs
        self.cv = cv
        self.n_jobs = n_jobs
        self.seed = seed
        self.stream_above_rows = stream_above_rows

    def _fit_streamed(self, X, y, progress) -> None:
        """A multiclass linear SVM (classify.streamed) whose class scores z_c give the pair machines
        z_i - z_j: their votes rank the classes as the z_c do, so the prediction is the argmax."""
        found = search_C(X, y, len(self.classes_), "pair_squared_hinge", self._C_grid(),
                         self.mean_, self.scale_, self.seed, progress=progress)
        S = pair_signs(len(self.classes_))  # (pairs, classes)
        self.C_, self.cv_scores_ = found.C, [found.scores[found.best]]
        self.cv_accuracy_ = {f"C={C:g}": score for C, score in zip(found.Cs, found.scores)}
        self.coef_, self.intercept_ = (S @ found.W.T).astype(np.float32), (S @ found.b).astype(np.float32)
        held_out = class_scores(found.held_out_decisions @ S.T, len(self.classes_))
        self.temperature_ = fit_temperature(held_out, y[found.held_out_rows])

    def _fit(self, X, y, progress) -> None:
        K = gram(X)
        found = search([K], y, self._C_grid(), stratified_folds(y, self.cv, self.seed),
                       len(self.classes_), self.n_jobs, progress)
        self.C_ = found.settings[found.best][1]
        self.cv_accuracy_ = {f"C={C:g}": float(np.mean(s)) for (_, C), s in zip(found.settings, found.fold_scores)}
        svm = self._finish(found, K, y, progress, f"C={self.C_:g}")
        self.coef_ = (X[svm.support].T @ svm.dual).T.astype(np.float32)  # decisions = x @ coef_.T + intercept_
        self.intercept_ = svm.intercept.astype(np.float32)

    def _decisions(self, X: np.ndarray) -> np.ndarray:
        return X @ self.coef_.T.astype(np.float64) + self.intercept_

    def _layers(self) -> Layers:
        """A dense layer for fine-tune to start from: the summed pair decisions without the votes
        (the same classes on all but close calls)."""
        S = pair_signs(len(self.classes_)) / self.temperature_
        return [((self.coef_.T @ S).astype(np.float32), (self.intercept_ @ S).astype(np.float32))]

    def _front_graph(self):
        from classify.onnx_head import dense_nodes

        return dense_nodes(fold_standardisation(self.mean_, self.scale_, [(self.coef_.T, self.intercept_)]))

    def _shapes(self, n_features, n_classes, learned):
        n_pairs = n_classes * (n_classes - 1) // 2
        return {"coef_": (n_pairs, n_features), "intercept_": (n_pairs,), "temperature_": ()}


class SoftmaxHead(_CGridStreamed, LinearHead):
    """Multinomial logistic regression (lbfgs); C by CV accuracy (ties: the smaller C).

    Each fold walks the C grid upwards from the previous solution (``warm_start``), so the larger,
    slower-to-converge Cs start near their optimum; the final fit on every row starts from the mean
    of the folds' solutions at the chosen C. It fits in float32 to a tolerance of 1e-3: on
    TrashNet features that took a quarter of the time of float64 at 1e-4 for the same CV accuracy
    (within 0.2 points).
    """

    kind = "softmax"
    _parameter_constraints: ClassVar[dict] = {"Cs": ["array-like"], "cv": FOLDS_CONSTRAINT, "max_iter": POSITIVE_INT,
                                              "tol": [Interval(Real, 0, None, closed="neither")],
                                              "seed": SEED_CONSTRAINT, "stream_above_rows": STREAM_CONSTRAINT}
    learned_info = ("C_", "cv_accuracy_", "cv_scores_", "n_iter_")

    def __init__(self, Cs=(0.01, 0.1, 1.0), cv: int = DEFAULT_FOLDS, max_iter: int = 500, tol: float = 1e-3,
                 seed: int = 0, stream_above_rows: int | None = None):
        self.Cs = Cs
        self.cv = cv
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.stream_above_rows = stream_above_rows

    def _fit_streamed(self, X, y, progress) -> None:
        found = search_C(X, y, len(self.classes_), "multinomial", self._C_grid(),
                         self.mean_, self.scale_, self.seed, self.tol, self.max_iter, progress=progress)
        self.C_, self.cv_scores_, self.n_iter_ = found.C, [found.scores[found.best]], found.n_iter
        self.cv_accuracy_ = {f"C={C:g}": score for C, score in zip(found.Cs, found.scores)}
        self.coef_, self.intercept_ = found.W.T.astype(np.float32), found.b.astype(np.float32)

    def _path(self, X: np.ndarray, y: np.ndarray, Cs: list[float], start=None):
        """The models fitted for each C in ``Cs`` (ascending), each warm-started from the last (the
        first from ``start``, a ``(coef, intercept)`` pair, when given)."""
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(max_iter=self.max_iter, tol=self.tol, warm_start=True)
        if start is not None:
            model.coef_, model.intercept_ = start  # what warm_start resumes from
        for C in Cs:
            yield model.set_params(C=C).fit(X, y)

    def _fit(self, X, y, progress) -> None:
        from sklearn.exceptions import ConvergenceWarning

        # one filter around the whole search, not one per fit: the folds' fits run in threads, and
        # catch_warnings entered and left by several threads at once restores the wrong filters
        with warnings.catch_warnings():  # a fit stopped at max_iter is judged by its CV score like any other
            warnings.simplefilter("ignore", ConvergenceWarning)
            self._search(X, y, progress)

    def _search(self, X, y, progress) -> None:
        Cs = self._C_grid()
        X = X.astype(np.float32)
        folds = stratified_folds(y, self.cv, self.seed)
        progress.planned(len(Cs) * len(folds) + 1)

        def fold_path(f: int) -> list[tuple[float, np.ndarray, np.ndarray]]:
            """(held-out accuracy, coef, intercept) at each C of fold ``f``'s path."""
            train, held = folds[f]
            models = []
            for C, m in zip(Cs, self._path(X[train], y[train], Cs)):
                models.append((np.mean(m.predict(X[held]) == y[held]), m.coef_.copy(), m.intercept_.copy()))
                progress.fitted(f"C={C:g} {fold_label(f, len(folds))}")
            return models

        paths = map_tasks(fold_path, range(len(folds)))  # the folds' paths are independent
        scores = np.array([[score for score, *_ in path] for path in paths]).T  # (Cs, folds)
        solutions = [[solution for _, *solution in path] for path in paths]  # (folds, Cs) of (coef, intercept)
        best = best_index(scores.mean(axis=1))
        self.C_ = Cs[best]
        self.cv_accuracy_ = {f"C={C:g}": float(s.mean()) for C, s in zip(Cs, scores)}
        self.cv_scores_ = [float(s) for s in scores[best]]
        # the fit on every row starts from the folds' mean solution at the chosen C, not from zero
        start = tuple(np.mean([fold[best][i] for fold in solutions], axis=0) for i in (0, 1))
        (model,) = self._path(X, y, [self.C_], start)
        progress.fitted(f"C={self.C_:g} all rows")
        self.n_iter_ = int(model.n_iter_.max())
        coef, intercept = model.coef_, model.intercept_
        if len(self.classes_) == 2:
            coef, intercept = binary_to_two_columns(coef, intercept)
        self.coef_, self.intercept_ = coef.astype(np.float32), intercept.astype(np.float32)


def _hidden_ok(hidden) -> bool:
    try:
        return 1 <= len(hidden) <= 2 and all(isinstance(v, Integral) and v > 0 for v in hidden)
    except TypeError:
        return False


class MLPHead(Head):
    """One or two hidden ReLU layers with dropout, then softmax; Adam with early stopping on a
    stratified held-out ``validation_fraction`` of the rows, keeping the best epoch's weights.

    Batches of 128 at a learning rate of 2e-3 with ``patience`` 3: the best epoch comes by the third
    on TrashNet and fruits features, and against batches of 64 at 1e-3 with patience 5 the six
    trainings of ``--kind all`` (five CV folds and the final fit) took half the CPU time for the same
    CV accuracy (TrashNet 0.867 vs 0.870, fruits 0.980 vs 0.979, std 0.01 across folds).
    """

    kind = "mlp"
    _parameter_constraints: ClassVar[dict] = {
        "hidden": ["array-like"],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "l2": [Interval(Real, 0, None, closed="left")],
        "batch_size": POSITIVE_INT, "max_epochs": POSITIVE_INT, "patience": POSITIVE_INT,
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "seed": SEED_CONSTRAINT,
    }
    learned_info = ("best_epoch_", "n_epochs_", "best_val_loss_")

    def __init__(self, hidden=(256,), dropout: float = 0.3, learning_rate: float = 2e-3, l2: float = 1e-4,
                 batch_size: int = 128, max_epochs: int = 300, patience: int = 3,
                 validation_fraction: float = 0.1, seed: int = 0):
        self.hidden = hidden
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.l2 = l2
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.seed = seed

    def _check_params(self) -> None:
        if not _hidden_ok(self.hidden):
            raise ValueError(f"MLPHead: hidden must be one or two positive integers, got {self.hidden!r}")

    def _fit(self, X, y, progress) -> None:
        """One training (its CV folds are other fits: ``cross_val_scores``); epochs are noted as they end."""
        progress.planned(1)
        train, held = holdout_split(y, self.validation_fraction, self.seed)
        fit = train_dense(
            X[train], y[train], X[held], y[held], len(self.classes_), tuple(self.hidden), float(self.dropout),
            float(self.learning_rate), float(self.l2), int(self.batch_size), int(self.max_epochs),
            int(self.patience), int(self.seed), on_epoch=lambda epoch: progress.note(f"epoch {epoch}"),
        )
        progress.fitted(f"{fit.epochs} epochs")
        self.coefs_ = [W for W, _ in fit.layers]
        self.intercepts_ = [b for _, b in fit.layers]
        self.best_epoch_, self.n_epochs_, self.best_val_loss_ = fit.best_epoch, fit.epochs, fit.best_val_loss

    def _layers(self) -> Layers:
        return list(zip(self.coefs_, self.intercepts_))

    def _arrays(self):
        return {**{f"coefs_{i}": W for i, W in enumerate(self.coefs_)},
                **{f"intercepts_{i}": b for i, b in enumerate(self.intercepts_)}}

    def _shapes(self, n_features, n_classes, learned):
        sizes = [n_features, *self.hidden, n_classes]
        return {**{f"coefs_{i}": (a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))},
                **{f"intercepts_{i}": (b,) for i, b in enumerate(sizes[1:])}}

    def _set_arrays(self, arrays):
        layers = len(self.hidden) + 1
        self.coefs_ = [arrays[f"coefs_{i}"] for i in range(layers)]
        self.intercepts_ = [arrays[f"intercepts_{i}"] for i in range(layers)]


_CLASSES = {cls.kind: cls for cls in (SVMHead, SoftmaxHead, MLPHead, RBFHead)}
HEAD_KINDS: dict[str, type[Head]] = {name: _CLASSES[name] for name in KIND_NAMES}  # --kind all's tie-break order


def make_head(kind: str, seed: int = 0) -> Head:
    """A head of ``kind`` with default hyper-parameters."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
    return HEAD_KINDS[kind](seed=seed)
