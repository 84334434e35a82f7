"""Linear heads above the streaming threshold: the switch, the objective, the warm path, the memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

import classify.streamed as streamed
import classify.train as train
from classify.data import fingerprint
from classify.heads import SoftmaxHead, SVMHead
from classify.streamed import Rows, column_moments, fit_linear, search_C
from conftest import make_feature_store
from extract.store import FeatureStore


def _blobs(n_per_class: int, dim: int = 6, classes: int = 3, spread: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return (centres[y] + rng.normal(0, 1, (len(y), dim)) + 3.0).astype(np.float32), y


def _rows(X, y):
    mean, std = column_moments(X)
    return Rows(X, np.arange(len(y)), y, int(y.max()) + 1, mean.astype(np.float32), std.astype(np.float32))


# The streamed path passes scikit-learn's checks too (a threshold of 5 rows streams every check's data).
@parametrize_with_checks([SVMHead(Cs=(0.1, 1.0), stream_above_rows=5),
                          SoftmaxHead(Cs=(0.1, 1.0), stream_above_rows=5)])
def test_streamed_heads_pass_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("cls", [SVMHead, SoftmaxHead])
def test_the_switch_is_the_row_count(cls):
    """At or below ``stream_above_rows`` the head runs k-fold CV in memory; above, one held-out fraction."""
    X, y = _blobs(30)
    in_memory = cls(stream_above_rows=len(y)).fit(X, y)
    streamed_head = cls(stream_above_rows=len(y) - 1).fit(X, y)
    assert len(in_memory.cv_scores_) == 5 and len(streamed_head.cv_scores_) == 1
    assert np.mean(streamed_head.predict(X) == y) > 0.9


def test_the_objective_is_scikit_learns_logistic_regression():
    """Same objective (mean loss + |W|^2 / (2 C n), intercept free): the same model at a tight tolerance,
    with the rows cut into chunks of 7 (sums across chunks in float64)."""
    X, y = _blobs(40)
    data = _rows(X, y)
    standardised = (X - data.mean) / data.scale
    for C in (0.05, 1.0):
        expected = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(standardised, y)
        streamed.CHUNK_ROWS, saved = 7, streamed.CHUNK_ROWS
        try:
            params, _ = fit_linear(data, C, "multinomial", tol=1e-9, max_iter=10_000)
        finally:
            streamed.CHUNK_ROWS = saved
        W, b = streamed.split_params(params, X.shape[1], 3)
        assert W.T == pytest.approx(expected.coef_, abs=2e-3)
        assert b == pytest.approx(expected.intercept_, abs=2e-3)


@pytest.mark.parametrize("loss", streamed.LOSSES)
def test_the_warm_path_chooses_what_cold_fits_choose(loss):
    """Each C warm-started from the previous one gives the held-out scores and choice of fitting
    every C from zero, and the final model of a cold fit at the chosen C."""
    X, y = _blobs(60, spread=0.6, seed=3)  # overlapping: the Cs score differently
    Cs = [1e-3, 1e-2, 1.0]
    mean, std = column_moments(X)
    warm = search_C(X, y, 3, loss, Cs, mean, std, seed=0, tol=1e-8, max_iter=5000)
    held = warm.held_out_rows
    train = np.setdiff1d(np.arange(len(y)), held)
    data = Rows(X, train, y[train], 3, mean.astype(np.float32), std.astype(np.float32))
    cold = []
    for C in Cs:
        params, _ = fit_linear(data, C, loss, tol=1e-8, max_iter=5000)
        decisions = streamed.decisions(X, held, data.mean, data.scale, params, 3)
        cold.append(float(np.mean(decisions.argmax(axis=1) == y[held])))
    assert warm.scores == cold and len(set(cold)) > 1
    final, _ = fit_linear(_rows(X, y), warm.C, loss, tol=1e-8, max_iter=5000)
    assert warm.W.ravel() == pytest.approx(streamed.split_params(final, X.shape[1], 3)[0].ravel(), abs=1e-4)


def test_the_svm_pair_machines_vote_for_the_argmax_of_the_class_scores():
    """Pair machine (0, j) is z_0 - z_j, so -d_0j ranks class j against class 0: the head's vote
    must be the argmax of those class scores."""
    X, y = _blobs(50, classes=4, spread=2.5, seed=2)
    head = SVMHead(stream_above_rows=10).fit(X, y)
    pairs = head._decisions(head._standardise(X))
    relative = np.hstack([np.zeros((len(X), 1)), -pairs[:, :3]])  # pairs (0, 1), (0, 2), (0, 3) come first
    assert np.array_equal(head.predict(X), head.classes_[relative.argmax(axis=1)])
    assert np.mean(head.predict(X) == y) > 0.8


@pytest.mark.parametrize("cls", [SVMHead, SoftmaxHead])
def test_a_streamed_fit_never_holds_a_float32_copy_of_the_rows(cls, monkeypatch):
    """float16 rows stay float16: the fit's traced peak stays below the float32 matrix's size."""
    monkeypatch.setattr(streamed, "CHUNK_ROWS", 256)
    monkeypatch.setattr(streamed, "PRECONDITION_ROWS", 512)
    X, y = _blobs(2000, dim=256, classes=3, spread=0.3)
    X16 = X.astype(np.float16)
    del X
    head = cls(Cs=(0.01, 0.1), stream_above_rows=1000)
    tracemalloc.start()
    try:
        head.fit(X16, y)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(head.cv_scores_) == 1  # it did stream
    assert peak < 0.5 * X16.size * 4, f"peak {peak / 2**20:.1f} MiB for {X16.size * 4 / 2**20:.1f} MiB of float32"


def test_predictions_in_chunks_equal_one_batch(monkeypatch):
    X, y = _blobs(40)
    head = SoftmaxHead().fit(X, y)
    whole = head.predict_proba(X)
    monkeypatch.setattr("classify.estimator.PREDICT_ROWS", 7)
    assert np.array_equal(head.predict_proba(X), whole)


def test_nan_in_streamed_rows_is_refused():
    X, y = _blobs(30)
    X[5, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SoftmaxHead(stream_above_rows=10).fit(X.astype(np.float16), y)


def test_fit_head_hands_the_heads_the_stored_float16_rows_as_a_view(tmp_path, monkeypatch):
    """fit-head reads a float16 store as float16 and gives the heads the labelled rows without a copy;
    above the threshold svm and softmax then stream (one held-out score); the fingerprint is the
    one a float32 read gives."""
    sizes = {name: {"train": 150, "validation": 30, "test": 30} for name in ("a", "b", "c")}
    store = make_feature_store(tmp_path / "f16.h5", classes=("a", "b", "c"), sizes=sizes, dtype=np.float16)
    monkeypatch.setattr(streamed, "STREAM_ABOVE_ROWS", 400)  # 540 labelled rows
    seen = []
    real = train.fit_candidates

    def spy(kinds, X, y, *args, **kwargs):
        seen.append(X)
        return real(kinds, X, y, *args, **kwargs)

    monkeypatch.setattr(train, "fit_candidates", spy)
    rows = {r["kind"]: r for r in train.fit_heads(store, kind="all", out=tmp_path / "head")}
    (X,) = seen
    assert X.dtype == np.float16 and X.base is not None and len(X) == 540  # a view of the read rows
    assert rows["svm"]["cv_folds"] == rows["softmax"]["cv_folds"] == 1 and rows["mlp"]["cv_folds"] == 5
    assert min(r["test_accuracy"] for r in rows.values()) > 0.9
    saved = json.loads((tmp_path / "head" / "head.json").read_text())
    assert saved["store"]["fingerprint"] == fingerprint(FeatureStore(store).read())  # float32 read
