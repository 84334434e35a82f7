"""Find the complete files in a watch folder.

A file appears before its writer has finished. A file is handed out only once its size and
mtime have stayed the same for at least ``settle_seconds`` (observed by two polls). Files that
arrive by rename (``x.jpg.part`` -> ``x.jpg``) are complete at once, so they pass the same check
after one interval. Writers that pause longer than ``settle_seconds`` in the middle of a file must
write under a temporary name and rename: temporary names are never looked at.

Scanning is a generator over ``os.scandir`` (one open folder at a time) and the number of files
remembered between polls is capped, so folders of tens of thousands of files are never loaded
into memory at once.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass

TEMPORARY_SUFFIXES = (".part", ".partial", ".filepart", ".tmp", ".temp", ".crdownload", ".download", "~")


@dataclass(frozen=True)
class FileState:
    """A file under the watch folder: path relative to it (``/``-separated), size and mtime."""

    rel: str
    size: int
    mtime_ns: int


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time when this size/mtime was first observed


def is_temporary_name(name: str) -> bool:
    """Dot-files, dot-folders and names that downloaders/copiers use while writing."""
    return name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES)


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "an unknown kind of entry")


def _skip_reason(entry: os.DirEntry) -> str:
    """Why an entry that is neither a folder nor a regular file is not processed."""
    if not entry.is_symlink():
        return f"not a regular file ({_kind(entry.stat(follow_symlinks=False).st_mode)})"
    try:
        target = _kind(os.stat(entry.path).st_mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        if exc.errno == errno.ENOENT:
            return "dangling symlink (its target does not exist)"
        target = "something unreadable"
    return f"symlink to {target} (not followed: the runner only reads and moves files inside the watch folder)"


def scan(root: str, exclude: frozenset[str], on_skip: Callable[[str, str], None] | None = None
         ) -> Iterator[FileState]:
    """Every regular file under ``root`` (recursively), skipping temporary names and ``exclude``.

    ``exclude`` holds absolute paths (the done/quarantine folders and the results files when
    they live inside the watch folder). Symlinks are never followed (no loops, nothing outside the
    watch folder is read); they, FIFOs, devices, sockets and unreadable folders are reported to
    ``on_skip(rel, reason)``.
    """
    prefix_len = len(root) + 1
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError as exc:  # vanished or unreadable folder: nothing to hand out from it
            if on_skip is not None and folder != root and exc.errno != errno.ENOENT:
                on_skip(folder[prefix_len:], f"cannot list folder: {exc.strerror or exc}")
            continue
        with closing(entries):
            for entry in entries:
                if is_temporary_name(entry.name) or entry.path in exclude:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        if on_skip is not None:
                            on_skip(entry.path[prefix_len:].replace(os.sep, "/"), _skip_reason(entry))
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:  # removed while scanning
                    continue
                rel = entry.path[prefix_len:].replace(os.sep, "/")
                yield FileState(rel, st.st_size, st.st_mtime_ns)


class Watcher:
    """Polls the watch folder and returns files whose size and mtime have settled."""

    def __init__(
        self,
        root: str,
        exclude: frozenset[str],
        settle_seconds: float,
        skip: Callable[[FileState], bool],
        max_pending: int,
        on_skip: Callable[[str, str], None] | None = None,
    ) -> None:
        self.root = root
        self.exclude = exclude
        self.settle_seconds = settle_seconds
        self.skip = skip  # files already reported and left in place (the journal)
        self.max_pending = max_pending
        self.on_skip = on_skip  # told about entries that are not processed (see ``scan``)
        self._pending: dict[str, _Seen] = {}
        self.queue_length = 0  # unreported files seen by the last poll
        self.queue_complete = True  # False when the last poll stopped before the end of the folder

    @property
    def idle(self) -> bool:
        """True when the last poll went through the whole folder and found nothing to do."""
        return self.queue_complete and self.queue_length == 0

    def poll(self, limit: int) -> list[FileState]:
        """Up to ``limit`` complete files; remembers the others to compare at the next poll."""
        now = time.monotonic()
        ready: list[FileState] = []
        seen: set[str] = set()
        overflow = 0
        complete = True
        with closing(scan(self.root, self.exclude, self.on_skip)) as states:
            for state in states:
                if self.skip(state):
                    continue
                prev = self._pending.get(state.rel)
                if prev is not None and (prev.size, prev.mtime_ns) == (state.size, state.mtime_ns):
                    seen.add(state.rel)
                    if now - prev.since >= self.settle_seconds:
                        ready.append(state)
                        if len(ready) >= limit:
                            complete = False
                            break
                elif prev is not None or len(self._pending) < self.max_pending:
                    self._pending[state.rel] = _Seen(state.size, state.mtime_ns, now)
                    seen.add(state.rel)
                else:
                    overflow += 1
        if complete:  # forget files that disappeared (deleted, or renamed by their writer)
            for rel in self._pending.keys() - seen:
                del self._pending[rel]
        self.queue_length = len(self._pending) + overflow
        self.queue_complete = complete
        return ready

    def seconds_to_next_ready(self) -> float | None:
        """How long until the earliest remembered file may have settled; None when none is remembered."""
        if not self._pending:
            return None
        earliest = min(seen.since for seen in self._pending.values())
        return max(0.0, earliest + self.settle_seconds - time.monotonic())

    def forget(self, rel: str) -> None:
        """Drop a file handed out (processed) or found changed (it must settle again)."""
        self._pending.pop(rel, None)
