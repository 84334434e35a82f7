"""Classifier heads on frozen features, shaped like scikit-learn estimators.

Parameters are taken in ``__init__`` and stored unchanged; ``fit(X, y, X_val, y_val)`` standardises
the features on the training rows, learns, and returns ``self``; learned state ends in ``_``.
Every head reduces to dense layers + softmax (``network()``), which is what ``predict_proba``
computes and what ``to_onnx`` writes, so the Python and ONNX outputs are the same math.

    >>> head = make_head("mlp", seed=0).fit(X_train, y_train, X_val, y_val)
    >>> head.predict_proba(X_test).shape
    (n_test, n_classes)
"""

from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from classify.dense import Layers, cross_entropy, fold_standardisation, forward, softmax, train_dense

if TYPE_CHECKING:
    import onnx

Constraint = tuple[str, Callable[[Any], bool]]  # (what is expected, check)


def _positive_ints(value) -> bool:
    return all(isinstance(v, (int, np.integer)) and v > 0 for v in value)


class Head:
    """Base class: standardisation, prediction, ONNX export and the arrays that persist a head."""

    kind: ClassVar[str]
    constraints: ClassVar[dict[str, Constraint]] = {}
    learned_info: ClassVar[tuple[str, ...]] = ()  # JSON-able learned scalars, informational only

    @classmethod
    def param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in self.param_names()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def _validate_params(self) -> None:
        for name, (expected, check) in self.constraints.items():
            value = getattr(self, name)
            try:
                ok = check(value)
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"{type(self).__name__}: {name} must be {expected}, got {value!r}")

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> "Head":
        self._validate_params()
        X, X_val = np.asarray(X, np.float32), np.asarray(X_val, np.float32)
        if X.ndim != 2 or X_val.ndim != 2 or X.shape[1] != X_val.shape[1]:
            raise ValueError("X and X_val must be 2-D arrays with the same number of columns")
        if len(X) != len(y) or len(X_val) != len(y_val) or not len(X_val):
            raise ValueError("X/y and X_val/y_val must have matching lengths, and X_val at least one row")
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("need at least two classes in y")
        if not np.isin(y_val, self.classes_).all():
            raise ValueError("y_val holds labels that y does not")
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
        self.mean_ = mean.astype(np.float32)
        self.scale_ = np.where(std > 1e-12, std, 1.0).astype(np.float32)  # constant features: keep as is
        self._fit(self._standardise(X), np.searchsorted(self.classes_, y),
                  self._standardise(X_val), np.searchsorted(self.classes_, y_val))
        return self

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) / self.scale_

    def network(self) -> Layers:
        """Dense layers on raw features (standardisation folded in); softmax follows the last one."""
        return fold_standardisation(self.mean_, self.scale_, self._layers())

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return forward(self.network(), np.asarray(X, np.float32))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def to_onnx(self, opset: int = 17, metadata: dict[str, str] | None = None) -> "onnx.ModelProto":
        """features float32 [N, D] -> probabilities float32 [N, C] (columns in ``classes_`` order)."""
        from classify.onnx_head import dense_softmax_graph

        return dense_softmax_graph(self.network(), opset, name=f"{self.kind}_head", metadata=metadata)

    # ---- persistence: what is saved, and the shapes a saved head must have

    def learned_arrays(self) -> dict[str, np.ndarray]:
        return {"mean_": self.mean_, "scale_": self.scale_, "classes_": self.classes_, **self._arrays()}

    def array_shapes(self, n_features: int, n_classes: int) -> dict[str, tuple[int, ...]]:
        self._validate_params()
        return {"mean_": (n_features,), "scale_": (n_features,), "classes_": (n_classes,),
                **self._shapes(n_features, n_classes)}

    def set_learned(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        """Restore a fitted head from arrays already checked against ``array_shapes``."""
        self.mean_, self.scale_, self.classes_ = arrays["mean_"], arrays["scale_"], arrays["classes_"]
        self._set_arrays(arrays)
        for name in self.learned_info:
            setattr(self, name, info[name])

    def get_learned_info(self) -> dict:
        return {name: getattr(self, name) for name in self.learned_info}

    # ---- what each kind provides

    def _fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> None:
        raise NotImplementedError

    def _layers(self) -> Layers:
        raise NotImplementedError

    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _shapes(self, n_features: int, n_classes: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


def _fit_temperature(decisions: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the validation log-loss of softmax(decisions / T), T in [0.1, 100]."""
    from scipy.optimize import minimize_scalar

    def loss(log_t: float) -> float:
        return cross_entropy(softmax(decisions / np.exp(log_t)), y)

    result = minimize_scalar(loss, bounds=(np.log(0.1), np.log(100.0)), method="bounded")
    return float(np.exp(result.x))


class SVMHead(Head):
    """Linear SVM (liblinear, one-vs-rest); C picked on validation accuracy (ties: the smaller C).

    Probabilities are a softmax over the decision values divided by a temperature fitted on the
    validation split, so the head stays one MatMul + Add + Softmax. The dual solver is used always:
    on overlapping classes at C=1 the primal one (what ``dual="auto"`` picks when rows outnumber
    features) ran 100 s to max_iter where the dual took 9 s. A fit that stops at ``max_iter`` is
    judged by its validation accuracy like any other, so the warning is silenced.
    """

    kind = "svm"
    constraints = {
        "Cs": ("a non-empty list of positive numbers", lambda v: len(v) > 0 and all(c > 0 for c in v)),
        "max_iter": ("a positive integer", lambda v: v > 0),
    }
    learned_info = ("C_", "val_accuracy_by_C_")

    def __init__(self, Cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0), max_iter: int = 1000, seed: int = 0):
        self.Cs = Cs
        self.max_iter = max_iter
        self.seed = seed

    def _fit(self, X, y, X_val, y_val) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        best, self.val_accuracy_by_C_ = None, {}
        for C in sorted(float(c) for c in self.Cs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = LinearSVC(C=C, dual=True, max_iter=self.max_iter, random_state=self.seed).fit(X, y)
            accuracy = float(np.mean(model.predict(X_val) == y_val))
            self.val_accuracy_by_C_[str(C)] = accuracy
            if best is None or accuracy > best[0]:
                best = (accuracy, C, model)
        _, self.C_, model = best
        coef, intercept = model.coef_, model.intercept_
        if len(self.classes_) == 2:  # one decision value f -> columns (-f/2, f/2): softmax = sigmoid(f)
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        self.coef_, self.intercept_ = coef.astype(np.float32), intercept.astype(np.float32)
        self.temperature_ = _fit_temperature(X_val @ coef.T + intercept, y_val)

    def _layers(self) -> Layers:
        return [(self.coef_.T / np.float32(self.temperature_), self.intercept_ / np.float32(self.temperature_))]

    def _arrays(self):
        return {"coef_": self.coef_, "intercept_": self.intercept_,
                "temperature_": np.asarray(self.temperature_, np.float64)}

    def _shapes(self, n_features, n_classes):
        return {"coef_": (n_classes, n_features), "intercept_": (n_classes,), "temperature_": ()}

    def _set_arrays(self, arrays):
        self.coef_, self.intercept_ = arrays["coef_"], arrays["intercept_"]
        self.temperature_ = float(arrays["temperature_"])


class DenseHead(Head):
    """Dense layers trained with Adam, early stopping on the validation loss (see classify.dense)."""

    hidden: tuple[int, ...]
    dropout: float
    constraints = {
        "learning_rate": ("a positive number", lambda v: v > 0),
        "l2": ("a number >= 0", lambda v: v >= 0),
        "batch_size": ("a positive integer", lambda v: v >= 1),
        "max_epochs": ("a positive integer", lambda v: v >= 1),
        "patience": ("a positive integer", lambda v: v >= 1),
    }
    learned_info = ("best_epoch_", "n_epochs_", "best_val_loss_")

    def _fit(self, X, y, X_val, y_val) -> None:
        fit = train_dense(
            X, y, X_val, y_val, len(self.classes_), tuple(self.hidden), float(self.dropout),
            float(self.learning_rate), float(self.l2), int(self.batch_size), int(self.max_epochs),
            int(self.patience), int(self.seed),
        )
        self.coefs_ = [W for W, _ in fit.layers]
        self.intercepts_ = [b for _, b in fit.layers]
        self.best_epoch_, self.n_epochs_, self.best_val_loss_ = fit.best_epoch, fit.epochs, fit.best_val_loss

    def _layers(self) -> Layers:
        return list(zip(self.coefs_, self.intercepts_))

    def _arrays(self):
        return {**{f"coefs_{i}": W for i, W in enumerate(self.coefs_)},
                **{f"intercepts_{i}": b for i, b in enumerate(self.intercepts_)}}

    def _shapes(self, n_features, n_classes):
        sizes = [n_features, *self.hidden, n_classes]
        return {**{f"coefs_{i}": (a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))},
                **{f"intercepts_{i}": (b,) for i, b in enumerate(sizes[1:])}}

    def _set_arrays(self, arrays):
        layers = len(self.hidden) + 1
        self.coefs_ = [arrays[f"coefs_{i}"] for i in range(layers)]
        self.intercepts_ = [arrays[f"intercepts_{i}"] for i in range(layers)]


class SoftmaxHead(DenseHead):
    """Softmax perceptron: one dense layer on the standardised features."""

    kind = "softmax"
    hidden = ()
    dropout = 0.0

    def __init__(self, learning_rate: float = 3e-3, l2: float = 1e-3, batch_size: int = 64,
                 max_epochs: int = 300, patience: int = 10, seed: int = 0):
        self.learning_rate = learning_rate
        self.l2 = l2
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.seed = seed


class MLPHead(DenseHead):
    """One or two hidden ReLU layers with dropout, then softmax."""

    kind = "mlp"
    constraints = {
        **DenseHead.constraints,
        "hidden": ("one or two positive integers", lambda v: 1 <= len(v) <= 2 and _positive_ints(v)),
        "dropout": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    }

    def __init__(self, hidden: tuple[int, ...] = (256,), dropout: float = 0.3, learning_rate: float = 1e-3,
                 l2: float = 1e-4, batch_size: int = 64, max_epochs: int = 300, patience: int = 10,
                 seed: int = 0):
        self.hidden = hidden
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.l2 = l2
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.seed = seed


HEAD_KINDS: dict[str, type[Head]] = {cls.kind: cls for cls in (SVMHead, SoftmaxHead, MLPHead)}
KIND_CHOICES = (*HEAD_KINDS, "all")


def make_head(kind: str, seed: int = 0) -> Head:
    """A head of ``kind`` with default hyper-parameters."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
    return HEAD_KINDS[kind](seed=seed)
