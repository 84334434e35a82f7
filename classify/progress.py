"""Progress of a head's hyper-parameter search: one call per fit the search makes.

A head's ``fit`` makes many fits: every C (and gamma) on every fold, then the final fit on all
rows. It tells a ``FitProgress`` how many it will make (``planned``), then reports each one as it
ends (``fitted``, with the setting: ``"C=0.3 fold 2/5"``); long single fits (the mlp's epochs,
the streamed L-BFGS iterations) may also ``note`` where they are without counting a fit.

The hook is a fit parameter, ``head.fit(X, y, progress=hook)``, not a constructor parameter: like
scikit-learn's ``sample_weight`` it belongs to one call, not to the model, so ``clone``,
``get_params``, the head's fingerprint and ``head.json`` never see it. Without one, ``SILENT``.

    >>> with KindBar("svm", position=0) as bar:      # a tqdm bar on stderr
    ...     make_head("svm").fit(X, y, progress=bar)  # bar: 16/16 [C=0.01 all rows]
"""

from __future__ import annotations

import threading
from typing import Protocol


class FitProgress(Protocol):
    def planned(self, fits: int) -> None:
        """``fits`` more fits are coming (said before the first of them)."""

    def fitted(self, setting: str) -> None:
        """One fit has ended; ``setting`` names it (``"C=0.3 fold 2/5"``)."""

    def note(self, detail: str) -> None:
        """Where a long fit is (``"epoch 7"``), without counting a fit."""


class _Silent:
    def planned(self, fits: int) -> None:
        pass

    def fitted(self, setting: str) -> None:
        pass

    def note(self, detail: str) -> None:
        pass


SILENT: FitProgress = _Silent()


def fold_label(fold: int, n_folds: int) -> str:
    """``fold`` counted from 0, as a user reads it: ``"fold 2/5"``."""
    return f"fold {fold + 1}/{n_folds}"


class Prefixed:
    """Another hook's reports with ``prefix`` in front of each setting (a fold around a whole head fit)."""

    def __init__(self, inner: FitProgress, prefix: str):
        self.inner, self.prefix = inner, prefix

    def planned(self, fits: int) -> None:
        self.inner.planned(fits)

    def fitted(self, setting: str) -> None:
        self.inner.fitted(f"{self.prefix} {setting}")

    def note(self, detail: str) -> None:
        self.inner.note(f"{self.prefix} {detail}")


class KindBar:
    """A tqdm bar on stderr for one head kind, a fit per tick; safe to call from the search's threads.

    Bars of kinds fitted at the same time take one line each (``position``) and stay as one line
    per kind when done; ``enabled=False`` (``--quiet``) writes nothing."""

    def __init__(self, kind: str, position: int = 0, enabled: bool = True):
        from tqdm import tqdm

        self._lock = threading.Lock()
        self._bar = tqdm(total=0, desc=f"fit-head {kind}", unit="fit", position=position, disable=not enabled,
                         leave=True, dynamic_ncols=True)

    def planned(self, fits: int) -> None:
        with self._lock:
            self._bar.total += fits
            self._bar.refresh()

    def fitted(self, setting: str) -> None:
        with self._lock:
            self._bar.set_postfix_str(setting, refresh=False)
            self._bar.update()

    def note(self, detail: str) -> None:
        with self._lock:
            self._bar.set_postfix_str(detail, refresh=False)
            self._bar.update(0)  # redraws at most every ``mininterval`` (an epoch can take a millisecond)

    def close(self) -> None:
        with self._lock:
            self._bar.close()

    def __enter__(self) -> "KindBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
