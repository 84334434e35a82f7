"""The runner loop: poll the watch folder, classify complete files in batches, log them, settle them.

Each batch follows the write-ahead protocol documented in ``edge.results``: result lines are
appended and fsynced first, then the files are moved (or recorded as kept), then the journal gets
a checkpoint. ``run`` starts by reconciling what an interrupted run left in flight.

``latency_ms`` of a line is the work spent on that image: reading, hashing and decoding it, plus
its share of the batch's inference time. ``moved_to`` is relative to --done (or, on an error line,
to --quarantine); it is absent when the file stays in the watch folder.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .files import free_destination, fsync_dir, move_file, sha256_file
from .imageio import ImageDecodeError, load_image
from .model import EdgeModel
from .results import ResultLog
from .stats import Stats
from .watch import FileState, Watcher

log = logging.getLogger("edge")


@dataclass(frozen=True)
class RunnerConfig:
    watch: str  # absolute, symlinks resolved (paths in the results are relative to it)
    results: Path
    done: str | None = None
    quarantine: str | None = None
    batch_size: int = 8  # on 2 cores as fast as 16 or 32, with 210 MiB peak RSS instead of 310 or 535
    poll_seconds: float = 1.0
    once: bool = False
    top: int = 3
    stats_seconds: float = 60.0


@dataclass
class _Prepared:
    state: FileState
    sha256: str | None
    image: np.ndarray | None  # None when the file could not be read or decoded
    error: str | None
    seconds: float


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Runner:
    def __init__(self, model: EdgeModel, config: RunnerConfig, results: ResultLog) -> None:
        self.model = model
        self.config = config
        self.results = results
        self._stop = threading.Event()
        exclude = frozenset(
            p for p in (config.done, config.quarantine, str(results.path), str(results.journal_path)) if p
        )
        self.watcher = Watcher(
            config.watch,
            exclude,
            settle_seconds=config.poll_seconds,
            skip=results.is_kept,
            max_pending=max(2048, 16 * config.batch_size),
        )
        self.stats = Stats(config.stats_seconds)

    def request_stop(self) -> None:
        """Finish the current batch, then return from ``run`` (signal handlers call this)."""
        self._stop.set()

    def run(self) -> None:
        m, c = self.model, self.config
        log.info(
            "model %s: %d classes, input %dx%d %s %s (batch %s); watching %s -> %s",
            m.model_id, len(m.class_names), *m.input_size, m.layout, m.input_dtype,
            m.fixed_batch or "dynamic", c.watch, c.results,
        )
        self._recover()
        while not self._stop.is_set():
            ready = self.watcher.poll(limit=4 * c.batch_size)
            for start in range(0, len(ready), c.batch_size):
                self._process(ready[start : start + c.batch_size])
                self._report_if_due()
                if self._stop.is_set():
                    break
            if not ready:
                if c.once and self.watcher.idle:
                    break
                wait = self.watcher.seconds_to_next_ready()
                self._stop.wait(c.poll_seconds if wait is None else min(max(wait, 0.01), c.poll_seconds))
                self._report_if_due()
        log.info("stopped after %d images (%d errors)", self.stats.total, self.stats.errors)

    def _report_if_due(self) -> None:
        if self.stats.due():
            queue = f"{self.watcher.queue_length}{'' if self.watcher.queue_complete else '+'}"
            log.info(self.stats.line(queue))

    def _recover(self) -> None:
        """Protocol step b: settle files whose line was committed by an interrupted run."""
        found: dict[str, tuple[dict[str, Any], FileState]] = {}
        for record in self.results.in_flight():
            if record["path"] not in found:
                state = self._committed_file(record)
                if state is not None:
                    found[record["path"]] = (record, state)
        self._settle(list(found.values()))
        if found:
            log.info("recovered %d file(s) whose result line an interrupted run had written", len(found))

    def _committed_file(self, record: dict[str, Any]) -> FileState | None:
        """The file ``record`` describes, if it is still in the watch folder and not settled."""
        if os.path.isabs(record["path"]) or ".." in record["path"].split("/"):
            return None  # not a line this runner wrote: never touch files outside the watch folder
        path = os.path.join(self.config.watch, record["path"])
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                return None
            if record.get("sha256") is not None and sha256_file(path) != record["sha256"]:
                return None  # another file now has that name: it gets its own line
        except OSError:
            return None
        state = FileState(record["path"], st.st_size, st.st_mtime_ns)
        return None if self.results.is_kept(state) else state

    def _prepare(self, state: FileState) -> _Prepared | None:
        """Hash and decode one file; None when it vanished or changed since it looked complete."""
        path = os.path.join(self.config.watch, state.rel)
        self.watcher.forget(state.rel)
        start = time.perf_counter()
        try:
            sha = sha256_file(path)
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return _Prepared(state, None, None, f"cannot read file: {exc.strerror or exc}", time.perf_counter() - start)
        if (st.st_size, st.st_mtime_ns) != (state.size, state.mtime_ns):
            return None  # still being written: it has to settle again
        try:
            image, error = load_image(path, self.model.input_size), None
        except ImageDecodeError as exc:
            image, error = None, str(exc)
        return _Prepared(state, sha, image, error, time.perf_counter() - start)

    def _process(self, batch: list[FileState]) -> None:
        prepared = [p for p in map(self._prepare, batch) if p is not None]
        if not prepared:
            return
        images = [p.image for p in prepared if p.image is not None]
        rows = iter(())
        share = 0.0
        if images:
            start = time.perf_counter()
            rows = iter(self.model.predict(np.stack(images)))
            share = (time.perf_counter() - start) / len(images)
        now = _utc_now()
        taken: set[str] = set()
        items = []
        for p in prepared:
            record = self._record(p, next(rows) if p.image is not None else None, share, now, taken)
            items.append((record, p.state))
            self.stats.add(record["latency_ms"], "error" not in record)
        self.results.append([record for record, _ in items])
        self._settle(items)

    def _record(
        self, p: _Prepared, probs: np.ndarray | None, share: float, now: str, taken: set[str]
    ) -> dict[str, Any]:
        record: dict[str, Any] = {"path": p.state.rel, "sha256": p.sha256}
        if probs is None:
            record["error"] = p.error
        else:
            order = np.argsort(-probs, kind="stable")[: self.config.top]
            top = [
                {"label": self.model.class_names[i], "probability": round(float(probs[i]), 6)} for i in order
            ]
            record.update(label=top[0]["label"], probability=top[0]["probability"], top=top)
        record["model"] = self.model.model_id
        record["latency_ms"] = round((p.seconds + (share if probs is not None else 0.0)) * 1000, 3)
        record["time"] = now
        folder = self._folder_for(record)
        if folder is not None:
            record["moved_to"] = free_destination(folder, p.state.rel, taken)
            taken.add(record["moved_to"])
        return record

    def _folder_for(self, record: dict[str, Any]) -> str | None:
        return self.config.quarantine if "error" in record else self.config.done

    def _settle(self, items: list[tuple[dict[str, Any], FileState]]) -> None:
        """Protocol steps 3-4 for files whose lines are already durable."""
        kept: list[FileState] = []
        folders: set[str] = set()
        for record, state in items:
            folder = self._folder_for(record)
            if folder is None or "moved_to" not in record:
                kept.append(state)
                continue
            src = os.path.join(self.config.watch, state.rel)
            try:
                dst = os.path.join(folder, record["moved_to"])
                try:
                    move_file(src, dst)
                except FileExistsError:  # only if something else wrote into the folder meanwhile
                    dst = os.path.join(folder, free_destination(folder, record["moved_to"], set()))
                    log.warning("%s already exists: %s moved to %s instead", record["moved_to"], state.rel, dst)
                    move_file(src, dst)
            except OSError as exc:
                log.warning("cannot move %s (%s): left in place, remembered as reported", state.rel, exc)
                kept.append(state)
                continue
            folders.update((os.path.dirname(src), os.path.dirname(dst)))
        for folder in folders:
            fsync_dir(folder)
        self.results.checkpoint(kept)
