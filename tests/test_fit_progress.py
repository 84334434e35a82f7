"""fit-head's progress: every head reports each fit of its hyper-parameter search (classify.progress)."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_feature_store
from sklearn.base import clone

from classify.heads import HEAD_KINDS, SVMHead, make_head
from classify.train import _fit_one, fit_candidates
from cli import cli

FOLDS = 3


class Recorder:
    """A FitProgress that keeps everything it hears (thread-safe, as the svm search calls it from threads)."""

    def __init__(self):
        self.total, self.fits, self.notes = 0, [], []
        self._lock = threading.Lock()

    def planned(self, fits: int) -> None:
        with self._lock:
            self.total += fits

    def fitted(self, setting: str) -> None:
        with self._lock:
            self.fits.append(setting)

    def note(self, detail: str) -> None:
        self.notes.append(detail)


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 15)
    X = rng.normal(size=(len(y), 6)) + y[:, None] * 1.5
    return X, y


def _grid(kind: str) -> list[str]:
    """The settings a kind's search tries, from its own parameters (not from what it reports)."""
    params = make_head(kind).get_params()
    Cs = [f"C={C:g}" for C in sorted(params.get("Cs", ()))]
    if kind == "rbf":
        return [f"gamma={g / 6:.4g} {C}" for g in sorted(params["gammas"]) for C in Cs]
    return Cs


def _expected_fits(kind: str) -> list[str]:
    """Every fit the search makes: each setting on each fold, then the final fit (the mlp, which has
    no grid: its CV folds and its fit on every row)."""
    folds = [f"fold {f}/{FOLDS}" for f in range(1, FOLDS + 1)]
    if kind == "mlp":
        return sorted([f"{fold} " for fold in folds] + [""])
    return sorted([f"{setting} {fold}" for setting in _grid(kind) for fold in folds] + ["final"])


def _normalised(kind: str, setting: str, chosen: str) -> str:
    """A reported setting in the form of ``_expected_fits`` (the final fit names the chosen setting)."""
    if kind == "mlp":
        return re.sub(r"\d+ epochs$", "", setting)
    return "final" if setting == f"{chosen} all rows" else setting


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_every_fit_of_the_search_is_reported_once(kind, rows):
    X, y = rows
    hook = Recorder()
    head, _, _ = _fit_one(kind, X, y, FOLDS, 0, hook)
    chosen = (f"gamma={head.gamma_:.4g} " if kind == "rbf" else "") + (f"C={head.C_:g}" if kind != "mlp" else "")
    assert sorted(_normalised(kind, s, chosen) for s in hook.fits) == _expected_fits(kind)
    assert hook.total == len(hook.fits)  # the bar's total is announced, and reached exactly
    if kind == "mlp":
        assert any(note.endswith("epoch 1") for note in hook.notes)  # epochs are noted within a fit


@pytest.mark.parametrize("loss_head", ["svm", "softmax"])
def test_a_streamed_search_reports_each_C_and_the_final_fit(loss_head, rows):
    X, y = rows
    hook = Recorder()
    head = make_head(loss_head).set_params(stream_above_rows=10).fit(X, y, progress=hook)
    grid = [f"C={C:g}" for C in sorted(head.Cs)]
    assert hook.fits == [f"{C} held-out 0.2" for C in grid] + [f"C={head.C_:g} all rows"]
    assert hook.total == len(grid) + 1
    assert any("iteration 1" in note for note in hook.notes)


def test_the_hook_is_no_hyper_parameter(rows):
    X, y = rows
    with_hook = SVMHead().fit(X, y, progress=Recorder())
    assert "progress" not in with_hook.get_params()
    assert clone(with_hook).get_params() == SVMHead().get_params()
    np.testing.assert_array_equal(with_hook.coef_, SVMHead().fit(X, y).coef_)


def _segments(stderr: str) -> list[str]:
    """What a terminal would show line by line: tqdm's cursor moves and carriage returns split it."""
    return [part.strip() for part in re.split(r"[\r\n]|\x1b\[A", stderr) if part.strip()]


def test_concurrent_kinds_each_keep_their_own_line(rows, capsys):
    X, y = rows
    kinds = list(HEAD_KINDS)
    fit_candidates(kinds, X, y, FOLDS, 0, progress=True)
    segments = _segments(capsys.readouterr().err)
    assert segments and all(segment.count("fit-head ") == 1 for segment in segments)  # no two bars in one write
    for kind in kinds:
        last = [s for s in segments if s.startswith(f"fit-head {kind}:")][-1]
        done = len(_expected_fits(kind))
        assert f"{done}/{done} " in last, last


def test_fit_head_shows_the_search_and_quiet_silences_it(tmp_path):
    store = make_feature_store(tmp_path / "features.h5")
    runner = CliRunner()
    loud = runner.invoke(cli, ["fit-head", "--store", str(store), "--kind", "svm", "--out", str(tmp_path / "a")])
    assert loud.exit_code == 0, loud.output
    assert re.search(r"fit-head svm: 100%.*16/16 .*C=[\d.e-]+ all rows", loud.stderr)
    quiet = runner.invoke(cli, ["fit-head", "--store", str(store), "--kind", "svm", "--out", str(tmp_path / "b"),
                                "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""

