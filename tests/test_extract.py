"""The extraction job and the feature store: format, incremental runs, writers, shards, engines."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
from conftest import make_image_folder, write_image
from PIL import Image

import extract.models
from extract.errors import StoreError
from extract.job import run_extraction
from extract.store import FeatureStore, StoreWriter, merge_stores

TINY = dict(backbone="mobilenet_v2", weights="none", input_size=32, progress=False, engine="keras")


def _features_by_path(store, backbone="mobilenet_v2"):
    fs = FeatureStore(store).read(backbone)
    return {p: fs.features[i] for i, p in enumerate(fs.paths)}


@pytest.fixture
def messy_folder(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=5)
    Image.new("L", (30, 20), 90).save(root / "red" / "grey.png")
    Image.new("RGBA", (30, 20), (0, 255, 0, 128)).save(root / "green" / "alpha.png")
    Image.new("CMYK", (30, 20), (0, 50, 0, 0)).save(root / "blue" / "cmyk.jpg")
    (root / "blue" / "broken.jpg").write_bytes(b"not an image at all")
    (root / "red" / "empty.png").write_bytes(b"")
    (root / "red" / "notes.txt").write_text("ignored")
    return root


def test_store_format_is_plain_h5py(messy_folder, tmp_path):
    store = tmp_path / "f.h5"
    summary = run_extraction(messy_folder, store, **TINY)
    assert (summary.extracted, summary.failed, summary.ignored) == (18, 2, 1)
    with h5py.File(store, "r") as f:
        assert f.attrs["format"] == "transferkit-feature-store"
        assert list(f["classes"].asstr()[()]) == ["blue", "green", "red"]
        paths = list(f["images/path"].asstr()[()])
        shas = list(f["images/sha256"].asstr()[()])
        for p, s in zip(paths, shas):
            assert hashlib.sha256((messy_folder / p).read_bytes()).hexdigest() == s
        assert set(f["images/split"].asstr()[()]) <= {"train", "validation", "test"}
        group = f["backbones/mobilenet_v2"]
        assert group["features"].shape == (18, 1280) and group["features"].dtype == np.float32
        record = json.loads(group.attrs["record"])
        assert record["preprocessing"]["mode"] == "tf" and record["input_size"] == 32
        assert record["weights"]["id"] == "random-init:seed=0"
        assert {"tensorflow", "keras", "h5py", "numpy"} <= set(record["versions"])
        assert dict(zip(f["failed/path"].asstr()[()], f["failed/reason"].asstr()[()])) == {
            "blue/broken.jpg": "cannot decode image: not a format this Pillow can read",
            "red/empty.png": "empty file (0 bytes)",
        }
    info = FeatureStore(store).info()
    assert info["images"] == 18 and info["failed"] == 2
    assert [f["path"] for f in info["failures"]] == ["blue/broken.jpg", "red/empty.png"]
    assert sum(info["split_counts"].values()) == 18
    assert info["backbones"] == {"mobilenet_v2": {"rows": 18, "dim": 1280, "dtype": "float32",
                                                  "weights": "random-init:seed=0", "input_size": 32,
                                                  "preprocessing": "tf", "segments": 1}}


def test_incremental_rerun_computes_only_new_and_changed(image_folder, tmp_path, monkeypatch):
    store = tmp_path / "f.h5"
    run_extraction(image_folder, store, **TINY)
    first = _features_by_path(store)

    def must_not_build(*a, **k):
        raise AssertionError("the backbone was built on an unchanged folder")

    monkeypatch.setattr(extract.models, "build_backbone", must_not_build)
    again = run_extraction(image_folder, store, **TINY)
    assert (again.extracted, again.reused, again.removed) == (0, 18, 0)
    monkeypatch.undo()

    make_image_folder(image_folder, per_class=1, start=50)  # 3 new images
    write_image(image_folder / "red" / "img_0.jpg", (0, 0, 0), seed=99)  # changed content
    (image_folder / "blue" / "img_1.jpg").unlink()  # deleted
    third = run_extraction(image_folder, store, **TINY)
    assert (third.extracted, third.removed, third.images) == (4, 2, 20)
    now = _features_by_path(store)
    assert "blue/img_1.jpg" not in now
    assert not np.array_equal(now["red/img_0.jpg"], first["red/img_0.jpg"])
    np.testing.assert_array_equal(now["green/img_3.jpg"], first["green/img_3.jpg"])


def test_store_refuses_changed_settings_and_weights(image_folder, tmp_path):
    store = tmp_path / "f.h5"
    run_extraction(image_folder, store, **TINY)
    with pytest.raises(StoreError, match="built with --seed 0"):
        run_extraction(image_folder, store, **{**TINY, "seed": 5})
    with pytest.raises(StoreError, match="weights random-init:seed=0 at 32 px"):
        run_extraction(image_folder, store, **{**TINY, "input_size": 40})
    with pytest.raises(StoreError, match="pass --dtype float32"):
        run_extraction(image_folder, store, **{**TINY, "dtype": "float16"})


def test_several_backbones_and_float16(image_folder, tmp_path):
    store = tmp_path / "f.h5"
    run_extraction(image_folder, store, **TINY)
    run_extraction(image_folder, store, **{**TINY, "backbone": "resnet50", "dtype": "float16"})
    info = FeatureStore(store).info()
    assert info["backbones"]["resnet50"]["dim"] == 2048
    assert info["backbones"]["resnet50"]["dtype"] == "float16"
    assert info["backbones"]["resnet50"]["preprocessing"] == "caffe"
    assert FeatureStore(store).read("resnet50").features.dtype == np.float32
    with pytest.raises(StoreError, match="several backbones"):
        FeatureStore(store).read()


def test_second_writer_gets_a_clear_error(image_folder, tmp_path):
    store = tmp_path / "f.h5"
    with StoreWriter(store):
        with pytest.raises(StoreError, match="is being written by pid"):
            run_extraction(image_folder, store, **TINY)
    run_extraction(image_folder, store, **TINY)  # the lock is gone once the first writer is done


def test_shards_merge_into_the_full_store(image_folder, tmp_path):
    full = tmp_path / "full.h5"
    run_extraction(image_folder, full, **TINY)
    shards = [tmp_path / f"s{i}.h5" for i in range(3)]
    for i, shard in enumerate(shards):
        run_extraction(image_folder, shard, shard=f"{i}/3", **TINY)
    sizes = [FeatureStore(s).info()["images"] for s in shards]
    assert sum(sizes) == 18 and max(sizes) < 18
    merge_stores(tmp_path / "merged.h5", shards)
    merged, reference = _features_by_path(tmp_path / "merged.h5"), _features_by_path(full)
    assert merged.keys() == reference.keys()
    for p in merged:
        np.testing.assert_allclose(merged[p], reference[p], rtol=1e-5, atol=1e-6)
    assert FeatureStore(tmp_path / "merged.h5").info()["split_counts"] == FeatureStore(full).info()["split_counts"]


def test_onnx_engine_matches_keras(image_folder, tmp_path):
    run_extraction(image_folder, tmp_path / "k.h5", **TINY)
    onnx = run_extraction(image_folder, tmp_path / "o.h5", **{**TINY, "engine": "onnx"})
    assert onnx.engine == "onnx"
    k, o = _features_by_path(tmp_path / "k.h5"), _features_by_path(tmp_path / "o.h5")
    scale = max(np.abs(v).max() for v in k.values())
    assert max(np.abs(k[p] - o[p]).max() for p in k) / scale < 1e-3


def test_identical_files_in_two_splits_are_reported(tmp_path):
    import shutil

    from click.testing import CliRunner

    from cli import cli
    from extract.dataset import assign_split
    from extract.splits import SplitSettings

    root = make_image_folder(tmp_path / "images", per_class=4)
    original = root / "red" / "img_0.jpg"
    split = assign_split("red/img_0.jpg", SplitSettings(0.3, 0.3))
    # copies of one photo under other names: one lands in another split, one in the same split
    names = [f"copy_{i}.jpg" for i in range(200)]
    other = next(n for n in names if assign_split(f"red/{n}", SplitSettings(0.3, 0.3)) != split)
    same = next(n for n in names if assign_split(f"red/{n}", SplitSettings(0.3, 0.3)) == split)
    for name in (other, same):
        shutil.copyfile(original, root / "red" / name)
    store = tmp_path / "f.h5"
    summary = run_extraction(root, store, validation_split=0.3, test_split=0.3, seed=0, **TINY)
    expected = [sorted(["red/img_0.jpg", f"red/{other}", f"red/{same}"])]
    assert summary.copies_across_splits == expected
    assert FeatureStore(store).info()["copies_across_splits"] == expected

    result = CliRunner().invoke(cli, ["store", "info", str(store)])
    assert result.exit_code == 0
    assert "warning: 3 files are copies of 1 image(s) and sit in different splits" in result.output
    assert " = ".join(expected[0]) in result.output

    (root / "red" / other).unlink()
    (root / "red" / same).unlink()
    assert run_extraction(root, store, **TINY).copies_across_splits == []


def test_store_remembers_split_group_and_fine_tune_uses_it(tmp_path):
    from export.data import from_feature_set, from_folder
    from extract.splits import SplitSettings

    root = make_image_folder(tmp_path / "images", per_class=8)
    for path in list(root.rglob("*.jpg")):
        (path.parent / f"{path.stem}_flip.jpg").write_bytes(path.read_bytes())  # a copy under another name
    store = tmp_path / "f.h5"
    summary = run_extraction(root, store, split_group="_flip", validation_split=0.3, test_split=0.3, **TINY)
    assert summary.copies_across_splits == []  # grouped: no copy sits in another split
    features = FeatureStore(store).read()
    split = dict(zip(features.paths, features.splits))
    pairs = [(p, p.replace("_flip", "")) for p in split if "_flip" in p]
    assert pairs and all(split[a] == split[b] for a, b in pairs)

    assert FeatureStore(store).state.attrs["split_group"] == "_flip"
    run_extraction(root, store, **TINY)  # not given: the store's group is kept
    with pytest.raises(StoreError, match="--split-group _flip"):
        run_extraction(root, store, split_group="", **TINY)

    settings = SplitSettings.resolve(FeatureStore(store).state.attrs)
    assert settings.split_group == "_flip"
    folder = from_folder(root, settings)
    assert dict(zip(folder.relpaths, folder.split)) == dict(zip(from_feature_set(features).relpaths, features.splits))


def _count_opens(monkeypatch, root) -> dict[str, int]:
    """relpath -> how many times a file under ``root`` is opened (``os.open`` and ``open``)."""
    import builtins
    import os
    from collections import Counter

    opened: Counter = Counter()
    prefix = str(root) + os.sep
    real_os_open, real_open = os.open, builtins.open

    def count(path) -> None:
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(prefix):
            opened[os.path.relpath(path, root)] += 1

    def os_open(path, *args, **kwargs):
        count(path)
        return real_os_open(path, *args, **kwargs)

    def builtin_open(path, *args, **kwargs):
        count(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", builtin_open)
    return opened


def test_each_new_file_is_read_once_and_its_row_is_keyed_by_those_bytes(image_folder, tmp_path, monkeypatch):
    import os

    import extract.job

    images = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*"))
    opened = _count_opens(monkeypatch, image_folder)
    store = tmp_path / "f.h5"
    assert run_extraction(image_folder, store, **TINY).extracted == len(images)
    assert dict(opened) == {rel: 1 for rel in images}  # hashed and decoded from one read
    assert _stored_shas(store) == {p: hashlib.sha256((image_folder / p).read_bytes()).hexdigest() for p in images}

    opened.clear()
    touched = image_folder / images[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    again = run_extraction(image_folder, store, **TINY)
    assert again.extracted == 0 and dict(opened) == {images[0]: 1}  # unchanged: not read; touched: hashed only

    monkeypatch.setattr(extract.job, "READ_BUDGET_BYTES", 0)  # no bytes held: the decode reads the file again
    opened.clear()
    reread = run_extraction(image_folder, tmp_path / "reread.h5", **TINY)
    assert reread.extracted == len(images) and set(opened.values()) == {2}
    held_features, reread_features = _features_by_path(store), _features_by_path(tmp_path / "reread.h5")
    for path in images:  # the same bytes, the same features
        np.testing.assert_array_equal(held_features[path], reread_features[path])


def _stored_shas(store) -> dict[str, str]:
    from extract.store import read_state

    rows = read_state(store).backbones["mobilenet_v2"]
    return dict(zip(rows.path, rows.sha256))


def test_held_bytes_stay_within_their_budget_and_are_handed_out_once():
    from edge.imageio import FileBytes
    from extract.read_once import HeldBytes

    held = HeldBytes(budget=10)
    a, b, c = FileBytes(b"aaaa", 4, 0), FileBytes(b"bbbbbb", 6, 0), FileBytes(b"c", 1, 0)
    for name, file in (("a", a), ("b", b), ("c", c)):
        held.keep(name, file)
    assert held.held == 10 and len(held) == 2  # c would go over the budget: its decode reads the file
    assert held.take("a", hashlib.sha256(b"other").hexdigest()) is None  # other content: never handed out
    assert held.take("a", a.sha256) is None and held.held == 6  # taken (or refused) once, then gone
    held.keep("c", c)
    held.retain(["c"])
    assert held.take("b", b.sha256) is None and held.take("c", c.sha256) is c and held.held == 0
