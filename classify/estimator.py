"""The base of every head: a scikit-learn classifier on standardised features that persists as arrays.

``Head`` is a ``ClassifierMixin``/``BaseEstimator``: parameters are taken in ``__init__`` and stored
unchanged (``clone``, ``get_params`` and ``set_params`` work), are validated at ``fit`` from
``_parameter_constraints`` (plus ``_check_params`` for the contents of lists), and learned state
ends in ``_``. ``fit(X, y)`` records ``n_features_in_`` and the classes, standardises the features
on its rows and hands them to the kind's ``_fit``; predicting before ``fit`` raises
``NotFittedError``, and a wrong feature count a ``ValueError`` that names both counts.
"""

from __future__ import annotations

from numbers import Integral
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils._param_validation import Interval
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from classify.dense import Layers, fold_standardisation, logits, softmax
from classify.parallel import map_tasks
from classify.progress import SILENT, FitProgress, Prefixed, fold_label
from classify.selection import DEFAULT_FOLDS, stratified_folds
from classify.streamed import column_moments, row_chunks

if TYPE_CHECKING:
    import onnx

PREDICT_ROWS = 1024  # rows predicted at a time: a few float64 copies of 1024 x dim each
KEPT_DTYPES = (np.float64, np.float32, np.float16)  # float input keeps its dtype; anything else -> float64
FOLDS_CONSTRAINT = [Interval(Integral, 2, None, closed="left")]
SEED_CONSTRAINT = [Interval(Integral, 0, None, closed="left")]
POSITIVE_INT = [Interval(Integral, 1, None, closed="left")]
STREAM_CONSTRAINT = [*POSITIVE_INT, None]  # ``stream_above_rows``: None is classify.streamed.STREAM_ABOVE_ROWS


def _rows(X) -> int | None:
    """Row count of an input not validated yet (None when it has none: validation then says why)."""
    from sklearn.utils.validation import _num_samples

    try:
        return _num_samples(X)
    except TypeError:
        return None


def check_grid(owner: str, name: str, values) -> list[float]:
    """A hyper-parameter grid: a non-empty list of positive finite numbers, returned sorted."""
    try:
        grid = sorted(float(v) for v in values)
    except (TypeError, ValueError):
        grid = []
    if not grid or not all(np.isfinite(v) and v > 0 for v in grid):
        raise ValueError(f"{owner}: {name} must be a non-empty list of positive numbers, got {values!r}")
    return grid


class Head(ClassifierMixin, BaseEstimator):
    """Input checks, standardisation, prediction, ONNX export and the arrays that persist a head."""

    kind: ClassVar[str]
    learned_info: ClassVar[tuple[str, ...]] = ()  # JSON-able learned values saved in head.json
    dense_layers: ClassVar[bool] = True  # network() gives dense layers a fine-tuned classifier can start from

    def fit(self, X, y, progress: FitProgress | None = None) -> "Head":
        """Choose the hyper-parameters by CV and fit on all rows; ``progress`` hears of each fit
        the search makes (classify.progress: a fit parameter, so clone and get_params never see it)."""
        progress = progress or SILENT
        self._validate_params()
        self._check_params()
        streamed = self._streams(_rows(X))
        # streamed: X stays in its float dtype (float16 from a store), checked for NaN chunk by chunk
        X, y = validate_data(self, X, y, dtype=KEPT_DTYPES if streamed else np.float64,
                             ensure_all_finite=not streamed)
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes; got one class: "
                             f"{self.classes_[0]!r}")
        if streamed:
            self._set_standardisation(*column_moments(X))
            self._fit_streamed(X, y_index, progress)
        else:
            self._set_standardisation(X.mean(axis=0), X.std(axis=0))
            self._fit(self._standardise(X), y_index, progress)
        return self

    def _set_standardisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean_ = mean.astype(np.float32)
        self.scale_ = np.where(std > 1e-12, std, 1.0).astype(np.float32)  # constant features: keep as is

    def _check_params(self) -> None:
        """Checks the constraints cannot express (the contents of lists)."""

    def _streams(self, n_rows: int | None) -> bool:
        """Whether ``fit`` on ``n_rows`` rows streams them (classify.streamed) instead of copying them."""
        return False

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, np.float64) - self.mean_) / self.scale_

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities, ``PREDICT_ROWS`` rows at a time (the rows stay in their float dtype meanwhile)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=KEPT_DTYPES)
        out = np.empty((len(X), len(self.classes_)))
        for part in row_chunks(len(X), PREDICT_ROWS):
            out[part] = softmax(self._logits(np.asarray(X[part], np.float64)))
        return out

    def predict(self, X) -> np.ndarray:
        best = np.argmax(self.predict_proba(X), axis=1)
        return self.classes_[best]

    def to_onnx(self, opset: int = 17, metadata: dict[str, str] | None = None) -> "onnx.ModelProto":
        """features float32 [N, D] -> probabilities float32 [N, C] (columns in ``classes_`` order)."""
        from classify.onnx_head import dense_softmax_graph

        check_is_fitted(self)
        return dense_softmax_graph(self.network(), opset, name=f"{self.kind}_head", metadata=metadata)

    def network(self) -> Layers:
        """Dense layers on raw features (standardisation folded in); softmax follows the last one."""
        return fold_standardisation(self.mean_, self.scale_, self._layers())

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return logits(self.network(), X)

    # ---- persistence: what is saved, and the shapes a saved head must have

    def learned_arrays(self) -> dict[str, np.ndarray]:
        return {"mean_": self.mean_, "scale_": self.scale_, "classes_": self.classes_, **self._arrays()}

    def array_shapes(self, n_features: int, n_classes: int, learned: dict) -> dict[str, tuple[int, ...]]:
        """The arrays a saved head must hold (``learned``: its saved ``learned_info``)."""
        self._validate_params()
        self._check_params()
        return {"mean_": (n_features,), "scale_": (n_features,), "classes_": (n_classes,),
                **self._shapes(n_features, n_classes, learned)}

    def set_learned(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        """Restore a fitted head from arrays already checked against ``array_shapes``."""
        self.mean_, self.scale_, self.classes_ = arrays["mean_"], arrays["scale_"], arrays["classes_"]
        self.n_features_in_ = len(self.mean_)
        self._set_arrays(arrays)
        for name in self.learned_info:
            setattr(self, name, info[name])

    def get_learned_info(self) -> dict:
        return {name: getattr(self, name) for name in self.learned_info}

    # ---- what each kind provides

    def _fit(self, X: np.ndarray, y: np.ndarray, progress: FitProgress) -> None:
        raise NotImplementedError

    def _fit_streamed(self, X: np.ndarray, y: np.ndarray, progress: FitProgress) -> None:
        """Fit on raw rows ``X`` (mean_ and scale_ already set), for kinds whose ``_streams`` can say yes."""
        raise NotImplementedError

    def _layers(self) -> Layers:
        raise NotImplementedError

    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _shapes(self, n_features: int, n_classes: int, learned: dict) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


class LinearHead(Head):
    """One dense layer + softmax: ``coef_`` (classes, features) and ``intercept_`` on standardised features."""

    def _layers(self) -> Layers:
        return [(self.coef_.T, self.intercept_)]

    def _arrays(self):
        return {"coef_": self.coef_, "intercept_": self.intercept_}

    def _shapes(self, n_features, n_classes, learned):
        return {"coef_": (n_classes, n_features), "intercept_": (n_classes,)}

    def _set_arrays(self, arrays):
        self.coef_, self.intercept_ = arrays["coef_"], arrays["intercept_"]


def binary_to_two_columns(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A binary model's single logit f (for class 1) as two columns (-f/2, f/2): softmax = sigmoid(f)."""
    return np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])


def fit_and_cross_validate(head: Head, X, y, n_folds: int = DEFAULT_FOLDS, seed: int = 0,
                           progress: FitProgress | None = None) -> tuple[Head, list[float]]:
    """``head`` fitted on every row, and the accuracy of a fresh clone of it on each stratified fold
    of ``(X, y)`` (the folds the tuned heads search on, given the same labels, count and seed). The
    fits are independent, so they run as tasks (classify.parallel), the one on every row first (the
    longest); each clone's fits are reported to ``progress`` under its fold's name."""
    X, y = np.asarray(X), np.asarray(y)
    folds = stratified_folds(y, n_folds, seed)
    progress = progress or SILENT

    def run(fold: int | None) -> Head | float:
        if fold is None:
            return head.fit(X, y, progress=progress)
        train, held = folds[fold]
        fitted = clone(head).fit(X[train], y[train], progress=Prefixed(progress, fold_label(fold, len(folds))))
        return float(np.mean(fitted.predict(X[held]) == y[held]))

    fitted, *accuracies = map_tasks(run, [None, *range(len(folds))])
    return fitted, accuracies
