"""The HDF5 feature store (format documented in ``docs/store-format.md``).

Crash safety comes from never writing into the live file:
- the store file is only ever replaced whole (write ``STORE.tmp-PID``, fsync, ``os.replace``);
- while a job runs, each batch of computed rows goes to its own segment file in ``STORE.parts/``
  (also written to a temp name, fsynced and renamed), so a SIGKILL loses at most the batch in flight;
- checkpoints and the end of a run fold the segments into a new store file, then delete them;
  the next run folds any segments a killed run left behind.
A writer holds an exclusive ``flock`` on ``STORE.lock``; a second writer gets a clear error, and the
kernel drops the lock when a writer dies, so no stale lock survives a crash.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from extract.errors import StoreError
from extract.leak_free import ANCHORS_BACKBONE_ATTR, group_store_splits

# Store attributes that decide which split each image is in (a run may not change them silently).
DEFAULT_SPLITS = {"validation_split": 0.1, "test_split": 0.1, "seed": 0, "split_group": "", "split_group_by": "none"}

FORMAT = "transferkit-feature-store"
FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")
SPLITS = ("train", "validation", "test")


@dataclass
class ImageTable:
    """One row per image file found in the folder (failed ones included)."""

    path: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    class_name: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.path)

    def copies_across_splits(self) -> list[list[str]]:
        """Groups of byte-identical files that sit in more than one split.

        Splits are assigned per file path, so a photo saved twice under two names (common in
        scraped data sets) can land in train and in test and inflate the test score.
        """
        groups: dict[str, list[int]] = {}
        for i, sha in enumerate(self.sha256):
            if sha:  # "" is a file that could not be read: no content to compare
                groups.setdefault(sha, []).append(i)
        return [sorted(self.path[i] for i in rows) for rows in groups.values()
                if len({self.split[i] for i in rows}) > 1]

    def index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.path)}


@dataclass
class BackboneRows:
    """Features of one backbone; row i was computed from file ``path[i]`` with content ``sha256[i]``."""

    record: dict
    path: list[str]
    sha256: list[str]
    features: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


@dataclass
class StoreState:
    attrs: dict
    classes: list[str]
    images: ImageTable
    failed: dict[str, tuple[str, str]]  # path -> (sha256, reason)
    backbones: dict[str, BackboneRows]


@dataclass
class FeatureSet:
    """What heads train on: the rows of one backbone joined with the image table."""

    features: np.ndarray  # (n, dim) float32
    labels: np.ndarray  # (n,) int index into class_names
    splits: np.ndarray  # (n,) str: train / validation / test
    paths: list[str]
    class_names: list[str]
    backbone: dict  # the backbone record (name, preprocessing, input size, weights...)
    store_attrs: dict

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.splits == split
        return self.features[mask], self.labels[mask]


# ---------------------------------------------------------------- reading and writing whole files


def _strings(ds) -> list[str]:
    """Strings as written by ``_put_strings`` (a non-UTF-8 file name comes back surrogate-escaped)."""
    return list(ds.asstr(errors="surrogateescape")[()]) if len(ds) else []


def _attrs_dict(attrs) -> dict:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _check_format(f: h5py.File, path: Path) -> None:
    if f.attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is not a transferkit feature store")
    if int(f.attrs.get("format_version", 0)) > FORMAT_VERSION:
        raise StoreError(f"{path} was written by a newer transferkit (format {f.attrs['format_version']})")


def read_state(path: str | Path) -> StoreState:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"feature store {path} does not exist; create it with `python cli.py extract`")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"cannot open feature store {path}: {exc}") from None
    with f:
        _check_format(f, path)
        img = f["images"]
        images = ImageTable(
            path=_strings(img["path"]),
            sha256=_strings(img["sha256"]),
            class_name=_strings(img["class_name"]),
            split=_strings(img["split"]),
            size=[int(v) for v in img["size"][()]],
            mtime_ns=[int(v) for v in img["mtime_ns"][()]],
        )
        fl = f["failed"]
        failed = dict(zip(_strings(fl["path"]), zip(_strings(fl["sha256"]), _strings(fl["reason"]))))
        backbones = {}
        for name, group in f["backbones"].items():
            backbones[name] = BackboneRows(
                record=json.loads(group.attrs["record"]),
                path=_strings(group["path"]),
                sha256=_strings(group["sha256"]),
                features=group["features"][()],
            )
        return StoreState(
            attrs=_attrs_dict(f.attrs), classes=_strings(f["classes"]), images=images, failed=failed,
            backbones=backbones,
        )


def empty_state(**attrs) -> StoreState:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    base = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": now}
    return StoreState(attrs={**base, **attrs}, classes=[], images=ImageTable(), failed={}, backbones={})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_h5_durably(tmp: Path, write, **options) -> None:
    """Build the HDF5 file in memory with ``write(h5file)``, then write its bytes to ``tmp`` and fsync.

    HDF5 never writes to disk itself: on a full disk h5py leaves objects that fail again when
    garbage-collected (tracebacks, even a crash at exit); a plain ``write`` fails once, cleanly,
    with ``OSError(ENOSPC, filename)``. Costs one in-memory copy of the file while it is written.
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", **options) as f:
        write(f)
    try:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(tmp)) from None


def atomic_h5(path: Path, write) -> None:
    """Call ``write(h5file)`` for a temp file, fsync it and rename it over ``path``."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write_h5_durably(tmp, write, libver="latest")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _put_strings(group, name: str, values: list[str]) -> None:
    """UTF-8 strings; a file name that is not valid UTF-8 (surrogate-escaped in Python) is kept
    losslessly as its original bytes, which ``_strings`` turns back into the same string."""
    data = [v.encode("utf-8", "surrogateescape") for v in values]
    group.create_dataset(name, data=np.array(data, dtype=object), dtype=STR)


def _attr_value(value):
    """A non-UTF-8 path (``images_root`` surrogate-escaped) is stored as its bytes; ``_attrs_dict``
    turns it back into the same string."""
    if isinstance(value, str) and any("\udc80" <= c <= "\udcff" for c in value):
        return value.encode("utf-8", "surrogateescape")
    return value


def write_state(path: str | Path, state: StoreState) -> None:
    path = Path(path)

    def write(f: h5py.File) -> None:
        attrs = dict(state.attrs)
        attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for key, value in attrs.items():
            f.attrs[key] = _attr_value(value)
        _put_strings(f, "classes", state.classes)
        img = f.create_group("images")
        for name in ("path", "sha256", "class_name", "split"):
            _put_strings(img, name, getattr(state.images, name))
        img.create_dataset("size", data=np.asarray(state.images.size, dtype=np.int64))
        img.create_dataset("mtime_ns", data=np.asarray(state.images.mtime_ns, dtype=np.int64))
        fl = f.create_group("failed")
        items = sorted(state.failed.items())
        _put_strings(fl, "path", [p for p, _ in items])
        _put_strings(fl, "sha256", [s for _, (s, _) in items])
        _put_strings(fl, "reason", [r for _, (_, r) in items])
        bb = f.create_group("backbones")
        for name, rows in sorted(state.backbones.items()):
            g = bb.create_group(name)
            g.attrs["record"] = json.dumps(rows.record, sort_keys=True)
            for key in ("name", "preprocessing", "input_size", "feature_dim", "dtype", "created"):
                if key in rows.record:
                    g.attrs[key] = rows.record[key]
            g.attrs["weights_id"] = rows.record.get("weights", {}).get("id", "")
            chunk_rows = max(1, min(len(rows.path), 256))
            g.create_dataset("features", data=rows.features, chunks=(chunk_rows, rows.features.shape[1]))
            _put_strings(g, "path", rows.path)
            _put_strings(g, "sha256", rows.sha256)

    atomic_h5(path, write)


# ---------------------------------------------------------------- reading for users


class FeatureStore:
    """Read-only view of a store file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state = read_state(self.path)

    @property
    def backbones(self) -> list[str]:
        return sorted(self.state.backbones)

    def pending_rows(self) -> int:
        """Rows a killed run left in segments, merged by the next run."""
        return sum(seg.rows for seg in read_segments(self.path))

    def read(self, backbone: str | None = None) -> FeatureSet:
        if not self.state.backbones:
            raise StoreError(f"{self.path} holds no features yet; run `python cli.py extract` first")
        if backbone is None:
            if len(self.state.backbones) > 1:
                raise StoreError(
                    f"{self.path} holds several backbones ({', '.join(self.backbones)}); choose one with --backbone"
                )
            backbone = self.backbones[0]
        if backbone not in self.state.backbones:
            raise StoreError(
                f"{self.path} has no features for backbone {backbone!r}; it has: {', '.join(self.backbones)}"
            )
        rows = self.state.backbones[backbone]
        images = self.state.images
        index = images.index()
        class_index = {c: i for i, c in enumerate(self.state.classes)}
        keep = [i for i, p in enumerate(rows.path) if p in index]
        image_rows = [index[rows.path[i]] for i in keep]
        return FeatureSet(
            features=np.asarray(rows.features[keep], dtype=np.float32),
            labels=np.asarray([class_index[images.class_name[j]] for j in image_rows], dtype=np.int64),
            splits=np.asarray([images.split[j] for j in image_rows], dtype=object).astype(str),
            paths=[rows.path[i] for i in keep],
            class_names=list(self.state.classes),
            backbone=dict(rows.record),
            store_attrs=dict(self.state.attrs),
        )

    def info(self) -> dict:
        s = self.state
        failed = set(s.failed)
        splits = dict.fromkeys(SPLITS, 0)
        for p, split in zip(s.images.path, s.images.split):
            if p not in failed:
                splits[split] += 1
        return {
            "path": str(self.path),
            "images": len(s.images) - len(failed),
            "failed": len(failed),
            "classes": list(s.classes),
            "splits": splits,
            "backbones": {
                name: {
                    "rows": len(rows.path),
                    "dim": rows.dim,
                    "dtype": str(rows.features.dtype),
                    "weights": rows.record.get("weights", {}).get("id"),
                    "input_size": rows.record.get("input_size"),
                    "preprocessing": rows.record.get("preprocessing"),
                }
                for name, rows in sorted(s.backbones.items())
            },
            "failures": [{"path": p, "reason": r} for p, (_, r) in sorted(s.failed.items())],
            "copies_across_splits": s.images.copies_across_splits(),
            "pending_rows": self.pending_rows(),
            "layout": s.attrs.get("layout"),
            "created": s.attrs.get("created"),
            "updated": s.attrs.get("updated"),
        }


# ---------------------------------------------------------------- segments and the writer lock


@dataclass
class Segment:
    path: Path
    backbone: str
    record: dict
    rows_path: list[str]
    rows_sha256: list[str]
    features: np.ndarray
    failed: dict[str, tuple[str, str]]

    @property
    def rows(self) -> int:
        return len(self.rows_path)


def parts_dir(store: Path) -> Path:
    return store.with_name(store.name + ".parts")


def read_segments(store: Path) -> list[Segment]:
    folder = parts_dir(Path(store))
    if not folder.is_dir():
        return []
    segments = []
    for seg_path in sorted(folder.glob("*.h5")):
        try:
            with h5py.File(seg_path, "r") as f:
                fl = f["failed"]
                segments.append(
                    Segment(
                        path=seg_path,
                        backbone=f.attrs["backbone"],
                        record=json.loads(f.attrs["record"]),
                        rows_path=_strings(f["path"]),
                        rows_sha256=_strings(f["sha256"]),
                        features=f["features"][()],
                        failed=dict(zip(_strings(fl["path"]), zip(_strings(fl["sha256"]), _strings(fl["reason"])))),
                    )
                )
        except (OSError, KeyError):  # cannot happen for renamed segments; skip rather than stop
            continue
    return segments


class StoreLock:
    """Exclusive, crash-safe writer lock (``flock`` is released by the kernel when a process dies).

    The lock file is removed on release (while still locked), so no ``.lock`` is left behind; a
    process that opened the file just before it was removed notices that its file is no longer
    the one at the path and tries again, so two writers never both believe they hold the lock.
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
                raise StoreError(
                    f"{self.path.with_suffix('')} is being written by {holder}; wait for it to finish "
                    f"or write to another --store"
                ) from None
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


class StoreWriter:
    """The only way to change a store: lock, append segments, fold them in atomically.

    A run that fails before any row reached a store it created removes that store again, so a
    failed first run (bad weights, disk full...) leaves nothing behind.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = StoreLock(self.path)
        self._seq = 0
        self._created = False

    def __enter__(self) -> "StoreWriter":
        self.lock.acquire()
        for stale in self.path.parent.glob(self.path.name + ".tmp-*"):
            stale.unlink(missing_ok=True)
        parts = parts_dir(self.path)
        if parts.is_dir():
            for stale in parts.glob("*.tmp"):
                stale.unlink(missing_ok=True)
        self._created = not self.path.exists()
        self.state = read_state(self.path) if self.path.exists() else None
        return self

    def __exit__(self, exc_type, *exc) -> None:
        parts = parts_dir(self.path)
        if parts.is_dir():
            for stale in parts.glob("*.tmp"):  # a segment a failure interrupted
                stale.unlink(missing_ok=True)
        try:
            parts.rmdir()  # only when empty: everything was folded in
        except OSError:
            pass
        if exc_type is not None and self._created and self._holds_nothing():
            self.path.unlink(missing_ok=True)
        self.lock.release()

    def _holds_nothing(self) -> bool:
        """No feature row in the store file or in pending segments (failures are found again)."""
        rows = self.state is not None and any(len(r.path) for r in self.state.backbones.values())
        return not rows and not parts_dir(self.path).exists()

    def write_segment(
        self, backbone: str, record: dict, paths: list[str], shas: list[str], features: np.ndarray,
        failed: dict[str, tuple[str, str]],
    ) -> None:
        folder = parts_dir(self.path)
        folder.mkdir(exist_ok=True)
        self._seq += 1
        final = folder / f"{time.time_ns()}-{os.getpid()}-{self._seq:06d}.h5"
        tmp = final.with_suffix(".tmp")

        def write(f: h5py.File) -> None:
            f.attrs["backbone"] = backbone
            f.attrs["record"] = json.dumps(record, sort_keys=True)
            f.create_dataset("features", data=features)
            _put_strings(f, "path", paths)
            _put_strings(f, "sha256", shas)
            fl = f.create_group("failed")
            items = sorted(failed.items())
            _put_strings(fl, "path", [p for p, _ in items])
            _put_strings(fl, "sha256", [s for _, (s, _) in items])
            _put_strings(fl, "reason", [r for _, (_, r) in items])

        write_h5_durably(tmp, write)
        os.replace(tmp, final)
        _fsync_dir(folder)

    def commit(self, state: StoreState) -> dict[str, int]:
        """Fold every segment into ``state``, keep rows matching the image table, write, drop segments.

        Returns the rows dropped per backbone (files deleted or changed since they were computed).
        """
        segments = read_segments(self.path)
        fold_segments(state, segments)
        dropped = prune(state)
        write_state(self.path, state)
        for seg in segments:
            seg.path.unlink(missing_ok=True)
        self.state = state
        return dropped


def fold_segments(state: StoreState, segments: list[Segment]) -> None:
    """Add segment rows to ``state``; a segment from other weights than the store's is ignored."""
    for seg in segments:
        state.failed.update(seg.failed)
        if not seg.rows:
            continue
        current = state.backbones.get(seg.backbone)
        if current is None:
            state.backbones[seg.backbone] = BackboneRows(
                record=seg.record, path=list(seg.rows_path), sha256=list(seg.rows_sha256), features=seg.features
            )
            continue
        if current.record.get("weights", {}).get("id") != seg.record.get("weights", {}).get("id"):
            continue
        current.path += seg.rows_path
        current.sha256 += seg.rows_sha256
        current.features = np.concatenate([current.features, seg.features.astype(current.features.dtype)])


def prune(state: StoreState) -> dict[str, int]:
    """Keep only rows whose (path, sha256) is in the image table, one per path (the last wins).

    Returns the number of rows dropped per backbone (deleted or changed files).
    """
    wanted = dict(zip(state.images.path, state.images.sha256))
    dropped = {}
    for name, rows in state.backbones.items():
        last: dict[str, int] = {}
        for i, (p, s) in enumerate(zip(rows.path, rows.sha256)):
            if wanted.get(p) == s:
                last[p] = i
        keep = sorted(last.values())
        dropped[name] = len(rows.path) - len(keep)
        rows.path = [rows.path[i] for i in keep]
        rows.sha256 = [rows.sha256[i] for i in keep]
        rows.features = rows.features[keep]
    state.failed = {p: v for p, v in state.failed.items() if wanted.get(p) == v[0]}
    return dropped


def _regroup_merged(merged: StoreState, first: StoreState) -> None:
    """Shards found their near-duplicate groups each on its own rows: find them again on all rows."""
    if merged.attrs.get("split_group_by") != "near-duplicates" or not merged.backbones:
        return
    backbone = first.attrs.get(ANCHORS_BACKBONE_ATTR) or sorted(merged.backbones)[0]
    settings = {**DEFAULT_SPLITS, **{k: merged.attrs[k] for k in DEFAULT_SPLITS if k in merged.attrs}}
    group_store_splits(merged, backbone, settings)


def merge_stores(out: str | Path, inputs: list[str | Path]) -> StoreState:
    """Merge shard stores (``extract --shard I/N``) into one store; refuses mismatched settings."""
    states = [read_state(p) for p in inputs]
    if not states:
        raise StoreError("nothing to merge: give at least one store")
    keys = (*DEFAULT_SPLITS, "layout")
    first = states[0]
    for p, s in zip(inputs[1:], states[1:]):
        diff = [k for k in keys if s.attrs.get(k) != first.attrs.get(k)]
        if diff:
            raise StoreError(f"{p} was extracted with other {', '.join(diff)} than {inputs[0]}; cannot merge")
    merged = empty_state(**{k: first.attrs[k] for k in keys if k in first.attrs},
                         images_root=first.attrs.get("images_root", ""), shard="")
    merged.classes = sorted({c for s in states for c in s.classes})
    seen: set[str] = set()
    for s in states:
        for i, p in enumerate(s.images.path):
            if p in seen:
                continue
            seen.add(p)
            for name in ("path", "sha256", "class_name", "split", "size", "mtime_ns"):
                getattr(merged.images, name).append(getattr(s.images, name)[i])
        merged.failed.update(s.failed)
        for name, rows in s.backbones.items():
            current = merged.backbones.get(name)
            if current is None:
                merged.backbones[name] = BackboneRows(dict(rows.record), list(rows.path), list(rows.sha256),
                                                      rows.features)
                continue
            if current.record.get("weights", {}).get("id") != rows.record.get("weights", {}).get("id"):
                raise StoreError(f"shards hold {name} features from different weights; cannot merge")
            current.path += rows.path
            current.sha256 += rows.sha256
            current.features = np.concatenate([current.features, rows.features.astype(current.features.dtype)])
    prune(merged)
    _regroup_merged(merged, first)
    out = Path(out)
    with StoreWriter(out):
        write_state(out, merged)
    return merged
