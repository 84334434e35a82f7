"""Writing files whole or not at all, and hashing them: the one implementation every package uses.

    >>> with atomic_write(Path("model.onnx")) as tmp:
    ...     onnx.save(model, str(tmp))          # any writer that takes a path
    >>> write_atomic(Path("head/head.json"), text.encode())

The edge runner keeps its own copies (``edge/files.py``): it imports nothing from the other packages.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_temp_numbers = itertools.count()


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (the folder entry itself is synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_write(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write; when the block ends without error, fsync the file,
    rename it over ``path`` and fsync the folder, so ``path`` is always either the old file or the
    complete new one, even after a crash or a power cut. On error the temp file is removed and
    ``path`` is left as it was.

    The temp name is ``NAME.tmp-PID-N`` plus ``suffix`` (default: the suffix of ``path``, which
    writers such as Keras insist on).
    """
    path = Path(path)
    tail = path.suffix if suffix is None else suffix
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{next(_temp_numbers)}{tail}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see ``atomic_write``)."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
