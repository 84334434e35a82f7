"""The runner loop: poll the watch folder, classify complete files in batches, log them, settle them.

Each batch follows the write-ahead protocol documented in ``edge.results``: result lines are
appended and fsynced first, then the files are moved (or recorded as kept), then the journal gets
a checkpoint. ``run`` starts by reconciling what an interrupted run left in flight.

``latency_ms`` of a line is the work spent on that image: reading, hashing and decoding it, plus
its share of the batch's inference time. ``moved_to`` is relative to --done (or, on an error line,
to --quarantine); it is absent when the file stays in the watch folder.

Unknown images: with a model that has the ``ood_score`` output and ``ood`` metadata (and unless
``unknown=False``), each line gets ``ood_score`` and ``unknown``; an unknown image's ``label`` is
``"unknown"`` while ``top`` still lists the best classes. ``review_copy`` (relative to --review) is
a hard link (or copy) made in step 3 of the protocol, before the move, and is idempotent, so a
restart after a crash never makes a second one.

Between batches (and at every idle poll) the runner checks whether its model file was replaced
(``edge.swap``: the next batch uses the new model, the line names it) and writes the stats line and
the ``--metrics`` file when they are due (``edge.metrics``).
"""

from __future__ import annotations

import errno
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

from .files import folder_inside, free_destination, fsync_dir, inside, link_or_copy, move_file
from .imageio import FileBytes, FileChangedError, ImageDecodeError, decode_image, is_image_name, read_image_file
from .metrics import Metrics
from .model import EdgeModel
from .results import ResultLog
from .stats import Stats
from .swap import ModelSwapper
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
    unknown: bool = True  # False: ignore the model's ood_score (lines as for a model without one)
    review: str | None = None  # folder for review copies of unknown and low-confidence images
    review_below: float = 0.0  # top probability under which an image is copied to --review


@dataclass
class _Prepared:
    state: FileState
    file: FileBytes | None  # the bytes as read once (None when the file could not be read)
    image: np.ndarray | None  # decoded from ``file.data``; None when it could not be read or decoded
    error: str | None
    seconds: float

    @property
    def sha256(self) -> str | None:
        return self.file.sha256 if self.file is not None else None


@dataclass
class _Settling:
    """A file whose line is durable, and the version of it that line describes."""

    record: dict[str, Any]
    state: FileState
    file: FileBytes | None

    def unchanged(self, path: str) -> bool:
        """``path`` still holds the version that was classified (a newer one waits for its own line)."""
        if self.file is not None:
            return self.file.same_file(path)
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (self.state.size, self.state.mtime_ns)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Runner:
    def __init__(self, model: EdgeModel, config: RunnerConfig, results: ResultLog,
                 swapper: ModelSwapper | None = None, metrics: Metrics | None = None) -> None:
        """``swapper``: loads a replaced model file between batches (None: the model never changes);
        ``metrics``: the --metrics file to keep up to date (None: none)."""
        self.model = model
        self.config = config
        self.results = results
        self.swapper = swapper
        self.metrics = metrics
        self._stop = threading.Event()
        exclude = frozenset(
            p for p in (config.done, config.quarantine, config.review, str(results.path), str(results.journal_path),
                        metrics.path if metrics else None)
            if p
        )
        self.exclude = exclude
        self.watcher = Watcher(
            config.watch,
            exclude,
            settle_seconds=config.poll_seconds,
            skip=results.is_kept,
            max_pending=max(2048, 16 * config.batch_size),
            on_skip=self._log_skip_once,
        )
        self._skips_logged: set[str] = set()
        # (folder, moved_to) of lines whose file changed before it could be moved: never planned
        # again, so a newer version cannot land where an older line says its file went
        self._abandoned: set[tuple[str, str]] = set()
        self.stats = Stats(config.stats_seconds)

    def _log_skip_once(self, rel: str, reason: str) -> None:
        if rel not in self._skips_logged:
            self._skips_logged.add(rel)
            log.warning("skipped %s: %s", rel, reason)

    def request_stop(self) -> None:
        """Finish the current batch, then return from ``run`` (signal handlers call this)."""
        self._stop.set()

    def run(self) -> None:
        c = self.config
        self._model_started()
        if c.review:
            log.info("review copies: unknown images%s -> %s",
                     f" and top probability < {c.review_below:g}" if c.review_below else "", c.review)
        try:
            self._recover()
            while not self._stop.is_set():
                ready = self.watcher.poll(limit=4 * c.batch_size)
                for start in range(0, len(ready), c.batch_size):
                    self._process(ready[start : start + c.batch_size])
                    self._between_batches()
                    if self._stop.is_set():
                        break
                if not ready:
                    if c.once and self.watcher.idle:
                        break
                    self._stop.wait(self._idle_seconds())
                    self._between_batches()
        finally:
            if self.metrics is not None:
                self.metrics.write(self.watcher.queue_length)
        log.info("stopped after %d images (%d errors)", self.stats.total, self.stats.errors)

    def _model_started(self) -> None:
        """Log what the model is and does (at start-up and after a swap); tell the metrics."""
        m, c = self.model, self.config
        log.info(
            "model %s: %d classes, input %dx%d %s %s (batch %s); watching %s -> %s",
            m.model_id, len(m.class_names), *m.input_size, m.layout, m.input_dtype,
            m.fixed_batch or "dynamic", c.watch, c.results,
        )
        scores = m.ood_threshold is not None and c.unknown
        if m.ood_threshold is None:
            log.info("unknown detection: not available (the model has no ood_score output and ood metadata)")
        elif not c.unknown:
            log.info("unknown detection: off (--unknown off); lines get no ood_score, unknown or 'unknown' label")
        else:
            log.info("unknown detection: on, an image is unknown when its ood_score > %g (%s)",
                     m.ood_threshold, m.ood.get("method", "method not recorded"))
        if self.metrics is not None:
            labels = [*m.class_names, "unknown"] if scores else m.class_names
            self.metrics.set_model(m.model_id, m.class_names, m.drift_reference, labels)
            if m.drift_reference is None:
                log.info("drift metrics: not available (the model's metadata has no drift_reference)")

    def _idle_seconds(self) -> float:
        """How long to wait for files: until one may have settled, a poll, or a due swap check or
        metrics write, whichever comes first."""
        waits = [self.config.poll_seconds, self.watcher.seconds_to_next_ready()]
        if self.swapper is not None:
            waits.append(self.swapper.seconds_to_check())
        if self.metrics is not None:
            waits.append(self.metrics.seconds_to_due())
        return max(min(w for w in waits if w is not None), 0.01)

    def _between_batches(self) -> None:
        """Nothing is in flight: load a replaced model file, write the stats line and metrics if due."""
        if self.swapper is not None:
            new = self.swapper.check()
            if self.metrics is not None:
                self.metrics.refusals = self.swapper.refusals
            if new is not None:
                self.model = new
                if self.metrics is not None:
                    self.metrics.swaps += 1
                self._model_started()
        if self.stats.due():
            queue = f"{self.watcher.queue_length}{'' if self.watcher.queue_complete else '+'}"
            log.info(self.stats.line(queue))
        if self.metrics is not None:
            self.metrics.write_if_due(self.watcher.queue_length)

    def _recover(self) -> None:
        """Protocol step b: settle files whose line was committed by an interrupted run."""
        found: dict[str, _Settling] = {}
        for record in self.results.in_flight():
            if record["path"] not in found:
                item = self._committed_file(record)
                if item is not None:
                    found[record["path"]] = item
        self._settle(list(found.values()))
        if found:
            log.info("recovered %d file(s) whose result line an interrupted run had written", len(found))

    def _owned_path(self, rel: str) -> str | None:
        """``watch/rel`` when that stays inside the watch folder, through no symlink, outside --done,
        --quarantine and the results files; else None."""
        path = inside(self.config.watch, rel)
        if path is None or any(path == ex or path.startswith(ex + os.sep) for ex in self.exclude):
            return None
        return path

    def _committed_file(self, record: dict[str, Any]) -> _Settling | None:
        """The file ``record`` describes, if it is still in the watch folder and not settled.

        results.jsonl is not trusted: a line whose ``path`` or ``moved_to`` would lead outside the
        runner's folders (``..``, absolute, through a symlink) is ignored, with a warning.
        """
        path = self._owned_path(record["path"])
        folder = self._folder_for(record)
        moved_to = record.get("moved_to")
        review_copy = record.get("review_copy")
        if (
            path is None
            or (moved_to is not None and folder is not None and inside(folder, str(moved_to)) is None)
            or (review_copy is not None and self.config.review is not None
                and inside(self.config.review, str(review_copy)) is None)
        ):
            log.warning("ignoring a line of %s that points outside the runner's folders: path %s, moved_to %s%s",
                        self.results.path, record["path"], moved_to,
                        "" if review_copy is None else f", review_copy {review_copy}")
            return None
        try:
            file = self._read(record["path"])
        except ImageDecodeError:
            return None  # gone, or not a regular file any more: nothing to settle
        if record.get("sha256") is not None and file.sha256 != record["sha256"]:
            return None  # another file now has that name: it gets its own line
        state = FileState(record["path"], file.size, file.mtime_ns)
        return None if self.results.is_kept(state) else _Settling(record, state, file)

    def _read(self, rel: str) -> FileBytes:
        """``read_image_file`` of ``watch/rel`` through its folder's descriptor (``folder_inside``): neither
        a folder nor the file itself swapped for a symlink after ``_owned_path`` checked them is followed."""
        folder, name = os.path.split(rel)
        try:
            with folder_inside(self.config.watch, folder) as fd:
                return read_image_file(name, dir_fd=fd)
        except ImageDecodeError:
            raise
        except OSError as exc:
            raise ImageDecodeError(f"cannot open its folder: {exc.strerror or exc}") from None

    def _prepare(self, state: FileState) -> _Prepared | None:
        """Read one file once, hash and decode those bytes; None when it vanished or changed since
        it looked complete (it has to settle again)."""
        self.watcher.forget(state.rel)
        path = self._owned_path(state.rel)
        if path is None:
            return None
        start = time.perf_counter()
        try:
            file = self._read(state.rel)
        except FileChangedError:
            return None
        except ImageDecodeError as exc:
            if not os.path.lexists(path):
                return None
            return _Prepared(state, None, None, str(exc), time.perf_counter() - start)
        if (file.size, file.mtime_ns) != (state.size, state.mtime_ns):
            return None  # still being written: it has to settle again
        try:
            if not is_image_name(state.rel):  # the formats extract trains on, no others
                raise ImageDecodeError(f"not an image file name (extension {os.path.splitext(state.rel)[1]!r} "
                                       f"is not a format this Pillow decodes)")
            image, error = decode_image(file.data, self.model.input_size), None
        except ImageDecodeError as exc:
            image, error = None, str(exc)
        return _Prepared(state, file, image, error, time.perf_counter() - start)

    def _process(self, batch: list[FileState]) -> None:
        prepared = [p for p in map(self._prepare, batch) if p is not None]
        if not prepared:
            return
        images = [p.image for p in prepared if p.image is not None]
        rows, scores = iter(()), None
        share = 0.0
        if images:
            start = time.perf_counter()
            probs, ood = self.model.predict_scores(np.stack(images))
            rows = iter(probs)
            scores = iter(ood) if ood is not None and self.config.unknown else None
            share = (time.perf_counter() - start) / len(images)
        now = _utc_now()
        taken = {(folder, rel) for folder, rel in self._abandoned}
        items = []
        for p in prepared:
            scored = (next(rows), next(scores) if scores is not None else None) if p.image is not None else None
            record = self._record(p, scored, share, now, taken)
            items.append(_Settling(record, p.state, p.file))
        self.results.append([item.record for item in items])
        for item in items:  # counted once the lines are durable
            self.stats.add(item.record["latency_ms"], "error" not in item.record)
            if self.metrics is not None:
                self.metrics.observe(item.record)
        self._settle(items)

    def _record(
        self, p: _Prepared, scored: tuple[np.ndarray, Any] | None, share: float, now: str,
        taken: set[tuple[str, str]],
    ) -> dict[str, Any]:
        """``scored``: the image's probabilities and ood_score (None when unknown detection is off),
        or None for a file that could not be classified."""
        record: dict[str, Any] = {"path": p.state.rel, "sha256": p.sha256}
        if scored is not None and not (np.isfinite(scored[0]).all() and (scored[1] is None or np.isfinite(scored[1]))):
            scored, p.error = None, "model produced non-finite output"
        if scored is None:
            record["error"] = p.error
        else:
            record.update(self._classification(*scored))
        record["model"] = self.model.model_id
        record["latency_ms"] = round((p.seconds + (share if scored is not None else 0.0)) * 1000, 3)
        record["time"] = now
        folder = self._folder_for(record)
        if folder is not None:
            record["moved_to"] = self._plan(folder, p.state.rel, taken)
        if scored is not None and self._wants_review(record):
            label_folder = review_folder_name(record["label"])
            record["review_copy"] = self._plan(self.config.review, os.path.join(label_folder, p.state.rel), taken)
        return record

    @staticmethod
    def _plan(folder: str, rel: str, taken: set[tuple[str, str]]) -> str:
        """A free name for ``rel`` under ``folder`` that no other line of the batch was given."""
        planned = free_destination(folder, rel, {r for f, r in taken if f == folder})
        taken.add((folder, planned))
        return planned

    def _classification(self, probs: np.ndarray, ood_score: Any) -> dict[str, Any]:
        order = np.argsort(-probs, kind="stable")[: self.config.top]
        top = [{"label": self.model.class_names[i], "probability": round(float(probs[i]), 6)} for i in order]
        fields: dict[str, Any] = {"label": top[0]["label"], "probability": top[0]["probability"], "top": top}
        if ood_score is not None:
            unknown = bool(ood_score > self.model.ood_threshold)
            fields.update(label="unknown" if unknown else fields["label"], ood_score=round(float(ood_score), 6),
                          unknown=unknown)
        return fields

    def _wants_review(self, record: dict[str, Any]) -> bool:
        c = self.config
        return c.review is not None and (record.get("unknown") is True or record["probability"] < c.review_below)

    def _folder_for(self, record: dict[str, Any]) -> str | None:
        return self.config.quarantine if "error" in record else self.config.done

    def _settle(self, items: list[_Settling]) -> None:
        """Protocol steps 3-4 for files whose lines are already durable.

        Only the version that was classified is moved or remembered: a file changed since it was
        read stays where it is and gets its own line at the next pass.
        """
        kept: list[FileState] = []
        folders: set[str] = set()
        for item in items:
            src = self._owned_path(item.state.rel)
            if src is None or not item.unchanged(src):
                log.warning("%s changed after it was read: left for the next pass", item.state.rel)
                folder = self._folder_for(item.record)
                if folder is not None and "moved_to" in item.record:
                    self._abandoned.add((folder, item.record["moved_to"]))
                if "review_copy" in item.record and self.config.review:
                    self._abandoned.add((self.config.review, item.record["review_copy"]))
                continue
            if "review_copy" in item.record and self.config.review and self._review_copy(item):
                folders.add(os.path.dirname(os.path.join(self.config.review, item.record["review_copy"])))
            folder = self._folder_for(item.record)
            if folder is None or "moved_to" not in item.record:
                kept.append(item.state)
                continue
            dst = self._move(folder, item)
            if dst is None:
                kept.append(item.state)
                continue
            folders.update((os.path.dirname(src), os.path.dirname(dst)))
        for folder in folders:
            fsync_dir(folder)
        self.results.checkpoint(kept)

    def _review_copy(self, item: _Settling) -> bool:
        """Hard-link (or copy) the file to its planned ``review_copy``; False (logged) when impossible."""
        rel = item.record["review_copy"]
        try:
            if inside(self.config.review, rel) is None:
                raise NotADirectoryError(errno.ENOTDIR, "the destination leads through a symlink", rel)
            link_or_copy(self.config.watch, item.state.rel, self.config.review, rel)
        except OSError as exc:
            log.warning("cannot make the review copy of %s (%s)", item.state.rel, exc)
            return False
        return True

    def _move(self, folder: str, item: _Settling) -> str | None:
        """Move the file to its planned place under ``folder`` (returns that path); None (logged) when it
        must stay. ``inside`` refuses a planned path through a symlink; ``move_file`` also refuses one
        swapped in after that check (it never follows a symlink)."""
        rel = item.record["moved_to"]
        try:
            if inside(folder, rel) is None:
                raise NotADirectoryError(errno.ENOTDIR, "the destination leads through a symlink", rel)
            try:
                move_file(self.config.watch, item.state.rel, folder, rel)
            except FileExistsError:  # only if something else wrote into the folder meanwhile
                rel = free_destination(folder, rel, set())
                log.warning("%s already exists: %s moved to %s instead", item.record["moved_to"], item.state.rel,
                            os.path.join(folder, rel))
                move_file(self.config.watch, item.state.rel, folder, rel)
        except OSError as exc:
            log.warning("cannot move %s (%s): left in place, remembered as reported", item.state.rel, exc)
            return None
        return os.path.join(folder, rel)


def review_folder_name(label: str) -> str:
    """``label`` as one plain folder name: a class name with a slash or one that is ``.``/``..``
    must not lead outside --review (class names come from the model file), nor be hidden."""
    name = label.replace("/", "_").replace("\0", "_")
    return "_" + name if not name or name.startswith(".") else name
