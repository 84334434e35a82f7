"""extract --split-group-by near-duplicates: copies share a split, the store remembers it, merge and
fine-tune's folder view use it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from conftest import fake_record
from export.data import from_folder
from extract.dataset import assign_split
from extract.job import run_extraction
from extract.leak_free import ANCHORS_ATTR, group_store_splits, near_duplicate_anchors, regroup
from extract.splits import SplitSettings
from extract.store import BackboneRows, FeatureStore, empty_state, merge_stores, write_state
from PIL import Image

SETTINGS = SplitSettings(0.3, 0.3, seed=0, split_group_by="near-duplicates")


def _splits_by_path(store) -> dict[str, str]:
    images = FeatureStore(store).state.images
    return dict(zip(images.path, images.split))


def test_groups_take_their_anchors_split():
    rng = np.random.default_rng(0)
    paths = [f"c/{i:02d}.jpg" for i in range(40)]
    features = rng.normal(size=(40, 32)).astype(np.float32)
    copies = {i: i + 20 for i in range(10)}  # 20..29 are near-copies of 0..9
    for a, b in copies.items():
        features[b] = features[a] + 0.01 * rng.normal(size=32)
    sha = [f"h{i}" for i in range(40)]
    sha[39] = sha[30]  # an exact copy with an unrelated feature row still groups
    anchors = near_duplicate_anchors(paths, sha, features)
    assert set(anchors) == {paths[i] for pair in copies.items() for i in pair} | {paths[30], paths[39]}
    splits = [assign_split(p, SETTINGS) for p in paths]
    assert any(splits[a] != splits[b] for a, b in copies.items()), "the seed must split some pair, or this proves nothing"
    moved = regroup(splits, paths, anchors, SETTINGS)
    assert moved > 0
    for a, b in [*copies.items(), (30, 39)]:
        assert splits[a] == splits[b] == assign_split(paths[min(a, b)], SETTINGS)
    untouched = [i for i in range(40) if paths[i] not in anchors]
    assert all(splits[i] == assign_split(paths[i], SETTINGS) for i in untouched)


@pytest.fixture(scope="module")
def copied_folder(tmp_path_factory):
    """Random-noise pictures (distinct even to a random-weight backbone), 8 per class, and a
    byte-identical copy of each under another name."""
    root = tmp_path_factory.mktemp("leakfree") / "images"
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"img_{i}.png")
            shutil.copy(root / name / f"img_{i}.png", root / name / f"copy_of_img_{i}.png")
    return root


def _extract(images, store, **extra):
    return run_extraction(images, store, backbone="mobilenet_v2", weights="none", input_size=32, engine="keras",
                          validation_split=0.3, test_split=0.3, progress=False, **extra)


def _assert_copies_together(splits: dict[str, str]) -> None:
    for path, split in splits.items():
        if "copy_of_" in path:
            assert split == splits[path.replace("copy_of_", "")], path


def test_extract_keeps_copies_in_one_split_and_remembers(copied_folder, tmp_path):
    per_path = {p.relative_to(copied_folder).as_posix(): None for p in copied_folder.rglob("*.png")}
    assert any(assign_split(p, SETTINGS) != assign_split(p.replace("copy_of_", ""), SETTINGS) for p in per_path), \
        "without grouping some copies straddle splits (else the test proves nothing)"
    summary = _extract(copied_folder, tmp_path / "grouped.h5", split_group_by="near-duplicates")
    assert summary.split_groups == 24 and summary.split_moved > 0 and not summary.copies_across_splits
    splits = _splits_by_path(tmp_path / "grouped.h5")
    _assert_copies_together(splits)
    attrs = FeatureStore(tmp_path / "grouped.h5").state.attrs
    assert attrs["split_group_by"] == "near-duplicates"
    # fine-tune and export see the folder through the store's settings: the same splits
    folder_view = from_folder(copied_folder, SplitSettings.resolve(attrs), anchors=attrs.get(ANCHORS_ATTR, ""))
    assert dict(zip(folder_view.relpaths, folder_view.split.tolist())) == splits
    # a second run keeps the assignment; changing the setting is refused
    again = _extract(copied_folder, tmp_path / "grouped.h5")
    assert again.split_moved == 0 and _splits_by_path(tmp_path / "grouped.h5") == splits
    refused = CliRunner().invoke(cli, ["extract", str(copied_folder), "--store", str(tmp_path / "grouped.h5"),
                                       "--split-group-by", "none", "--weights", "none", "--backbone", "mobilenet_v2"])
    assert refused.exit_code == 1 and "--split-group-by near-duplicates" in refused.output


def _shard_state(paths: list[str], features: np.ndarray):
    """A shard store's state as `extract --shard I/2 --split-group-by near-duplicates` leaves it."""
    state = empty_state(images_root="/nowhere", layout="class-folders", **SETTINGS.to_attrs())
    state.classes = ["c"]
    for p in paths:
        for column, value in (("path", p), ("sha256", p), ("class_name", "c"), ("split", "train"), ("size", 1),
                              ("mtime_ns", 0)):
            getattr(state.images, column).append(value)
    record = fake_record("toy", features.shape[1], input_size=8)
    state.backbones["toy"] = BackboneRows(record, list(paths), list(paths), features)
    group_store_splits(state, "toy", SETTINGS)
    return state


def test_merge_finds_groups_across_shards(tmp_path):
    rng = np.random.default_rng(1)
    paths = [f"c/{i:02d}.jpg" for i in range(40)]
    features = rng.normal(size=(40, 16)).astype(np.float32)
    features[20:] = features[:20] + 0.01 * rng.normal(size=(20, 16))  # i and i+20 are copies
    halves = [list(range(0, 10)) + list(range(30, 40)), list(range(10, 30))]  # most copies in the other shard
    shards = []
    for k, rows in enumerate(halves):
        write_state(tmp_path / f"shard{k}.h5", _shard_state([paths[r] for r in rows], features[rows]))
        shards.append(tmp_path / f"shard{k}.h5")
    straddling = [i for i in range(20) if _splits_by_path(shards[0]).get(paths[i], _splits_by_path(shards[1]).get(paths[i]))
                  != _splits_by_path(shards[0]).get(paths[i + 20], _splits_by_path(shards[1]).get(paths[i + 20]))]
    assert straddling, "the shards alone must leave some copies apart (else the test proves nothing)"
    merge_stores(tmp_path / "merged.h5", shards)
    splits = _splits_by_path(tmp_path / "merged.h5")
    assert all(splits[paths[i]] == splits[paths[i + 20]] for i in range(20))
    assert FeatureStore(tmp_path / "merged.h5").state.attrs["split_group_by"] == "near-duplicates"


def test_a_rotated_copy_takes_its_originals_split(tmp_path):
    """A copy rotated by 30 degrees with black corners, whose features are under the features rule
    (centred cosine about 0.85): the audit's alignment links it, so the split does too."""
    from test_audit_alignment import COPIES, LookAlikeFeatures, PALETTES, _save, fruit_photo

    root, rows = tmp_path / "images", []
    for name, palette in PALETTES.items():  # two classes: centring keeps them apart, as real classes are
        rows += [_save(root, f"{name}/photo{k}.jpg", fruit_photo(palette, seed=10 * len(name) + k)) for k in range(6)]
    rotated = "pomme/rotated30_black_corners.jpg"  # a copy of photo0 to LookAlikeFeatures
    rows.append(_save(root, rotated, COPIES["rotated30_black_corners"](Image.open(root / rows[0]))))
    settings = SplitSettings(0.3, 0.3, seed=0, split_group_by="near-duplicates")
    assert assign_split(rotated, settings) != assign_split(rows[0], settings), "the seed must split the pair"
    features = LookAlikeFeatures()
    features = np.stack([features(root / path) for path in rows])
    sha = [f"h{i}" for i in range(len(rows))]
    assert near_duplicate_anchors(rows, sha, features) == {}  # the features alone miss it
    anchors = near_duplicate_anchors(rows, sha, features, str(root))
    assert anchors == {rows[0]: rows[0], rotated: rows[0]}
    splits = [assign_split(p, settings) for p in rows]
    regroup(splits, rows, anchors, settings)
    assert splits[0] == splits[-1] == assign_split(rows[0], settings)
