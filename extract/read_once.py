"""Each new image file is read once: the hash pass keeps the bytes it read for the decode to use.

``extract`` must hash every new or changed file before it knows what to compute (a file touched but
unchanged needs nothing; a new path does). ``HeldBytes`` keeps the bytes the hash pass read, up to
``budget`` bytes in all, and hands each file's bytes to the decode exactly once, so the features are
computed from the very bytes whose sha256 keys the row and the file is not opened a second time.
Files beyond the budget (a folder of new images larger than it) are read again at decode time and kept
only if those bytes still have the hashed sha256, as before: memory stays bounded whatever the folder.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from edge.imageio import FileBytes

READ_BUDGET_BYTES = 256 * 1024 * 1024  # bytes of encoded files held between the hash pass and the decode


class HeldBytes:
    """``relpath -> FileBytes`` read by the hash pass, at most ``budget`` bytes held; thread-safe."""

    def __init__(self, budget: int = READ_BUDGET_BYTES):
        self.budget = budget
        self.held = 0  # bytes held now
        self._files: dict[str, FileBytes] = {}
        self._lock = threading.Lock()

    def keep(self, relpath: str, file: FileBytes) -> None:
        """Hold ``file`` for the decode, unless that would go over the budget."""
        with self._lock:
            if self.held + file.size <= self.budget and relpath not in self._files:
                self._files[relpath] = file
                self.held += file.size

    def retain(self, relpaths: Iterable[str]) -> None:
        """Drop every file but ``relpaths`` (those the run will compute)."""
        wanted = set(relpaths)
        with self._lock:
            for relpath in [p for p in self._files if p not in wanted]:
                self.held -= self._files.pop(relpath).size

    def take(self, relpath: str, sha256: str) -> FileBytes | None:
        """The held bytes of ``relpath`` if they are the content ``sha256`` names (then no longer held)."""
        with self._lock:
            file = self._files.pop(relpath, None)
            if file is not None:
                self.held -= file.size
        return file if file is not None and file.sha256 == sha256 else None

    def __len__(self) -> int:
        return len(self._files)
