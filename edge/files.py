"""File operations for the runner: staying inside its folders, moving without overwriting
(idempotently across filesystems), making renames durable, replacing a file atomically, locking
the watch folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import filecmp
import os
import re
import shutil
from pathlib import PurePosixPath


def free_destination(folder: str, rel: str, taken: set[str]) -> str:
    """``rel`` if nothing exists at ``folder/rel`` and it is not in ``taken``, else ``name (1).ext``, ..."""
    candidate, n = rel, 0
    while candidate in taken or os.path.lexists(os.path.join(folder, candidate)):
        n += 1
        original = PurePosixPath(rel)
        candidate = str(original.with_name(f"{original.stem} ({n}){original.suffix}"))
    return candidate


def inside(root: str, rel: str) -> str | None:
    """``root/rel`` if ``rel`` is a plain relative path (no ``..``, ``.``, empty or absolute parts, no
    NUL) whose existing components below ``root`` are not symlinks; else None.

    Paths read back from results.jsonl or found in the tree go through this before the runner
    reads, moves or creates anything, so neither a forged line nor a symlinked folder (in the watch
    folder or in --done) can lead it outside the folders it owns.
    """
    if not isinstance(rel, str) or not rel or "\0" in rel or rel.startswith("/"):
        return None
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    path = root
    for part in parts:
        path = os.path.join(path, part)
        if os.path.islink(path):
            return None
    return path


def make_folders_inside(root: str, rel_dir: str) -> None:
    """Create ``root/rel_dir`` one level at a time, refusing any component that is a symlink or not a
    folder (``os.makedirs`` would follow a symlinked component out of ``root``)."""
    path = root
    for part in [p for p in rel_dir.split("/") if p]:
        path = os.path.join(path, part)
        try:
            os.mkdir(path)
        except FileExistsError:
            if os.path.islink(path) or not os.path.isdir(path):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder the runner owns", path) from None


def _same_content(a: str, b: str) -> bool:
    try:
        return os.path.getsize(a) == os.path.getsize(b) and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def move_file(src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` (whose folder exists); never overwrites (FileExistsError).

    Across filesystems the copy goes to a dot-file next to ``dst`` first and is renamed once
    complete, so a crash never leaves a half-copied file under the final name. Idempotent: when
    ``dst`` already holds the same bytes (a crash between the copy and the unlink), the move only
    removes ``src``, instead of leaving a second copy under another name.
    """
    if os.path.lexists(dst):
        if not os.path.islink(dst) and _same_content(src, dst):
            os.unlink(src)
            return
        raise FileExistsError(errno.EEXIST, "destination exists", dst)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_then_rename(src, dst)
        os.unlink(src)


def _copy_then_rename(src: str, dst: str) -> None:
    """Copy ``src`` to a dot-file next to ``dst``, fsync it, then rename it to ``dst``: a crash
    never leaves a half-copied file under the final name."""
    partial = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.edge-partial")
    try:
        shutil.copy2(src, partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.rename(partial, dst)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


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


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole or not at all: a dot-file beside it is written, fsynced and
    renamed over it, then the folder is fsynced (readers never see a half-written file). The edge's
    own copy of ``extract.files.write_atomic``: edge/ imports nothing from the other packages."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(folder or ".")


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


class FolderLocked(Exception):
    """Another runner watches this folder, a folder inside it, or a folder containing it."""


def lock_watch_folder(watch: str) -> list[int]:
    """Lock ``watch`` (exclusive ``flock`` on the folder itself) and every folder above it (shared).

    Two runners on one folder, or on a folder and a subfolder of it, would classify the same files
    (two lines each) whatever their --results files: the second one is refused. Runners on sibling
    folders share the locks on their common parents. Nothing is written into the watch folder;
    the kernel drops the locks when the process ends. Returns the descriptors to keep open.
    """
    held: list[int] = []
    chain = [watch]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    try:
        for depth, folder in enumerate(chain):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            held.append(fd)
            fcntl.flock(fd, (fcntl.LOCK_EX if depth == 0 else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        for fd in held:
            os.close(fd)
        raise FolderLocked(f"another edge runner is watching {watch}, a folder inside it or a folder "
                           f"containing it") from None
    return held


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` as ``dst`` (whose folder exists), or copy it where a link is impossible
    (another filesystem, links not supported); never overwrites (FileExistsError).

    Idempotent: when ``dst`` already holds the same bytes (a restart after a crash), nothing is
    done, so a re-run never leaves a second copy.
    """
    if os.path.lexists(dst):
        if not os.path.islink(dst) and _same_content(src, dst):
            return
        raise FileExistsError(errno.EEXIST, "destination exists", dst)
    try:
        os.link(src, dst, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    _copy_then_rename(src, dst)
