"""Linear heads on more rows than fit in memory twice: L-BFGS with the loss summed chunk by chunk.

Above ``STREAM_ABOVE_ROWS`` labelled rows the svm and softmax heads do not copy the feature matrix:
they read it in the dtype it was stored in (float16 in a store) and convert, standardise and
multiply ``CHUNK_ROWS`` rows at a time, so a fit holds the features once plus O(chunk x dim)
floats. The optimiser is scipy's L-BFGS-B on the same objective scikit-learn's
``LogisticRegression`` minimises,

    mean_i loss(x_i W + b, y_i) + |W|^2 / (2 C n)        (the intercept b is not penalised)

with ``loss`` the multinomial cross-entropy (softmax head) or, for the svm head, the squared hinge
on every pair of classes, ``sum_{j != y} max(0, 1 - (z_y - z_j))^2`` (Weston and Watkins' multiclass
SVM with liblinear's L2 loss: its pair decisions ``z_i - z_j`` are the svm head's pair machines),
each pass over the rows giving the value and the gradient. C is chosen on a stratified held-out ``HOLDOUT_FRACTION`` of the rows instead of
k folds (each fold would be another full pass per iteration); the C path is walked upwards, each C
warm-started from the previous solution, and the final fit on every row starts from the chosen C's.

    >>> X16 = features.features                    # (n, dim) float16, never converted whole
    >>> mean, scale = column_moments(X16)
    >>> found = search_C(X16, y, n_classes, "multinomial", Cs=[0.01, 0.1, 1.0], mean=mean, scale=scale, seed=0)
    >>> found.W, found.b, found.C, found.scores
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from classify.progress import SILENT, FitProgress
from classify.selection import best_index, holdout_split

STREAM_ABOVE_ROWS = 10_000  # the default switch: more labelled rows than this are streamed
CHUNK_ROWS = 4096  # rows converted to float32 at a time: 4096 x 1280 x 4 bytes = 21 MB
HOLDOUT_FRACTION = 0.2
PRECONDITION_ROWS = 16_384  # rows the preconditioner's correlation matrix is estimated on
LOSSES = ("multinomial", "pair_squared_hinge")


def streams(n_rows: int | None, above: int | None) -> bool:
    """Whether a fit on ``n_rows`` streams: more than ``above`` rows (None: ``STREAM_ABOVE_ROWS``)."""
    return n_rows is not None and n_rows > (STREAM_ABOVE_ROWS if above is None else above)


def row_chunks(n: int, size: int | None = None):
    """Slices of ``size`` (default ``CHUNK_ROWS``) rows covering ``range(n)``."""
    size = size or CHUNK_ROWS
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def standardised(X: np.ndarray, rows: np.ndarray | slice, mean: np.ndarray, scale: np.ndarray,
                 out: np.ndarray | None = None) -> np.ndarray:
    """``(X[rows] - mean) / scale`` as float32, for one chunk of rows, written into ``out`` when given
    (a buffer of at least that many rows, reused: no new pages per chunk)."""
    if isinstance(rows, np.ndarray) and len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        rows = slice(int(rows[0]), int(rows[-1]) + 1)  # contiguous: read in place, no gathered copy
    source = X[rows]
    chunk = np.empty((len(source), X.shape[1]), np.float32) if out is None else out[:len(source)]
    np.copyto(chunk, source)
    chunk -= mean
    chunk /= scale
    return chunk


def column_moments(X: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each column over ``rows`` (all by default), a float32 chunk at
    a time around a first estimate (so large means cost no precision), the chunks' sums in float64."""
    rows = np.arange(len(X)) if rows is None else rows
    shift = np.asarray(X[rows[:CHUNK_ROWS]], dtype=np.float32).mean(axis=0, dtype=np.float64).astype(np.float32)
    total, squares = np.zeros(X.shape[1]), np.zeros(X.shape[1])
    buffer = np.empty((min(CHUNK_ROWS, len(rows)), X.shape[1]), np.float32)
    with np.errstate(invalid="ignore"):  # NaN or infinity in X: refused below
        for part in row_chunks(len(rows)):
            chunk = standardised(X, rows[part], shift, np.float32(1.0), buffer)
            total += chunk.sum(axis=0, dtype=np.float64)
            squares += np.einsum("ij,ij->j", chunk, chunk)
    if not (np.isfinite(total).all() and np.isfinite(squares).all()):
        raise ValueError("Input X contains NaN or infinity.")
    mean = total / len(rows)
    return shift + mean, np.sqrt(np.maximum(squares / len(rows) - mean * mean, 0.0))


@dataclass
class Rows:
    """The rows one fit sees: the raw matrix, which rows, their labels, and the standardisation."""

    X: np.ndarray  # (n, dim), any float dtype
    rows: np.ndarray  # indices into X, ascending
    y: np.ndarray  # (len(rows),) labels 0..n_classes-1
    n_classes: int
    mean: np.ndarray  # float32
    scale: np.ndarray  # float32

    def chunks(self):
        """(standardised float32 rows, their labels), CHUNK_ROWS at a time, in one reused buffer."""
        buffer = np.empty((min(CHUNK_ROWS, len(self.rows)), self.X.shape[1]), np.float32)
        for part in row_chunks(len(self.rows)):
            yield standardised(self.X, self.rows[part], self.mean, self.scale, buffer), self.y[part]


def _chunk_loss(Z: np.ndarray, y: np.ndarray, loss: str) -> tuple[float, np.ndarray]:
    """Summed loss of the decisions ``Z`` (rows, classes) and its gradient with respect to ``Z``."""
    rows = np.arange(len(y))
    if loss == "multinomial":
        Z = Z - Z.max(axis=1, keepdims=True)
        E = np.exp(Z)
        total = E.sum(axis=1)
        value = float(np.sum(np.log(total) - Z[rows, y]))
        E /= total[:, None]
        E[rows, y] -= 1.0
        return value, E
    margin = np.maximum(1.0 - Z[rows, y][:, None] + Z, 0.0)  # 1 - (z_y - z_j): every pair's margin
    margin[rows, y] = 0.0
    dZ = 2.0 * margin
    dZ[rows, y] = -dZ.sum(axis=1)
    return float(np.sum(margin * margin)), dZ


@dataclass
class Preconditioner:
    """W = L^-T V with L L^T = the features' correlation (+ a ridge): L-BFGS runs on V, where the loss
    is about as curved in every direction. An exact change of variables (the same minimiser), it
    took fits on correlated features from hundreds of passes over the rows to tens."""

    L: np.ndarray  # (dim, dim) lower triangular

    @classmethod
    def estimate(cls, data: "Rows", rows: int = PRECONDITION_ROWS, ridge: float = 1e-3) -> "Preconditioner":
        from scipy.linalg import cholesky

        picked = np.unique(np.linspace(0, len(data.rows) - 1, min(rows, len(data.rows))).astype(np.int64))
        sample = Rows(data.X, data.rows[picked], data.y[picked], data.n_classes, data.mean, data.scale)
        second = np.zeros((data.X.shape[1], data.X.shape[1]))
        for X, _ in sample.chunks():
            second += X.T @ X  # float32 products (no float64 copy of the chunk), summed in float64
        second /= len(picked)
        second[np.diag_indices_from(second)] += ridge
        return cls(cholesky(second, lower=True))

    def weights(self, V: np.ndarray) -> np.ndarray:
        from scipy.linalg import solve_triangular

        return solve_triangular(self.L, V, lower=True, trans="T")

    def to_v(self, W: np.ndarray) -> np.ndarray:
        return self.L.T @ W

    def gradient_v(self, grad_W: np.ndarray) -> np.ndarray:
        from scipy.linalg import solve_triangular

        return solve_triangular(self.L, grad_W, lower=True)


def objective(params: np.ndarray, data: Rows, C: float, loss: str,
              preconditioner: Preconditioner) -> tuple[float, np.ndarray]:
    """The regularised mean loss and its gradient with respect to ``[V.ravel(), b]``, in one pass
    over the rows (sums in float64)."""
    dim, k = data.X.shape[1], data.n_classes
    V, b = split_params(params, dim, k)
    W = preconditioner.weights(V)
    W32, b32 = W.astype(np.float32), b.astype(np.float32)
    value, grad_W, grad_b = 0.0, np.zeros((dim, k)), np.zeros(k)
    for X, y in data.chunks():
        part, dZ = _chunk_loss(X @ W32 + b32, y, loss)
        value += part
        grad_W += X.T @ dZ
        grad_b += dZ.sum(axis=0)
    n = len(data.rows)
    value = value / n + float(np.sum(W * W)) / (2 * C * n)
    grad_W = grad_W / n + W / (C * n)
    return value, np.concatenate([preconditioner.gradient_v(grad_W).ravel(), grad_b / n])


def fit_linear(data: Rows, C: float, loss: str, start: np.ndarray | None = None, tol: float = 1e-3,
               max_iter: int = 500, preconditioner: Preconditioner | None = None,
               on_iteration: Callable[[int], None] | None = None) -> tuple[np.ndarray, int]:
    """Parameters ``[W.ravel(), b]`` minimising ``objective`` (L-BFGS-B with scikit-learn's settings,
    on the preconditioned V), started from ``start`` (zeros by default), and the iterations it took;
    ``on_iteration(i)`` after each iteration (1-based)."""
    import warnings

    from scipy.optimize import minimize

    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    dim, k = data.X.shape[1], data.n_classes
    preconditioner = preconditioner or Preconditioner.estimate(data)
    x0 = np.zeros((dim + 1) * k)
    if start is not None:
        W0, b0 = split_params(np.asarray(start, np.float64), dim, k)
        x0 = np.concatenate([preconditioner.to_v(W0).ravel(), b0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        found = minimize(objective, x0, args=(data, C, loss, preconditioner), jac=True, method="L-BFGS-B",
                         callback=_counting(on_iteration),
                         options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    V, b = split_params(found.x, dim, k)
    return np.concatenate([preconditioner.weights(V).ravel(), b]), int(found.nit)


def _counting(on_iteration: Callable[[int], None] | None) -> Callable | None:
    """An L-BFGS callback calling ``on_iteration`` with the iteration's number."""
    if on_iteration is None:
        return None
    done = itertools.count(1)
    return lambda *_: on_iteration(next(done))


def decisions(X: np.ndarray, rows: np.ndarray, mean: np.ndarray, scale: np.ndarray, params: np.ndarray,
              n_classes: int) -> np.ndarray:
    """``standardised(X[rows]) @ W + b`` (rows, classes), chunk by chunk."""
    W, b = split_params(params, X.shape[1], n_classes)
    out = np.empty((len(rows), n_classes))
    buffer = np.empty((min(CHUNK_ROWS, len(rows)), X.shape[1]), np.float32)
    for part in row_chunks(len(rows)):
        out[part] = standardised(X, rows[part], mean, scale, buffer) @ W.astype(np.float32) + b
    return out


def split_params(params: np.ndarray, dim: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    return params[:dim * n_classes].reshape(dim, n_classes), params[dim * n_classes:]


@dataclass
class StreamedFit:
    """The C search on a held-out fraction and the fit on every row at the chosen C."""

    Cs: list[float]
    scores: list[float]  # held-out accuracy per C
    best: int
    held_out_rows: np.ndarray
    held_out_decisions: np.ndarray  # (held-out rows, classes) of the chosen C's model
    W: np.ndarray  # (dim, classes), on standardised features
    b: np.ndarray  # (classes,)
    n_iter: int  # iterations of the final fit

    @property
    def C(self) -> float:
        return self.Cs[self.best]


def search_C(X: np.ndarray, y: np.ndarray, n_classes: int, loss: str, Cs: list[float], mean: np.ndarray,
             scale: np.ndarray, seed: int, tol: float = 1e-3, max_iter: int = 500,
             fraction: float = HOLDOUT_FRACTION, progress: FitProgress = SILENT) -> StreamedFit:
    """Walk ``Cs`` (ascending) on the rows outside a stratified held-out ``fraction``, each C
    warm-started from the last; keep the best held-out accuracy (ties: the smaller C); refit on
    every row from that C's solution. ``progress``: one fit per C and the final one, iterations noted."""
    train, held = holdout_split(y, fraction, seed)
    mean, scale = np.asarray(mean, np.float32), np.asarray(scale, np.float32)
    data = Rows(X, train, y[train], n_classes, mean, scale)
    preconditioner = Preconditioner.estimate(data)
    path, held_decisions = [], []
    progress.planned(len(Cs) + 1)
    for C in Cs:
        setting = f"C={C:g} held-out {fraction:g}"
        path.append(fit_linear(data, C, loss, path[-1] if path else None, tol, max_iter, preconditioner,
                               lambda i: progress.note(f"{setting} iteration {i}"))[0])
        held_decisions.append(decisions(X, held, mean, scale, path[-1], n_classes))
        progress.fitted(setting)
    scores = [float(np.mean(d.argmax(axis=1) == y[held])) for d in held_decisions]
    best = best_index(scores)
    everything = Rows(X, np.arange(len(y)), y, n_classes, mean, scale)
    setting = f"C={Cs[best]:g} all rows"
    final, n_iter = fit_linear(everything, Cs[best], loss, path[best], tol, max_iter, preconditioner,
                               lambda i: progress.note(f"{setting} iteration {i}"))
    progress.fitted(setting)
    W, b = split_params(final, X.shape[1], n_classes)
    return StreamedFit([float(C) for C in Cs], scores, best, held, held_decisions[best], W, b, n_iter)
