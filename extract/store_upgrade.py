"""``upgrade_store``: convert a format-1 store (one file holding every feature) to the current format.

The version-1 file stays untouched until the new root is renamed over it, so a kill during the
upgrade leaves the old store (and unreferenced files in ``STORE.d/`` that the next upgrade or
writer deletes). Features are copied a chunk at a time; the upgrade needs free disk for one copy
of the features, once.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py

from extract.errors import StoreError
from extract.store_files import (RowSource, attrs_dict, data_dir, new_name, read_failed, strings, write_images_file,
                                 write_root, write_segment_file)
from extract.store_types import FORMAT, FORMAT_VERSION, BackboneMeta, ImageTable, SegmentRef, StoreState
from extract.store_writer import StoreLock, split_counts


def upgrade_store(path: str | Path) -> dict:
    """Rewrite the store at ``path`` in the current format; returns ``{"from": 1, "to": 2, "rows": {...}}``."""
    path = Path(path)
    version = _version(path)
    if version == FORMAT_VERSION:
        raise StoreError(f"{path} is already format {FORMAT_VERSION}; nothing to upgrade")
    if version != 1:
        raise StoreError(f"{path} is format {version}; this transferkit reads format {FORMAT_VERSION} and "
                         f"upgrades format 1 only")
    lock = StoreLock(path)
    lock.acquire()
    try:
        folder = data_dir(path)
        if folder.is_dir():
            for stale in folder.iterdir():  # a format-1 store references nothing here: an earlier try's files
                stale.unlink()
        folder.mkdir(exist_ok=True)
        state, images = _convert(path, folder)
        write_root(path, state, images, {"consumed_parts": [], "split_counts": split_counts(state),
                                         "copies_across_splits": state.images.copies_across_splits()})
    finally:
        lock.release()
    return {"from": version, "to": FORMAT_VERSION, "rows": {n: m.rows for n, m in state.backbones.items()}}


def _version(path: Path) -> int:
    if not path.is_file():
        raise StoreError(f"feature store {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise StoreError(f"{path} is not a transferkit feature store")
            return int(f.attrs.get("format_version", 0))
    except OSError as exc:
        raise StoreError(f"cannot open feature store {path}: {exc}") from None


def _convert(path: Path, folder: Path) -> tuple[StoreState, list[SegmentRef]]:
    """Write the image table and one segment per backbone of the format-1 file into ``folder``."""
    with h5py.File(path, "r") as f:
        img = f["images"]
        images = ImageTable(*(strings(img[c]) for c in ("path", "sha256", "class_name", "split")),
                            size=[int(v) for v in img["size"][()]], mtime_ns=[int(v) for v in img["mtime_ns"][()]])
        attrs = {k: v for k, v in attrs_dict(f.attrs).items() if k not in ("format_version", "updated")}
        state = StoreState(attrs, strings(f["classes"]), images, read_failed(f["failed"]), {})
        backbones = {name: (json.loads(g.attrs["record"]), strings(g["path"]), strings(g["sha256"]),
                            g["features"].shape[1], str(g["features"].dtype)) for name, g in f["backbones"].items()}
    images_name = new_name("images")
    write_images_file(folder / images_name, images)
    for name, (record, paths, shas, dim, dtype) in sorted(backbones.items()):
        segment = new_name("seg")
        source = RowSource([(path, None)], dim, dtype, dataset=f"backbones/{name}/features")
        write_segment_file(folder / segment, name, {**record, "dtype": dtype}, paths, shas, source)
        state.backbones[name] = BackboneMeta({**record, "dtype": dtype}, dim, dtype, [SegmentRef(segment, len(paths))])
    return state, [SegmentRef(images_name, len(images))]
