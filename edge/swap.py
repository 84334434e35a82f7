"""Model hot-swap: notice that the ``--model`` file was replaced and load the new one between batches.

Replace the model by renaming a complete file over it (``cp new.onnx model.onnx.tmp && mv
model.onnx.tmp model.onnx``). The runner compares the file's identity (device, inode, size, mtime)
after every batch and at every poll; a new identity is loaded once it has stayed the same for
``settle_seconds`` (as for images: a file copied in place is not read half-written), checked like
the model given at start-up (``load_model``: metadata, input, outputs, one warm-up run) and, if
usable, returned to the runner, which classifies the next batch with it. The batch in flight has
already been written with the old model, so every result line names the model that classified it,
and the exactly-once protocol is untouched: nothing is in flight while a model loads.

A file that cannot be used (not ONNX, metadata breaking the contract, wrong input) is refused with
one log line and the old model keeps running; that version of the file is not tried again, only the
next one (nothing is retried in a loop). A removed model file is logged once, too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from .model import EdgeModel, ModelError, load_model

log = logging.getLogger("edge")


def file_identity(path: str | Path) -> tuple[int, ...] | None:
    """(device, inode, size, mtime_ns) of ``path``, as ``load_model`` records it; None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ModelSwapper:
    """Watches one model file; ``check()`` returns a newly loaded model when the file was replaced."""

    def __init__(self, path: str | Path, threads: int, current: EdgeModel, settle_seconds: float,
                 load: Callable[[Path, int], EdgeModel] = load_model) -> None:
        self.path = Path(path)
        self.threads = threads
        self.settle_seconds = settle_seconds
        self._load = load
        self._current = current
        self._settled = current.file_identity  # the version loaded or refused last: not loaded again
        self._candidate: tuple[tuple[int, ...] | None, float] | None = None  # (identity, first seen)
        self.refusals = 0

    def check(self) -> EdgeModel | None:
        """The new model when the file changed, has settled and is usable; else None (the old one stays)."""
        identity = file_identity(self.path)
        if identity == self._settled:
            self._candidate = None
            return None
        now = time.monotonic()
        if self._candidate is None or self._candidate[0] != identity:
            self._candidate = (identity, now)
        if now - self._candidate[1] < self.settle_seconds:
            return None
        self._candidate = None
        self._settled = identity
        if identity is None:
            log.warning("model file %s is gone; still running %s (a model renamed there is loaded)",
                        self.path, self._current.model_id)
            return None
        return self._try_load()

    def _try_load(self) -> EdgeModel | None:
        log.info("model file %s was replaced: loading and checking it (classification waits)", self.path)
        start = time.perf_counter()
        try:
            model = self._load(self.path, self.threads)
        except ModelError as exc:
            self.refusals += 1
            log.warning("refused the new model file (%s); still running %s", exc, self._current.model_id)
            return None
        self._settled = model.file_identity  # what was read (the file may have been replaced again since)
        log.info("model swapped: %s -> %s, loaded in %.2f s; the next batch uses it",
                 self._current.model_id, model.model_id, time.perf_counter() - start)
        self._current = model
        return model

    def seconds_to_check(self) -> float | None:
        """How long until a changed file that is settling may be loaded; None when nothing is settling."""
        if self._candidate is None:
            return None
        return max(0.0, self._candidate[1] + self.settle_seconds - time.monotonic())
