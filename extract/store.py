"""The HDF5 feature store: reading it (format in ``docs/store-format.md``).

Writing is in ``extract.store_writer`` (segments, checkpoints, compaction), merging shard stores
in ``extract.store_merge``, converting older formats in ``extract.store_upgrade``; the names other
modules use are re-exported here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from extract.errors import StoreError
from extract.record import BackboneRecord
from extract.store_files import (data_dir, images_refs, iter_chunks, load_rows, open_segment, parts_dir, read_images,
                                 read_root, strings)
from extract.splits import describe_validation
from extract.store_merge import merge_stores
from extract.store_types import (FORMAT, FORMAT_VERSION, SPLITS, BackboneMeta, BackboneRows,
                                 FeatureSet, ImageTable, StoreState)
from extract.store_writer import StoreLock, StoreWriter, empty_state, leftovers, referenced_files, write_state

__all__ = ["FORMAT", "FORMAT_VERSION", "SPLITS", "BackboneMeta", "BackboneRows", "FeatureSet",
           "FeatureStore", "ImageTable", "StoreLock", "StoreState", "StoreWriter", "data_dir", "empty_state",
           "merge_stores", "parts_dir", "pending_batches", "read_state", "write_state"]


def pending_batches(store: str | Path) -> dict[str, int]:
    """Batch files a killed run left (name -> rows), folded in by the next `extract` on the store."""
    folder = parts_dir(Path(store))
    found = {}
    for part in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        try:
            with open_segment(part) as f:
                found[part.name] = len(f["path"])
        except StoreError:
            continue
    return found


def read_state(path: str | Path) -> StoreState:
    """The whole store in memory: root, image table and every backbone's rows (small stores, tests)."""
    state = read_root(path)
    state.images = read_images(Path(path), state)
    state.backbones = {name: load_rows(Path(path), state, name) for name in state.backbones}
    return state


class FeatureStore:
    """Read-only view of a store: opening reads the root file only (attributes, shapes, failures).

    ``root`` is that (its ``images`` left empty); ``state`` adds the image table, read on first use.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.root = read_root(self.path)
        self._state: StoreState | None = None

    @property
    def state(self) -> StoreState:
        if self._state is None:
            r = self.root
            self._state = StoreState(r.attrs, r.classes, read_images(self.path, r), r.failed, r.backbones)
        return self._state

    @property
    def backbones(self) -> list[str]:
        return sorted(self.root.backbones)

    def pending_rows(self) -> int:
        """Rows a killed run left in batch files, folded in by the next run."""
        return sum(pending_batches(self.path).values())

    def leftovers(self) -> list[str]:
        """Files a killed writer left (the next `extract` deletes them), and segment files that are missing."""
        folder = self.path.parent / self.root.attrs["segments_folder"]
        missing = [f"missing: {folder.name}/{name}" for name in sorted(referenced_files(self.root))
                   if not (folder / name).is_file()]
        return [str(p.relative_to(self.path.parent)) for p in leftovers(self.path, self.root)] + missing

    def _backbone(self, backbone: str | None) -> str:
        if not self.root.backbones:
            raise StoreError(f"{self.path} holds no features yet; run `python cli.py extract` first")
        if backbone is None:
            if len(self.root.backbones) > 1:
                raise StoreError(
                    f"{self.path} holds several backbones ({', '.join(self.backbones)}); choose one with --backbone"
                )
            return self.backbones[0]
        if backbone not in self.root.backbones:
            raise StoreError(
                f"{self.path} has no features for backbone {backbone!r}; it has: {', '.join(self.backbones)}"
            )
        return backbone

    def read(self, backbone: str | None = None, splits: tuple[str, ...] = SPLITS,
             dtype: type | None = np.float32, with_features: bool = True) -> FeatureSet:
        """The rows of ``backbone`` in ``splits``, as ``dtype`` (None: as stored, e.g. float16), in
        canonical order (split, then path).

        Only that backbone's segments are read, a chunk at a time, straight into the result: peak
        memory is the result (``n x dim x itemsize``) plus one chunk and the path strings.
        ``with_features=False``: the rows' paths, content hashes, labels and splits only (``features``
        is ``n x 0``; no feature is read).
        """
        name = self._backbone(backbone)
        meta = self.root.backbones[name]
        table = read_images(self.path, self.root, columns=("path", "class_name", "split"))
        folder = self.path.parent / self.root.attrs["segments_folder"]
        files = [open_segment(folder / seg.file) for seg in meta.segments]  # open now: compaction cannot pull them
        try:
            paths = [p for f in files for p in strings(f["path"])]
            shas = [s for f in files for s in strings(f["sha256"])]
            rank, image_rows, order = _canonical(paths, table, splits)
            dtype = np.dtype(meta.dtype if dtype is None else dtype)
            features = (_gather(files, order, len(paths), meta.dim, dtype) if with_features
                        else np.empty((len(order), 0), dtype))
        finally:
            for f in files:
                f.close()
        class_index = {c: i for i, c in enumerate(self.root.classes)}
        rows = image_rows[order]
        return FeatureSet(
            features=features,
            labels=np.asarray([class_index[table.class_name[j]] for j in rows], dtype=np.int64),
            splits=np.asarray(SPLITS, dtype=str)[rank[order]] if len(order) else np.zeros(0, dtype=str),
            paths=[paths[i] for i in order],
            class_names=list(self.root.classes),
            backbone=BackboneRecord.from_dict(meta.record),
            store_attrs=dict(self.root.attrs),
            sha256=[shas[i] for i in order],
        )

    def info(self) -> dict:
        s = self.root
        images = sum(ref.rows for ref in images_refs(s))
        counts = json.loads(s.attrs.get("split_counts", "{}"))
        return {
            "path": str(self.path),
            "format_version": s.attrs.get("format_version"),
            "images": images - len(s.failed),
            "failed": len(s.failed),
            "classes": list(s.classes),
            "split_counts": {split: int(counts.get(split, 0)) for split in SPLITS},
            "backbones": {
                name: {
                    "rows": meta.rows,
                    "dim": meta.dim,
                    "dtype": meta.dtype,
                    "weights": meta.weights_id,
                    "input_size": BackboneRecord.from_dict(meta.record).input_size,
                    "preprocessing": BackboneRecord.from_dict(meta.record).preprocessing.mode,
                    "segments": len(meta.segments),
                }
                for name, meta in sorted(s.backbones.items())
            },
            "failures": [{"path": p, "reason": r} for p, (_, r) in sorted(s.failed.items())],
            "copies_across_splits": json.loads(s.attrs.get("copies_across_splits", "[]")),
            "pending_rows": self.pending_rows(),
            "leftovers": self.leftovers(),
            "layout": s.attrs.get("layout"),
            "validation": describe_validation(dict(s.attrs)),
            "created": s.attrs.get("created"),
            "updated": s.attrs.get("updated"),
        }


def _canonical(paths: list[str], table: ImageTable, splits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split rank and image-table row of every stored row, and the selected rows in canonical order."""
    index = table.index()
    image_rows = np.fromiter((index.get(p, -1) for p in paths), dtype=np.int64, count=len(paths))
    image_rank = np.asarray([SPLITS.index(s) for s in table.split], dtype=np.int64)
    rank = np.where(image_rows >= 0, image_rank[image_rows] if len(image_rank) else -1, -1)
    selected = np.flatnonzero(np.isin(rank, [SPLITS.index(s) for s in splits]))
    # UTF-8 bytes sort in code-point order; a non-UTF-8 name sorts by its original bytes
    keys = np.asarray([paths[i].encode("utf-8", "surrogateescape") for i in selected], dtype=bytes)
    return rank, image_rows, selected[np.lexsort((keys, rank[selected]))]


def _gather(files, order: np.ndarray, total: int, dim: int, dtype: np.dtype) -> np.ndarray:
    """Rows ``order`` of the concatenated segments as ``dtype``, read chunk by chunk into place."""
    position = np.full(total, -1, dtype=np.int64)
    position[order] = np.arange(len(order))
    out = np.empty((len(order), dim), dtype=dtype)
    offset = 0
    for f in files:
        ds = f["features"]
        for start, block in iter_chunks(ds):
            where = position[offset + start:offset + start + len(block)]
            keep = where >= 0
            if keep.all():
                out[where] = block  # every row wanted: no filtered copy of the block
            else:
                out[where[keep]] = block[keep]
        offset += len(ds)
    return out
