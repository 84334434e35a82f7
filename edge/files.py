"""File operations for the runner: staying inside its folders, moving without overwriting
(idempotently across filesystems), making renames durable, replacing a file atomically, locking
the watch folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Iterator
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


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def folder_inside(root: str, rel_dir: str, create: bool = False) -> Iterator[int]:
    """A descriptor of the folder ``root/rel_dir``, opened one component at a time relative to the one
    before, with O_NOFOLLOW (each created first when ``create``). A component that is a symlink or not
    a folder, even one swapped in after ``inside`` checked the path, raises OSError (ELOOP/ENOTDIR)
    instead of being followed; what is then done through the descriptor (``dir_fd=``) happens in that
    very folder, whatever the tree does meanwhile (``os.makedirs`` or a path would follow a symlink)."""
    fd = os.open(root, _FOLDER_FLAGS)
    try:
        for part in [p for p in rel_dir.split("/") if p]:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            inner = os.open(part, _FOLDER_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        yield fd
    finally:
        os.close(fd)


def _same_content(a_dir: int, a: str, b_dir: int, b: str) -> bool:
    """True when the regular files ``a`` and ``b`` (symlinks not followed) hold the same bytes."""
    try:
        with open(a, "rb", opener=_opener(a_dir)) as fa, open(b, "rb", opener=_opener(b_dir)) as fb:
            if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
                return False
            while True:
                block = fa.read(1 << 20)
                if block != fb.read(1 << 20):
                    return False
                if not block:
                    return True
    except OSError:
        return False


def _opener(dir_fd: int, flags_extra: int = 0, mode: int = 0o666):
    """An ``open(opener=...)`` that opens relative to ``dir_fd`` and never follows a symlink."""
    return lambda name, flags: os.open(name, flags | flags_extra | _NO_FOLLOW, mode, dir_fd=dir_fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def _between(src_root: str, src_rel: str, dst_root: str, dst_rel: str):
    """``(source folder fd, source name, destination folder fd, destination name, done)`` for a move or
    a link (folders through ``folder_inside``, the destination's created); ``done`` when the destination
    already holds the source's bytes; FileExistsError when it holds anything else."""
    src_dir, src = os.path.split(src_rel)
    dst_dir, dst = os.path.split(dst_rel)
    with folder_inside(src_root, src_dir) as src_fd, folder_inside(dst_root, dst_dir, create=True) as dst_fd:
        done = _exists(dst_fd, dst)
        if done and not _same_content(src_fd, src, dst_fd, dst):
            raise FileExistsError(errno.EEXIST, "destination exists", dst_rel)
        yield src_fd, src, dst_fd, dst, done


def move_file(src_root: str, src_rel: str, dst_root: str, dst_rel: str) -> None:
    """Move ``src_root/src_rel`` to ``dst_root/dst_rel`` (its folders created); never overwrites
    (FileExistsError) and never follows a symlink on either side (``folder_inside``): the rename is
    made between folder descriptors (renameat), so a folder swapped for a symlink after the runner
    checked the paths cannot redirect it.

    Across filesystems the copy goes to a dot-file next to the destination first and is renamed once
    complete, so a crash never leaves a half-copied file under the final name. Idempotent: when the
    destination already holds the same bytes (a crash between the copy and the unlink), the move only
    removes the source, instead of leaving a second copy under another name.
    """
    with _between(src_root, src_rel, dst_root, dst_rel) as (src_fd, src, dst_fd, dst, done):
        if not done:
            try:
                os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                return
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            _copy_then_rename(src_fd, src, dst_fd, dst)
        os.unlink(src, dir_fd=src_fd)


def _copy_then_rename(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """Copy ``src`` to a dot-file next to ``dst`` (mode and times kept), fsync it, then rename it to
    ``dst``: a crash never leaves a half-copied file under the final name."""
    partial = f".{dst}.edge-partial"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial, dir_fd=dst_fd)  # left by a crash mid-copy
    try:
        with open(src, "rb", opener=_opener(src_fd)) as fin, \
                open(partial, "wb", opener=_opener(dst_fd, os.O_EXCL)) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            st = os.fstat(fin.fileno())
            os.fchmod(fout.fileno(), stat.S_IMODE(st.st_mode))
            fout.flush()
            os.utime(fout.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fout.fileno())
        os.rename(partial, dst, src_dir_fd=dst_fd, dst_dir_fd=dst_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(partial, dir_fd=dst_fd)
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


def link_or_copy(src_root: str, src_rel: str, dst_root: str, dst_rel: str) -> None:
    """Hard-link ``src_root/src_rel`` as ``dst_root/dst_rel`` (its folders created), or copy it where a
    link is impossible (another filesystem, links not supported); never overwrites (FileExistsError)
    and never follows a symlink (as ``move_file``).

    Idempotent: when the destination already holds the same bytes (a restart after a crash), nothing
    is done, so a re-run never leaves a second copy.
    """
    with _between(src_root, src_rel, dst_root, dst_rel) as (src_fd, src, dst_fd, dst, done):
        if done:
            return
        try:
            os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
        _copy_then_rename(src_fd, src, dst_fd, dst)
