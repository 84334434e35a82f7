"""The only way to change a store: lock, append batches, checkpoint them into segments, compact.

A checkpoint (``StoreWriter.commit``) costs in proportion to the rows it adds:
1. the batches computed since the last checkpoint (``STORE.parts/*.h5``, one per batch, each
   written to a temp name, fsynced and renamed, so a SIGKILL loses at most the batch in flight)
   are copied into ONE new immutable segment ``STORE.d/seg-*.h5``;
2. the image table is written to a new ``STORE.d/images-*.h5`` only when it changed (once per run);
   then segments holding rows of deleted or changed files are rewritten without them;
3. when a backbone has more than ``max_segments`` segments, the smallest neighbours are merged
   (never into a segment over ``COMPACT_MAX_BYTES``, so compaction never needs a second copy of
   the store);
4. the root ``STORE`` is written to ``STORE.tmp-PID``, fsynced and renamed over the old one:
   that rename is the commit; only then are folded batches and replaced segments deleted.
A kill before step 4 leaves the old root and its files untouched (new files are unreferenced
leftovers the next writer deletes); a kill after it leaves batches the root lists in
``consumed_parts``, which the next checkpoint deletes instead of folding twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import numpy as np

from extract.record import BackboneRecord
from extract.errors import StoreError
from extract.store_files import (RowSource, data_dir, images_refs, load_rows, new_name, open_segment, parts_dir,
                                 read_failed, read_images, read_root, read_segment_keys, strings, write_images_file,
                                 write_root, write_segment_file)
from extract.store_types import (FORMAT, FORMAT_VERSION, SPLITS, BackboneMeta, BackboneRows, ImageTable, SegmentRef,
                                 StoreState, record_weights_id)

MAX_SEGMENTS = 16
COMPACT_MAX_BYTES = 256 << 20  # a merged segment is built in memory first (full-disk safety)


def empty_state(**attrs) -> StoreState:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    base = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": now}
    return StoreState(attrs={**base, **attrs}, classes=[], images=ImageTable(), failed={}, backbones={})


class StoreLock:
    """Exclusive, crash-safe writer lock (``flock`` is released by the kernel when a process dies).

    The lock file is removed on release; a writer that locked a file just unlinked by the previous
    holder notices (its inode is no longer the path's) and locks the new file instead.
    """

    def __init__(self, store: Path):
        self.path = store.with_name(store.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise StoreError(f"{self.path.with_suffix('')} is being written by {holder}; wait for it to "
                                 f"finish or write to another --store") from None
            if self._still_at_path(fd):
                break
            os.close(fd)  # the previous holder removed this file on release: lock the new one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}".encode())
        except OSError as exc:  # e.g. a full disk: leave no lock file behind, name the file
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        self.fd = fd

    def _still_at_path(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def leftovers(store: Path, state: StoreState | None) -> list[Path]:
    """Files a killed writer left: temp files, and segment-folder files the root does not reference."""
    found = list(store.parent.glob(store.name + ".tmp-*"))
    for folder in (parts_dir(store), data_dir(store)):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if ".tmp" in p.name]
    folder = data_dir(store)
    if folder.is_dir():
        used = referenced_files(state) if state else set()
        found += [p for p in folder.glob("*.h5") if p.name not in used]
    return sorted(found)


def referenced_files(state: StoreState) -> set[str]:
    used = {r.file for r in images_refs(state)}
    for meta in state.backbones.values():
        used |= {s.file for s in meta.segments}
    return used


class StoreWriter:
    """Lock a store, append batches (``write_segment``) and checkpoint them (``commit``).

    A store is created by its first checkpoint that has something to hold, and a run that fails
    before any row reached a store it created removes it again: a failed first run leaves no store,
    no ``STORE.d/`` and no lock file.
    """

    def __init__(self, path: str | Path, max_segments: int = MAX_SEGMENTS):
        self.path = Path(path)
        self.lock = StoreLock(self.path)
        self.max_segments = max_segments
        self.state: StoreState | None = None
        self._created = False  # this session made the store: a failure before any row removes it
        self._seen: dict[str, set[str]] = {}  # backbone -> "path\0sha256" of the rows committed
        self._seq = 0
        self._images: tuple[ImageTable, list[SegmentRef], dict] | None = None  # as on disk, refs, path->sha

    def __enter__(self) -> "StoreWriter":
        self.lock.acquire()
        try:
            if self.path.exists():
                self.state = read_root(self.path)
                self.state.images = read_images(self.path, self.state)
                table = self.state.images
                self._images = (_copy(table), images_refs(self.state), table.wanted())
            for stale in leftovers(self.path, self.state):
                stale.unlink(missing_ok=True)
            self._created = not self.path.exists()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self._created and self._holds_nothing():
            self.path.unlink(missing_ok=True)
        folder = parts_dir(self.path)
        for stale in folder.glob("*.tmp-*") if folder.is_dir() else []:  # a batch a failure interrupted
            stale.unlink(missing_ok=True)
        if not self.path.exists():  # a first checkpoint interrupted before its root: nothing references these
            for stale in leftovers(self.path, None):
                stale.unlink(missing_ok=True)
        for folder in (parts_dir(self.path), data_dir(self.path)):
            try:
                folder.rmdir()  # only when empty: nothing waits in it
            except OSError:
                pass
        self.lock.release()

    def _holds_nothing(self) -> bool:
        """No feature row committed and none waiting in batch files (failures are found again)."""
        rows = self.state is not None and any(m.segments for m in self.state.backbones.values())
        waiting = parts_dir(self.path).is_dir() and any(parts_dir(self.path).glob("*.h5"))
        return not rows and not waiting

    def rows(self, backbone: str) -> BackboneRows | None:
        """Every committed row of ``backbone`` in memory (for the near-duplicate search), or None."""
        if not self.state or backbone not in self.state.backbones:
            return None
        return load_rows(self.path, self.state, backbone)

    def keys(self, backbone: str) -> tuple[list[str], list[str]]:
        """(paths, sha256s) of the committed rows of ``backbone``."""
        paths, shas = [], []
        meta = self.state.backbones.get(backbone) if self.state else None
        for seg in meta.segments if meta else []:
            p, s = read_segment_keys(data_dir(self.path) / seg.file)
            paths += p
            shas += s
        return paths, shas

    def write_segment(self, backbone: str, record: dict, paths: list[str], shas: list[str], features: np.ndarray,
                      failed: dict[str, tuple[str, str]]) -> None:
        """Keep one computed batch (and its failures) safely on disk until the next checkpoint."""
        folder = parts_dir(self.path)
        folder.mkdir(exist_ok=True)
        self._seq += 1
        write_segment_file(folder / f"{time.time_ns()}-{os.getpid()}-{self._seq:06d}.h5", backbone, record,
                           paths, shas, features, failed)

    def commit(self, state: StoreState) -> dict[str, int]:
        """Checkpoint: fold the batches into a segment, drop stale rows, compact, replace the root.

        Returns the rows dropped per backbone (files deleted or changed since they were computed).
        """
        done_before = set(json.loads(self.state.attrs.get("consumed_parts", "[]"))) if self.state else set()
        parts = sorted(parts_dir(self.path).glob("*.h5")) if parts_dir(self.path).is_dir() else []
        if self.state is None and not parts and not state.failed:
            return {}  # nothing to hold yet: no empty store is created
        data_dir(self.path).mkdir(exist_ok=True)
        fresh = [p for p in parts if p.name not in done_before]
        refs, wanted, changed = self._image_files(state)
        dropped = _prune(self.path, state, wanted) if changed else {}
        _fold(self.path, state, fresh, wanted, lambda backbone: self._committed(state, backbone))
        for name, meta in state.backbones.items():
            _compact(self.path, name, meta, self.max_segments)
        state.failed = {p: v for p, v in state.failed.items() if wanted.get(p) == v[0]}
        summary = {"consumed_parts": [p.name for p in fresh], "split_counts": split_counts(state),
                   "copies_across_splits": state.images.copies_across_splits()}
        state.attrs.update(write_root(self.path, state, refs, summary))
        for part in parts:
            part.unlink(missing_ok=True)
        for stale in leftovers(self.path, state):
            stale.unlink(missing_ok=True)
        self.state = state
        return dropped

    def _committed(self, state: StoreState, backbone: str) -> set[str]:
        """Keys of ``backbone``'s committed rows, read once per session: a row computed twice (a retried
        Ray task, a batch written again after a kill) is folded in once."""
        if backbone not in self._seen:
            meta = state.backbones.get(backbone)
            keys = set()
            for seg in meta.segments if meta else []:
                paths, shas = read_segment_keys(data_dir(self.path) / seg.file)
                keys.update(f"{p}\0{s}" for p, s in zip(paths, shas))
            self._seen[backbone] = keys
        return self._seen[backbone]

    def _image_files(self, state: StoreState) -> tuple[list[SegmentRef], dict, bool]:
        """The image files for ``state.images`` (a new one if the table changed), path->sha, changed?"""
        if self._images is not None and self._images[0] == state.images:
            return self._images[1], self._images[2], False
        name = new_name("images")
        write_images_file(data_dir(self.path) / name, state.images)
        self._images = (_copy(state.images), [SegmentRef(name, len(state.images))], state.images.wanted())
        return self._images[1], self._images[2], True


def _copy(table: ImageTable) -> ImageTable:
    return ImageTable(*(list(getattr(table, c)) for c in ImageTable.COLUMNS))


def split_counts(state: StoreState) -> dict[str, int]:
    """Images per split, failed ones left out (kept in the root so `store info` needs no table)."""
    counts = dict.fromkeys(SPLITS, 0)
    for p, split in zip(state.images.path, state.images.split):
        if p not in state.failed:
            counts[split] += 1
    return counts


def _fold(store: Path, state: StoreState, parts: list[Path], wanted: dict[str, str], committed) -> None:
    """Copy the rows of ``parts`` that match the image table and are not in the store yet (``committed(backbone)``:
    the keys already there, updated here) into one new segment per backbone."""
    picked: dict[str, list] = {}  # backbone -> [(file, rows, paths, shas)]
    for part in parts:
        with open_segment(part) as f:
            backbone, record = f.attrs["backbone"], json.loads(f.attrs["record"])
            paths, shas = strings(f["path"]), strings(f["sha256"])
            state.failed.update(read_failed(f["failed"]))
            dim, dtype = f["features"].shape[1], str(f["features"].dtype)
        meta = state.backbones.get(backbone)
        if meta is None:
            meta = state.backbones[backbone] = BackboneMeta(record, dim, dtype, [])
        if meta.weights_id != record_weights_id(record):
            continue  # a batch from other weights than the store's: never mixed in
        seen = committed(backbone)
        keep = []
        for i, (p, s) in enumerate(zip(paths, shas)):
            if wanted.get(p) == s and f"{p}\0{s}" not in seen:
                seen.add(f"{p}\0{s}")
                keep.append(i)
        keep = np.asarray(keep, dtype=np.int64)
        if len(keep):
            picked.setdefault(backbone, []).append((part, keep, [paths[i] for i in keep], [shas[i] for i in keep]))
    for backbone, picks in picked.items():
        meta = state.backbones[backbone]
        _write_picks(store, backbone, meta, picks)
    for name in [n for n, m in state.backbones.items() if not m.segments]:
        del state.backbones[name]


def _write_picks(store: Path, backbone: str, meta: BackboneMeta, picks: list) -> None:
    """One new segment (appended to ``meta``) from rows picked out of segment or batch files."""
    paths = [p for pick in picks for p in pick[2]]
    shas = [s for pick in picks for s in pick[3]]
    name = new_name("seg")
    source = RowSource([(file, rows) for file, rows, _, _ in picks], meta.dim, meta.dtype)
    write_segment_file(data_dir(store) / name, backbone, meta.record, paths, shas, source)
    meta.segments.append(SegmentRef(name, len(paths)))


def _prune(store: Path, state: StoreState, wanted: dict[str, str]) -> dict[str, int]:
    """Rewrite segments holding rows of deleted or changed files (or a second row for a path) without them."""
    dropped = {}
    folder = data_dir(store)
    for backbone, meta in state.backbones.items():
        keys = [read_segment_keys(folder / seg.file) for seg in meta.segments]
        last = {}
        for k, (paths, shas) in enumerate(keys):
            for i, (p, s) in enumerate(zip(paths, shas)):
                if wanted.get(p) == s:
                    last[p] = (k, i)
        kept_segments, dropped[backbone] = [], 0
        for k, (seg, (paths, shas)) in enumerate(zip(meta.segments, keys)):
            keep = np.asarray([i for i, p in enumerate(paths) if last.get(p) == (k, i)], dtype=np.int64)
            dropped[backbone] += seg.rows - len(keep)
            if len(keep) == seg.rows:
                kept_segments.append(seg)
            elif len(keep):
                part = BackboneMeta(meta.record, meta.dim, meta.dtype, [])
                _write_picks(store, backbone, part, [(folder / seg.file, keep, [paths[i] for i in keep],
                                                     [shas[i] for i in keep])])
                kept_segments += part.segments
        meta.segments = kept_segments
    for name in [n for n, m in state.backbones.items() if not m.segments]:
        del state.backbones[name]
    return dropped


def _compact(store: Path, backbone: str, meta: BackboneMeta, max_segments: int) -> None:
    """Merge the smallest neighbouring segments until at most ``max_segments`` remain (size-capped)."""
    row_bytes = meta.dim * np.dtype(meta.dtype).itemsize
    folder = data_dir(store)
    while len(meta.segments) > max_segments:
        sizes = [a.rows + b.rows for a, b in zip(meta.segments, meta.segments[1:])]
        k = int(np.argmin(sizes))
        if sizes[k] * row_bytes > COMPACT_MAX_BYTES:
            return
        pair = meta.segments[k:k + 2]
        keys = [read_segment_keys(folder / s.file) for s in pair]
        merged = BackboneMeta(meta.record, meta.dim, meta.dtype, [])
        _write_picks(store, backbone, merged,
                     [(folder / s.file, None, p, h) for s, (p, h) in zip(pair, keys)])
        meta.segments[k:k + 2] = merged.segments


def as_record_dict(record: BackboneRecord | dict) -> dict:
    """The JSON form of a backbone record, as the store's files keep it."""
    return record.to_dict() if isinstance(record, BackboneRecord) else dict(record)


def write_state(path: str | Path, state: StoreState) -> None:
    """Create a store from an in-memory state whose backbones are ``BackboneRows`` (small stores, tests)."""
    with StoreWriter(path) as writer:
        target = StoreState(dict(state.attrs), list(state.classes), state.images, dict(state.failed), {})
        for name, rows in sorted(state.backbones.items()):
            record = {**as_record_dict(rows.record), "dtype": str(rows.features.dtype)}
            writer.write_segment(name, record, rows.path, rows.sha256, rows.features, {})
        writer.commit(target)

