"""The append-only results log, its journal, and the crash-safety protocol.

Files: ``results.jsonl`` (one JSON line per file, for downstream systems, only ever appended) and
``results.jsonl.journal`` (the runner's own bookkeeping: "settled" offsets and "kept" files).

Protocol, per batch (write-ahead: the result line is the commit point):
  1. hash (sha256) and classify every file of the batch; nothing is written yet;
  2. append one line per file to results.jsonl, flush, fsync;                  <- commit
  3. move each file to its planned ``moved_to`` under --done/--quarantine and fsync the folders,
     or, when it stays in place, remember it as "kept" (path, size, mtime);
  4. append the kept entries and ``{"settled": <results.jsonl size>}`` to the journal.
On start, before looking at the watch folder (``ResultLog.__init__`` and ``in_flight``):
  a. a torn last line of results.jsonl (kill in the middle of step 2) is truncated away;
  b. lines after the last settled offset are "in flight": a file still at such a line's ``path``
     with the same sha256 was committed but not settled, so the runner does steps 3-4 for it
     without writing a new line;
  c. every other file in the watch folder has no line and is processed normally.
A file leaves the set of files to process (moved away, or kept) only after its line is durable,
and the settled offset only moves past a line once that line's file is settled, so a SIGKILL at
any instant leaves every file with exactly one line after the restart. The journal is only
flushed, not fsynced: losing its tail (power loss) just makes the next start reconcile more lines,
which is idempotent; the folders are fsynced before a checkpoint is written, so a durable
checkpoint never points past a move that is not. Limit: during reconciliation a file identical to
an in-flight one (same path, same bytes) dropped again before the restart counts as that file.

The journal is compacted when the runner starts (kept entries of files that are gone are
dropped), so in --done mode it stays a few lines long; results.jsonl is locked (flock) so two
runners cannot write it at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import fsync_dir
from .imageio import strict_json
from .watch import FileState

log = logging.getLogger("edge")


class ResultsLocked(Exception):
    """Another runner holds the results file."""


def dump_line(obj: dict[str, Any]) -> bytes:
    """One strict JSON line (never NaN), valid UTF-8. File names that are not valid UTF-8 come back
    from ``os.scandir`` with lone surrogates; they are written as ``\\udcXX`` escapes, which read
    back to the same string."""
    return (strict_json(obj) + "\n").encode("utf-8")


def _kept_key(state: FileState) -> bytes:
    # A 16-byte digest instead of the path keeps the in-memory set small for huge folders.
    raw = f"{state.rel}\0{state.size}\0{state.mtime_ns}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=16).digest()


def _unchanged(watch: str, state: FileState) -> bool:
    try:
        st = os.stat(os.path.join(watch, state.rel))
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (state.size, state.mtime_ns)


class ResultLog:
    """results.jsonl plus its journal; opening it repairs both (steps a and compaction)."""

    def __init__(self, results: Path, watch: str) -> None:
        self.path = results
        self.journal_path = results.with_name(results.name + ".journal")
        created = not results.exists()
        self._out = open(results, "ab")
        try:
            fcntl.flock(self._out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._out.close()
            raise ResultsLocked(f"another edge runner is writing {results}") from None
        if created:
            fsync_dir(str(results.parent))
        self.size = self._truncate_torn_line()
        self._kept: set[bytes] = set()
        self._settled = self._compact_journal(watch)
        self._journal = open(self.journal_path, "ab")

    def _truncate_torn_line(self) -> int:
        fd = self._out.fileno()
        size = os.fstat(fd).st_size
        end = size
        with open(self.path, "rb") as f:  # find the last newline, reading backwards in blocks
            while end > 0:
                start = max(0, end - 65536)
                f.seek(start)
                newline = f.read(end - start).rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
        if end < size:
            os.ftruncate(fd, end)
            os.fsync(fd)
            log.warning("%s: removed a torn last line (%d bytes) left by an interrupted run", self.path, size - end)
        return end

    def _compact_journal(self, watch: str) -> int:
        """Load the kept set and the settled offset; rewrite the journal without stale entries."""
        settled = 0
        if not self.journal_path.exists():
            return settled
        tmp = self.journal_path.with_name(self.journal_path.name + ".tmp")
        with open(self.journal_path, "rb") as src, open(tmp, "wb") as dst:
            for raw in src:
                try:
                    entry = json.loads(raw)
                    if "settled" in entry:
                        settled = int(entry["settled"])
                        continue
                    state = FileState(str(entry["kept"]), int(entry["size"]), int(entry["mtime_ns"]))
                except (ValueError, KeyError, TypeError):  # a torn last line
                    continue
                key = _kept_key(state)
                if key not in self._kept and _unchanged(watch, state):
                    self._kept.add(key)
                    dst.write(dump_line({"kept": state.rel, "size": state.size, "mtime_ns": state.mtime_ns}))
            if settled > self.size:
                log.warning("%s is shorter than the journal says (replaced?): reconciling all of it", self.path)
                settled = 0
            dst.write(dump_line({"settled": settled}))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.journal_path)
        fsync_dir(str(self.journal_path.parent))
        return settled

    def in_flight(self) -> Iterator[dict[str, Any]]:
        """Result lines written after the last settled offset (step b)."""
        with open(self.path, "rb") as f:
            f.seek(self._settled)
            for raw in f:
                try:
                    record = json.loads(raw)
                except ValueError:
                    log.warning("%s: skipping a line that is not JSON at the end of the log", self.path)
                    continue
                if isinstance(record, dict) and isinstance(record.get("path"), str):
                    yield record

    def is_kept(self, state: FileState) -> bool:
        return _kept_key(state) in self._kept

    def append(self, records: list[dict[str, Any]]) -> None:
        """Step 2: the batch's lines reach the disk before any of its files is moved."""
        data = b"".join(dump_line(record) for record in records)
        try:
            self._out.write(data)
            self._out.flush()
            os.fsync(self._out.fileno())
        except OSError as exc:  # name the file (a full disk): a torn line is removed at the next start
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        self.size += len(data)

    def checkpoint(self, kept: list[FileState]) -> None:
        """Step 4: everything appended so far is settled; ``kept`` files stay in the watch folder."""
        entries = [{"kept": s.rel, "size": s.size, "mtime_ns": s.mtime_ns} for s in kept]
        entries.append({"settled": self.size})
        try:
            self._journal.write(b"".join(dump_line(entry) for entry in entries))
            self._journal.flush()
        except OSError as exc:  # the lines are durable: the next start reconciles them again
            raise OSError(exc.errno, exc.strerror, str(self.journal_path)) from None
        self._kept.update(_kept_key(s) for s in kept)
        self._settled = self.size

    def close(self) -> None:
        """Close both files; a failure to flush the journal (full disk) was already reported and
        loses nothing (the next start reconciles), so it is not raised a second time."""
        for f in (self._journal, self._out):
            try:
                f.close()
            except OSError:
                pass
