"""Synthetic feature stores built through the store's own writer (tests and bench/store_scale.py).

Row features are a pure function of the image path, so stores built in any order, in any number
of checkpoints or shards must read back bit for bit the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from extract.dataset import assign_split
from extract.splits import SplitSettings
from extract.store import ImageTable, StoreWriter, empty_state

SPLIT_SETTINGS = {"validation_split": 0.2, "test_split": 0.2, "seed": 0, "split_group": ""}


def record(dim: int, dtype: str = "float16", weights_id: str = "synthetic", input_size: int = 32) -> dict:
    """A backbone record (extract/record.py, as JSON) for made-up features of a backbone named "synthetic"."""
    return {"record_version": 2, "name": "synthetic", "constructor": "bench:synthetic", "weights_source": "none",
            "preprocessing": {"mode": "tf"}, "input_size": input_size, "feature_dim": dim, "dtype": dtype,
            "weights": {"kind": "none", "id": weights_id, "sha256": None, "file": None, "seed": 0}}


def image_table(rows: int, classes: int = 3) -> ImageTable:
    """``rows`` images named ``c<k>/img_<i>.jpg`` with hash splits, as `extract` would record them."""
    table = ImageTable()
    for i in range(rows):
        path = f"c{i % classes}/img_{i:07d}.jpg"
        table.path.append(path)
        table.sha256.append(hashlib.sha256(path.encode()).hexdigest())
        table.class_name.append(f"c{i % classes}")
        table.split.append(assign_split(path, SplitSettings(**SPLIT_SETTINGS)))
        table.size.append(1000)
        table.mtime_ns.append(0)
    return table


def features_of(paths: list[str], dim: int, dtype: str = "float16") -> np.ndarray:
    """Deterministic features per path: a class centre plus path-seeded noise."""
    out = np.empty((len(paths), dim), dtype=dtype)
    for i, path in enumerate(paths):
        seed = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        centre = np.full(dim, 2.0 * int(path[1:path.index("/")]))
        out[i] = centre + rng.normal(0, 1, dim)
    return out


def build(store: Path, table: ImageTable, order: list[int], batch: int, batches_per_checkpoint: int,
          dim: int = 8, classes: int = 3, shard: str = "", max_segments: int = 16, backbones: int = 1,
          features=features_of, on_checkpoint=None) -> None:
    """Write the rows ``order`` (indices into ``table``) in batches, committing every few batches."""
    with StoreWriter(store, max_segments=max_segments) as writer:
        state = writer.state or empty_state(**SPLIT_SETTINGS, layout="class-folders", images_root="/images",
                                            shard=shard)
        state.images, state.classes = table, [f"c{k}" for k in range(classes)]
        writer.commit(state)  # folds what a killed run left, as `extract` does
        have = set(writer.keys("synthetic")[0])
        order = [i for i in order if table.path[i] not in have]
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            paths = [table.path[i] for i in rows]
            shas = [table.sha256[i] for i in rows]
            values = features(paths, dim)
            for k in range(backbones):
                name = "synthetic" if k == 0 else f"synthetic{k}"
                writer.write_segment(name, {**record(dim, str(values.dtype)), "name": name}, paths, shas, values, {})
            if (start // batch + 1) % batches_per_checkpoint == 0:
                writer.commit(state)
                if on_checkpoint:
                    on_checkpoint(len(rows) * batches_per_checkpoint)
        writer.commit(state)
