"""fit-head --kind all fits the kinds side by side (classify.parallel), sharing the svm/rbf Gram matrix:
the same choices and scores as fitting them one after another, and Ctrl-C stops it without a head."""

from __future__ import annotations

import signal
import threading

import numpy as np
import pytest
from conftest import make_feature_store

import classify.train as train
from classify.heads import HEAD_KINDS
from classify.parallel import map_tasks, run_side_by_side
from classify.svm import gram, sharing_grams

FOLDS = 3


@pytest.fixture(scope="module")
def rows():
    """Overlapping classes, so that the grids' settings score differently."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 40)
    X = rng.normal(size=(len(y), 12)) + y[:, None] * 0.6
    return X.astype(np.float32), y


def _learned(head) -> dict:
    return {name: value for name, value in head.get_learned_info().items() if name != "n_iter_"} | \
        {name: array.tolist() for name, array in head.learned_arrays().items()}


def test_side_by_side_gives_what_one_after_another_gives(rows):
    X, y = rows
    kinds = list(HEAD_KINDS)
    together = train.fit_candidates(kinds, X, y, FOLDS, 0)
    for kind, (head, cv, _) in zip(kinds, together):
        alone, alone_cv, _ = train._fit_one(kind, X, y, FOLDS, 0, train.KindBar(kind, enabled=False))
        assert cv == alone_cv, kind
        assert _learned(head) == _learned(alone), kind  # chosen C / gamma, CV table and every weight
    assert len({np.mean(cv) for _, cv, _ in together}) > 1  # a problem on which the kinds differ


def test_the_gram_matrix_is_computed_once_for_equal_rows_and_is_read_only(rows):
    X = rows[0].astype(np.float64)
    with sharing_grams():
        first, again, other = gram(X), gram(X.copy()), gram(X[:-1])
    assert again is first and other is not first
    np.testing.assert_array_equal(first, X @ X.T)
    assert not first.flags.writeable
    assert gram(X) is not gram(X)  # outside fit-head --kind all nothing is kept


def test_idle_threads_take_tasks_of_the_kinds_still_running():
    seen: dict[str, set] = {"slow": set(), "quick": set()}
    started = threading.Event()

    def fit(kind: str) -> list[int]:
        def task(i: int) -> int:
            seen[kind].add(threading.current_thread().name)
            if kind == "slow":
                started.set()
                threading.Event().wait(0.05)
            return i * i

        if kind == "quick":
            started.wait(5)
        return map_tasks(task, range(8))

    assert run_side_by_side(fit, ["slow", "quick"], 2) == [[i * i for i in range(8)]] * 2  # in task order
    assert len(seen["slow"]) == 2  # the quick kind's thread helped the slow one


def test_ctrl_c_stops_the_fits_and_writes_no_head(tmp_path, monkeypatch):
    store = make_feature_store(tmp_path / "features.h5", dim=8)
    fits = []

    class CtrlCOnFirstFit(train.KindBar):
        def fitted(self, setting: str) -> None:
            fits.append(setting)
            if len(fits) == 1:  # as the terminal would: SIGINT to the main thread, waiting on the fits
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            threading.Event().wait(0.01)

    every_fit = _count_fits(store, tmp_path, monkeypatch)
    monkeypatch.setattr(train, "KindBar", CtrlCOnFirstFit)
    out = tmp_path / "head"
    with pytest.raises(KeyboardInterrupt):
        train.fit_heads(store, kind="all", out=out, folds=FOLDS)
    assert not out.exists()
    assert len(fits) < every_fit / 2  # the fits not started when Ctrl-C came never ran
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("fit")]  # all ended


def _count_fits(store, tmp_path, monkeypatch) -> int:
    """How many fits fit-head --kind all makes on ``store``."""
    fits = []

    class Counting(train.KindBar):
        def fitted(self, setting: str) -> None:
            fits.append(setting)

    with monkeypatch.context() as patch:
        patch.setattr(train, "KindBar", Counting)
        train.fit_heads(store, kind="all", out=tmp_path / "complete", folds=FOLDS)
    return len(fits)
