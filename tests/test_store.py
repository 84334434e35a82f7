"""Store format 2: canonical order, merge, leftovers, plain-h5py reading, upgrade from format 1."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from bench.store_synthetic import SPLIT_SETTINGS, build, features_of, image_table, record
from classify.heads import make_head
from cli import cli
from extract.errors import StoreError
from extract.store import FeatureStore, StoreWriter, data_dir, merge_stores, parts_dir

ROWS, DIM = 90, 8
DOCS = Path(__file__).resolve().parents[1] / "docs" / "store-format.md"


def _one_run(path: Path) -> Path:
    build(path, image_table(ROWS), list(range(ROWS)), batch=ROWS, batches_per_checkpoint=1)
    return path


def _shards(tmp_path: Path, count: int = 3) -> list[Path]:
    table = image_table(ROWS)
    shards = []
    for k in range(count):
        rows = [i for i in range(ROWS) if i % count == k]
        sub = type(table)(*([getattr(table, c)[i] for i in rows] for c in table.COLUMNS))
        shard = tmp_path / f"shard{k}.h5"
        build(shard, sub, list(range(len(rows))), batch=7, batches_per_checkpoint=2, shard=f"{k}/{count}")
        shards.append(shard)
    return shards


def _same_read(a: Path, b: Path) -> None:
    x, y = FeatureStore(a).read(), FeatureStore(b).read()
    assert x.paths == y.paths
    assert np.array_equal(x.features, y.features) and np.array_equal(x.labels, y.labels)
    assert x.splits.tolist() == y.splits.tolist()


def test_every_way_of_building_reads_the_same_rows_and_fits_the_same_head(tmp_path):
    one = _one_run(tmp_path / "one.h5")
    # resumed runs: rows arrive in another order, in many checkpoints, over three writer sessions
    shuffled = list(np.random.default_rng(5).permutation(ROWS))
    resumed = tmp_path / "resumed.h5"
    for part in (shuffled[:20], shuffled[20:55], shuffled[55:]):
        build(resumed, image_table(ROWS), part, batch=4, batches_per_checkpoint=3, max_segments=3)
    merged = tmp_path / "merged.h5"
    merge_stores(merged, list(reversed(_shards(tmp_path))))
    assert FeatureStore(resumed).info()["backbones"]["synthetic"]["segments"] <= 3  # compacted
    reads = [FeatureStore(p).read() for p in (one, resumed, merged)]
    assert reads[0].paths == sorted(reads[0].paths, key=lambda p: (["train", "validation", "test"].index(
        reads[0].splits[reads[0].paths.index(p)]), p))
    for other in (resumed, merged):
        _same_read(one, other)
    heads = []
    for features in reads:
        X, y = features.subset("train")
        heads.append(make_head("mlp", seed=0).fit(X, y).network())
    for layers in heads[1:]:
        for (w, b), (w0, b0) in zip(layers, heads[0]):
            assert np.array_equal(w, w0) and np.array_equal(b, b0)
    test_only = FeatureStore(one).read(splits=("test",))
    expected = [p for p, s in zip(reads[0].paths, reads[0].splits) if s == "test"]
    assert set(test_only.splits) == {"test"} and test_only.paths == expected


def test_merge_is_a_view_and_survives_the_shards(tmp_path):
    shards = _shards(tmp_path)
    out = tmp_path / "merged.h5"
    merge_stores(out, shards)
    linked = sorted(data_dir(out).glob("*.h5"))
    shard_files = [p for s in shards for p in data_dir(s).glob("*.h5")]
    assert len(linked) == len(shard_files) and all(os.stat(p).st_nlink == 2 for p in linked)
    before = FeatureStore(out).read()
    for shard in shards:  # the shards go away; the merged store keeps its (hard-linked) files
        shard.unlink()
        shutil.rmtree(data_dir(shard))
    after = FeatureStore(out).read()
    assert after.paths == before.paths and np.array_equal(after.features, before.features)
    copied = _shards(tmp_path / "again")
    merge_stores(tmp_path / "copied.h5", copied, copy=True)
    assert all(os.stat(p).st_nlink == 1 for p in data_dir(tmp_path / "copied.h5").glob("*.h5"))
    _same_read(out, tmp_path / "copied.h5")


def _write_store(path: Path, rows: int = 12, start: int = 0, **changes) -> Path:
    """A one-checkpoint store of images start..start+rows; ``changes`` alter classes, split settings, record or
    image root."""
    full = image_table(start + rows)
    table = type(full)(*(getattr(full, c)[start:] for c in full.COLUMNS))
    with StoreWriter(path) as writer:
        settings = {**SPLIT_SETTINGS, **changes.get("splits", {})}
        state = writer.state or __import__("extract.store", fromlist=["empty_state"]).empty_state(
            **settings, layout="class-folders", images_root=changes.get("root", "/images"), shard="")
        state.images = table
        state.classes = changes.get("classes", ["c0", "c1", "c2"])
        rec = {**record(DIM), **changes.get("record", {})}
        writer.write_segment("synthetic", rec, table.path, table.sha256, features_of(table.path, DIM), {})
        writer.commit(state)
    return path


@pytest.mark.parametrize("change, message", [
    ({"classes": ["c0", "c1", "other"]}, "has classes"),
    ({"splits": {"seed": 7}}, "other seed"),
    ({"record": {"weights": {"id": "other-weights"}}}, "weights other-weights"),
    ({"record": {"input_size": 64}}, "input_size 64"),
    ({"root": "/elsewhere"}, "different image folders"),
])
def test_merge_refuses_shards_that_differ(tmp_path, change, message):
    a = _write_store(tmp_path / "a.h5")
    b = _write_store(tmp_path / "b.h5", **change)
    with pytest.raises(StoreError, match=message):
        merge_stores(tmp_path / "out.h5", [a, b])
    assert not (tmp_path / "out.h5").exists()


def test_merge_refusals_that_protect_data(tmp_path):
    shards = _shards(tmp_path)
    out = tmp_path / "out.h5"
    with pytest.raises(StoreError, match="given twice"):
        merge_stores(out, [shards[0], shards[1], tmp_path / "." / "shard0.h5"])
    merge_stores(out, shards)
    with pytest.raises(StoreError, match="already exists; pass --force"):
        merge_stores(out, shards[:1])
    assert FeatureStore(out).info()["backbones"]["synthetic"]["rows"] == ROWS  # untouched
    merge_stores(out, shards[:2], force=True)
    assert FeatureStore(out).info()["backbones"]["synthetic"]["rows"] == 60
    assert FeatureStore(out).leftovers() == []  # the replaced store's links are gone
    with pytest.raises(StoreError, match="is one of the shards"):
        merge_stores(shards[1], shards, force=True)
    with pytest.raises(StoreError, match="is in both"):  # overlapping stores without shard marks
        merge_stores(tmp_path / "o2.h5", [_one_run(tmp_path / "one.h5"), _write_store(tmp_path / "few.h5")])
    with StoreWriter(shards[2]) as writer:  # a run that stopped before its checkpoint
        writer.write_segment("synthetic", record(DIM), ["c0/x.jpg"], ["0" * 64], np.zeros((1, DIM), np.float16), {})
    with pytest.raises(StoreError, match="not in the store yet; finish it first"):
        merge_stores(tmp_path / "o3.h5", shards)
    different_roots = [_write_store(tmp_path / "r1.h5", root="/a"), _write_store(tmp_path / "r2.h5", start=12,
                                                                                  root="/b")]
    merged = merge_stores(tmp_path / "o4.h5", different_roots, images_root=str(tmp_path))
    assert merged.attrs["images_root"] == str(tmp_path.resolve())


def test_merge_cli_refusal_is_one_error_line(tmp_path):
    shards = _shards(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(cli, ["store", "merge", str(tmp_path / "m.h5"), *map(str, shards)])
    assert ok.exit_code == 0, ok.output
    assert f"{ROWS} images from 3 shards" in ok.output
    again = runner.invoke(cli, ["store", "merge", str(tmp_path / "m.h5"), *map(str, shards)])
    assert again.exit_code == 1 and again.output.startswith("Error: ") and "Traceback" not in again.output


def test_plain_h5py_reading_as_documented_after_moving_the_folder(tmp_path):
    shards = _shards(tmp_path / "work")
    merge_stores(tmp_path / "work" / "features.h5", shards)
    shutil.move(tmp_path / "work", tmp_path / "moved")
    code = re.search(r"Reading features with h5py only:\n\n```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path / "moved")
    try:
        scope = {}
        exec(code.replace("efficientnet_lite0", "synthetic"), scope)
    finally:
        os.chdir(cwd)
    X, paths, y = scope["X"], scope["paths"], scope["y"]
    assert X.shape == (ROWS, DIM) and len(paths) == ROWS
    np.testing.assert_array_equal(X, features_of(paths, DIM))
    assert y == [int(p[1]) for p in paths]


def test_info_reads_the_root_lists_leftovers_and_the_writer_cleans_them(tmp_path):
    store = _one_run(tmp_path / "f.h5")
    with StoreWriter(store) as writer:  # "killed" before its checkpoint: the batch stays, nothing is committed
        writer.write_segment("synthetic", record(DIM), ["c0/img_0000000.jpg"], ["x"], np.zeros((1, DIM), np.float16),
                             {})
    (tmp_path / "f.h5.tmp-4242").write_bytes(b"half a root")
    (data_dir(store) / "seg-1-2-3.h5").write_bytes(b"half a segment")
    info = FeatureStore(store).info()
    assert info["pending_rows"] == 1
    assert info["leftovers"] == ["f.h5.d/seg-1-2-3.h5", "f.h5.tmp-4242"]
    output = CliRunner().invoke(cli, ["store", "info", str(store)]).output
    assert "leftover: f.h5.tmp-4242" in output and "1 rows from an interrupted run" in output
    with StoreWriter(store) as writer:
        writer.commit(writer.state)
    info = FeatureStore(store).info()
    assert info["leftovers"] == [] and info["pending_rows"] == 0 and not parts_dir(store).exists()
    # the pending row's sha did not match the image table: it was dropped, the 90 good rows stay
    assert info["backbones"]["synthetic"]["rows"] == ROWS
    shutil.rmtree(data_dir(store))  # info needs no segment or image file: it reads the root only
    info = FeatureStore(store).info()
    assert info["images"] == ROWS and info["backbones"]["synthetic"]["rows"] == ROWS
    assert info["leftovers"] and all(x.startswith("missing: f.h5.d/") for x in info["leftovers"])
    with pytest.raises(StoreError, match="is missing or unreadable"):
        FeatureStore(store).read()


def test_failed_run_leaves_no_lock_and_no_store(tmp_path, image_folder):
    from extract.job import run_extraction

    store = tmp_path / "f.h5"
    with pytest.raises(Exception):
        run_extraction(image_folder, store, backbone="mobilenet_v2", weights=str(tmp_path / "missing.h5"),
                       input_size=32, engine="keras", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def _write_format_1(path: Path, table, features: np.ndarray) -> None:
    """A store exactly as format 1 laid it out: one file, every feature inside."""
    strings = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "transferkit-feature-store", "format_version": 1, "created": "2026-01-01T00:00:00Z",
                        **SPLIT_SETTINGS, "layout": "class-folders", "images_root": "/images", "shard": ""})
        f.create_dataset("classes", data=np.array(["c0", "c1", "c2"], dtype=object), dtype=strings)
        for column in table.COLUMNS:
            values = getattr(table, column)
            dtype = np.int64 if column in ("size", "mtime_ns") else strings
            f.create_dataset(f"images/{column}", data=np.array(values, dtype=object if dtype is strings else dtype),
                             dtype=dtype)
        for column in ("path", "sha256", "reason"):
            f.create_dataset(f"failed/{column}", data=np.array([], dtype=object), dtype=strings)
        g = f.create_group("backbones/synthetic")
        g.attrs["record"] = json.dumps(record(DIM))
        g.create_dataset("features", data=features, chunks=(min(256, len(features)), DIM))
        g.create_dataset("path", data=np.array(table.path, dtype=object), dtype=strings)
        g.create_dataset("sha256", data=np.array(table.sha256, dtype=object), dtype=strings)


def test_upgrade_of_a_format_1_store(tmp_path):
    table = image_table(ROWS)
    old = tmp_path / "old.h5"
    _write_format_1(old, table, features_of(table.path, DIM))
    with pytest.raises(StoreError, match=r"format-1 store; convert it once with `python cli.py store upgrade"):
        FeatureStore(old)
    runner = CliRunner()
    result = runner.invoke(cli, ["store", "upgrade", str(old)])
    assert result.exit_code == 0, result.output
    assert "format 1 -> 2; synthetic 90 rows" in result.output
    _same_read(old, _one_run(tmp_path / "new.h5"))
    again = runner.invoke(cli, ["store", "upgrade", str(old)])
    assert again.exit_code == 1 and "already format 2" in again.output
