"""The files of a store (format 2, see ``docs/store-format.md``): names, atomic writes, segments, root.

``STORE`` (e.g. ``features.h5``) is a small root file; the rows live in immutable files in the
folder ``STORE.d/`` next to it (named in the root's ``segments_folder`` attribute). The root maps
them in with HDF5 virtual datasets whose source paths are relative, so plain ``h5py`` reads the
store as one file and the folder holding both can be moved as a whole.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np

from extract.errors import StoreError
from extract.store_types import (FORMAT, FORMAT_VERSION, STR, BackboneMeta, BackboneRows, ImageTable, SegmentRef,
                                 StoreState)

CHUNK_ROWS = 16384  # rows copied or read per step: bounds memory whatever the store's size
RECORD_ATTRS = ("name", "preprocessing", "input_size", "feature_dim", "dtype", "created")


def plain_record_attrs(record: dict) -> dict:
    """The record's ``RECORD_ATTRS`` as plain HDF5 attributes (preprocessing as its mode string, as
    in version-1 records), for readers that do not parse the JSON record."""
    plain = {key: record[key] for key in RECORD_ATTRS if record.get(key) is not None}
    if isinstance(plain.get("preprocessing"), dict):
        plain["preprocessing"] = plain["preprocessing"].get("mode", "")
    return plain


def data_dir(store: Path) -> Path:
    """Committed segment files and image tables (immutable once renamed into place)."""
    return store.with_name(store.name + ".d")


def parts_dir(store: Path) -> Path:
    """Batches computed since the last checkpoint (one file per batch)."""
    return store.with_name(store.name + ".parts")


_counter = itertools.count()


def new_name(prefix: str) -> str:
    """A file name no other writer (other time, pid or call) can pick."""
    return f"{prefix}-{time.time_ns()}-{os.getpid()}-{next(_counter)}.h5"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_h5_durably(tmp: Path, write, **options) -> None:
    """Build the HDF5 file in memory with ``write(h5file)``, then write its bytes to ``tmp`` and fsync.

    HDF5 never writes to disk itself: on a full disk h5py leaves objects that fail again when
    garbage-collected (tracebacks, even a crash at exit); a plain ``write`` fails once, cleanly,
    with ``OSError(ENOSPC, filename)``. Costs one in-memory copy of the file while it is written
    (files are bounded: a checkpoint's rows, a compacted segment, the image table, the root).
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
    fsync_dir(path.parent)


def put_strings(group, name: str, values) -> None:
    """UTF-8 strings; a file name that is not valid UTF-8 (surrogate-escaped in Python) is kept
    losslessly as its original bytes, which ``strings`` turns back into the same string."""
    data = [v.encode("utf-8", "surrogateescape") for v in values]
    group.create_dataset(name, data=np.array(data, dtype=object), dtype=STR)


def strings(ds) -> list[str]:
    """Strings as written by ``put_strings`` (a non-UTF-8 file name comes back surrogate-escaped)."""
    return list(ds.asstr(errors="surrogateescape")[()]) if len(ds) else []


def attr_value(value):
    """A non-UTF-8 path (``images_root`` surrogate-escaped) is stored as its bytes; ``attrs_dict``
    turns it back into the same string."""
    if isinstance(value, str) and any("\udc80" <= c <= "\udcff" for c in value):
        return value.encode("utf-8", "surrogateescape")
    return value


def attrs_dict(attrs) -> dict:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def put_failed(group, failed: dict[str, tuple[str, str]]) -> None:
    items = sorted(failed.items())
    put_strings(group, "path", [p for p, _ in items])
    put_strings(group, "sha256", [s for _, (s, _) in items])
    put_strings(group, "reason", [r for _, (_, r) in items])


def read_failed(group) -> dict[str, tuple[str, str]]:
    return dict(zip(strings(group["path"]), zip(strings(group["sha256"]), strings(group["reason"]))))


# ---------------------------------------------------------------- segment and image-table files


def write_segment_file(path: Path, backbone: str, record: dict, paths: list[str], shas: list[str],
                       features: np.ndarray, failed: dict | None = None) -> None:
    """Write one segment atomically with ``features`` (an array, or a ``RowSource`` copied in chunks)."""

    def write(f: h5py.File) -> None:
        f.attrs["backbone"] = backbone
        f.attrs["record"] = json.dumps(record, sort_keys=True)
        n, dim = len(paths), features.shape[1]
        ds = f.create_dataset("features", shape=(n, dim), dtype=features.dtype,
                              chunks=(min(n, 256), dim) if n else None)
        if isinstance(features, np.ndarray):
            if n:
                ds[...] = features
        else:
            features.copy_into(ds)
        put_strings(f, "path", paths)
        put_strings(f, "sha256", shas)
        put_failed(f.create_group("failed"), failed or {})

    atomic_h5(path, write)


class RowSource:
    """Rows picked from segment files, copied into a new segment ``CHUNK_ROWS`` at a time.

    ``picks`` is a list of (file, row indices or None for all rows); memory stays one chunk.
    """

    def __init__(self, picks: list[tuple[Path, np.ndarray | None]], dim: int, dtype: str, dataset: str = "features"):
        self.picks, self.shape, self.dtype, self.dataset = picks, (None, dim), np.dtype(dtype), dataset

    def copy_into(self, out) -> None:
        at = 0
        for file, rows in self.picks:
            with open_segment(file) as f:
                ds = f[self.dataset]
                for start, block in iter_chunks(ds):
                    if rows is not None:
                        block = block[rows[(rows >= start) & (rows < start + len(block))] - start]
                    out[at:at + len(block)] = block
                    at += len(block)


def iter_chunks(ds, rows: int = CHUNK_ROWS):
    """``(start, block)`` over a dataset's rows, ``rows`` at a time."""
    for start in range(0, len(ds), rows):
        yield start, ds[start:start + rows]


def read_segment_keys(path: Path) -> tuple[list[str], list[str]]:
    with open_segment(path) as f:
        return strings(f["path"]), strings(f["sha256"])


def open_segment(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError):
        raise StoreError(f"segment file {path} is missing or unreadable; the store was changed while it was "
                         f"read (retry) or its folder {path.parent.name}/ was not moved with it") from None


def write_images_file(path: Path, images: ImageTable) -> None:
    def write(f: h5py.File) -> None:
        g = f.create_group("images")
        for name in ("path", "sha256", "class_name", "split"):
            put_strings(g, name, getattr(images, name))
        g.create_dataset("size", data=np.asarray(images.size, dtype=np.int64))
        g.create_dataset("mtime_ns", data=np.asarray(images.mtime_ns, dtype=np.int64))

    atomic_h5(path, write)


def read_images(store: Path, state: StoreState, columns=ImageTable.COLUMNS) -> ImageTable:
    """The image table (only ``columns``; others stay empty) from the image files the root names."""
    table = ImageTable()
    folder = store.parent / state.attrs["segments_folder"]
    for ref in images_refs(state):
        with open_segment(folder / ref.file) as f:
            g = f["images"]
            for name in columns:
                values = strings(g[name]) if g[name].dtype.kind == "O" else [int(v) for v in g[name][()]]
                getattr(table, name).extend(values)
    return table


def load_rows(store: Path, state: StoreState, backbone: str) -> BackboneRows:
    """Every row of ``backbone`` in memory, in stored order (near-duplicate search, small stores)."""
    meta = state.backbones[backbone]
    folder = store.parent / state.attrs["segments_folder"]
    paths, shas, blocks = [], [], []
    for seg in meta.segments:
        with open_segment(folder / seg.file) as f:
            paths += strings(f["path"])
            shas += strings(f["sha256"])
            blocks.append(f["features"][()])
    features = np.concatenate(blocks) if blocks else np.zeros((0, meta.dim), meta.dtype)
    return BackboneRows(dict(meta.record), paths, shas, features)


def images_refs(state: StoreState) -> list[SegmentRef]:
    return [SegmentRef(f, n) for f, n in json.loads(state.attrs.get("images_files", "[]"))]


# ---------------------------------------------------------------- the root file


def _virtual(group, name: str, folder: str, refs: list[SegmentRef], source: str, shape_tail, dtype) -> None:
    total = sum(r.rows for r in refs)
    layout = h5py.VirtualLayout(shape=(total, *shape_tail), dtype=dtype)
    start = 0
    for ref in refs:
        if ref.rows:
            layout[start:start + ref.rows] = h5py.VirtualSource(f"{folder}/{ref.file}", source,
                                                                shape=(ref.rows, *shape_tail))
        start += ref.rows
    group.create_virtual_dataset(name, layout)


def write_root(store: Path, state: StoreState, images: list[SegmentRef], summary: dict) -> dict:
    """Replace the root atomically: attributes, classes, failures and virtual datasets over the segments.

    ``summary`` holds what ``store info`` shows without reading the image table (split counts,
    copies across splits) and the parts files this commit folded in. Returns the root's attributes.
    """
    folder = data_dir(store).name
    attrs = {**state.attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "segments_folder": folder,
             "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "images_files": json.dumps([[r.file, r.rows] for r in images])}
    attrs.update({k: json.dumps(v) for k, v in summary.items()})

    def write(f: h5py.File) -> None:
        for key, value in attrs.items():
            f.attrs[key] = attr_value(value)
        put_strings(f, "classes", state.classes)
        g = f.create_group("images")
        for name, dtype in (("path", STR), ("sha256", STR), ("class_name", STR), ("split", STR),
                            ("size", np.int64), ("mtime_ns", np.int64)):
            _virtual(g, name, folder, images, f"images/{name}", (), dtype)
        put_failed(f.create_group("failed"), state.failed)
        bb = f.create_group("backbones")
        for name, meta in sorted(state.backbones.items()):
            g = bb.create_group(name)
            g.attrs["record"] = json.dumps(meta.record, sort_keys=True)
            for key, value in plain_record_attrs(meta.record).items():
                g.attrs[key] = value
            g.attrs["weights_id"] = meta.weights_id or ""
            g.attrs["segments"] = json.dumps([[s.file, s.rows] for s in meta.segments])
            _virtual(g, "features", folder, meta.segments, "features", (meta.dim,), np.dtype(meta.dtype))
            _virtual(g, "path", folder, meta.segments, "path", (), STR)
            _virtual(g, "sha256", folder, meta.segments, "sha256", (), STR)

    atomic_h5(store, write)
    return attrs


def check_format(attrs: dict, path: Path) -> None:
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is not a transferkit feature store")
    version = int(attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise StoreError(f"{path} was written by a newer transferkit (format {version})")
    if version < FORMAT_VERSION:
        raise StoreError(f"{path} is a format-{version} store; convert it once with "
                         f"`python cli.py store upgrade {path}` (format {FORMAT_VERSION} reads and writes in "
                         f"segments, so stores of millions of rows open without loading every feature)")


def read_root(path: str | Path) -> StoreState:
    """Attributes, classes, failures and backbone descriptions; no feature and no image table is read."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"feature store {path} does not exist; create it with `python cli.py extract`")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"cannot open feature store {path}: {exc}") from None
    with f:
        attrs = attrs_dict(f.attrs)
        check_format(attrs, path)
        backbones = {}
        for name, g in f["backbones"].items():
            record = json.loads(g.attrs["record"])
            segments = [SegmentRef(s, n) for s, n in json.loads(g.attrs["segments"])]
            backbones[name] = BackboneMeta(record, int(g["features"].shape[1]), str(g["features"].dtype), segments)
        return StoreState(attrs=attrs, classes=strings(f["classes"]), images=ImageTable(),
                          failed=read_failed(f["failed"]), backbones=backbones)
