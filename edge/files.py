"""File operations for the runner: hashing, moving without overwriting, making renames durable."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from pathlib import PurePosixPath


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def free_destination(folder: str, rel: str, taken: set[str]) -> str:
    """``rel`` if nothing exists at ``folder/rel`` and it is not in ``taken``, else ``name (1).ext``, ..."""
    candidate, n = rel, 0
    while candidate in taken or os.path.lexists(os.path.join(folder, candidate)):
        n += 1
        original = PurePosixPath(rel)
        candidate = str(original.with_name(f"{original.stem} ({n}){original.suffix}"))
    return candidate


def move_file(src: str, dst: str) -> None:
    """Move ``src`` to ``dst``, creating folders; never overwrites (FileExistsError).

    Across filesystems the copy goes to a dot-file next to ``dst`` first and is renamed once
    complete, so a crash never leaves a half-copied file under the final name.
    """
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "destination exists", dst)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.edge-partial")
        shutil.copy2(src, partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.rename(partial, dst)
        os.unlink(src)


def fsync_dir(path: str) -> None:
    """Make renames in ``path`` durable (power loss); a no-op where folders cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


_H5_ERRNO = re.compile(r"errno = (\d+)")
_H5_FILENAME = re.compile(r"filename = '([^']*)'")


def no_space_reason(exc: BaseException) -> str | None:
    """``"no space left on device while writing FILE"`` when ``exc`` is a full disk (or quota), as
    Python's OSError or as h5py's error text (which carries ``errno = 28`` and the file name);
    None for any other error."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code is None and (match := _H5_ERRNO.search(text)):
        code = int(match.group(1))
    if code not in (errno.ENOSPC, errno.EDQUOT):
        return None
    filename = getattr(exc, "filename", None)
    if filename is None and (match := _H5_FILENAME.search(text)):
        filename = match.group(1)
    return "no space left on device" + (f" while writing {filename}" if filename else " while writing")
