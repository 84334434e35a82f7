"""Dataset discovery: both layouts, unicode class names, stable hash splits."""

from __future__ import annotations

import pytest
from conftest import make_image_folder, write_image

from extract.dataset import assign_split, discover
from extract.splits import SplitSettings
from extract.errors import DatasetError


def test_class_folder_layout_with_unicode_and_nested_files(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "pêche pourrie" / "a.jpg", (10, 10, 10))
    write_image(root / "pêche pourrie" / "sous dossier" / "b.png", (10, 10, 10))
    write_image(root / "Ängel" / "c.jpg", (10, 10, 10))
    (root / "Ängel" / "notes.txt").write_text("x")
    (root / "Ängel" / ".hidden.jpg").write_bytes(b"")
    ds = discover(root, SplitSettings(validation_split=0.0, test_split=0.0))
    assert ds.layout == "class-folders"
    assert ds.class_names == sorted(["pêche pourrie", "Ängel"])
    assert {e.relpath for e in ds.entries} == {
        "pêche pourrie/a.jpg", "pêche pourrie/sous dossier/b.png", "Ängel/c.jpg"}
    assert ds.ignored == ["Ängel/notes.txt"]
    assert all(e.split == "train" for e in ds.entries)


def test_split_folder_layout_accepts_val(tmp_path):
    for split in ("train", "val", "test"):
        make_image_folder(tmp_path / split, per_class=2)
    ds = discover(tmp_path)
    assert ds.layout == "split-folders"
    assert ds.split_counts() == {"train": 6, "validation": 6, "test": 6}
    assert ds.class_names == ["blue", "green", "red"]
    assert all(e.relpath.startswith({"train": "train/", "validation": "val/", "test": "test/"}[e.split])
               for e in ds.entries)


def test_mixed_layout_and_empty_folders_are_refused(tmp_path):
    make_image_folder(tmp_path / "a" / "train", per_class=1)
    make_image_folder(tmp_path / "a" / "cats", per_class=1)
    with pytest.raises(DatasetError, match="mixes split folders"):
        discover(tmp_path / "a")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        discover(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "missing")


def test_hash_splits_have_the_requested_proportions_and_depend_on_seed():
    paths = [f"c/img_{i}.jpg" for i in range(4000)]
    splits = [assign_split(p, SplitSettings(0.2, 0.1, seed=0)) for p in paths]
    assert abs(splits.count("validation") / 4000 - 0.2) < 0.03
    assert abs(splits.count("test") / 4000 - 0.1) < 0.03
    other = [assign_split(p, SplitSettings(0.2, 0.1, seed=1)) for p in paths]
    assert splits != other


def test_adding_images_never_moves_existing_ones(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=20)
    before = {e.relpath: e.split for e in discover(root, SplitSettings(0.2, 0.2, seed=3)).entries}
    make_image_folder(root, per_class=30, start=20)
    write_image(root / "new class" / "x.jpg", (1, 2, 3))
    after = {e.relpath: e.split for e in discover(root, SplitSettings(0.2, 0.2, seed=3)).entries}
    assert len(after) == len(before) + 91
    assert all(after[p] == s for p, s in before.items())


def test_split_group_keeps_copies_of_one_photo_in_one_split(tmp_path):
    root = tmp_path / "images"
    for i in range(40):
        for suffix in ("", "_aug1", "_aug2"):
            write_image(root / "chat" / f"img{i}{suffix}.jpg", (200, 30, 30), seed=i)
    ungrouped = {e.relpath: e.split for e in discover(root, SplitSettings(0.3, 0.3, seed=0)).entries}
    straddling = [i for i in range(40) if len({ungrouped[f"chat/img{i}{s}.jpg"] for s in ("", "_aug1", "_aug2")}) > 1]
    assert straddling, "without a group, copies land in different splits (the leakage this option prevents)"

    grouping = SplitSettings(0.3, 0.3, seed=0, split_group=r"_aug\d+")
    grouped = {e.relpath: e.split for e in discover(root, grouping).entries}
    for i in range(40):
        assert grouped[f"chat/img{i}_aug1.jpg"] == grouped[f"chat/img{i}_aug2.jpg"] == grouped[f"chat/img{i}.jpg"]
        assert grouped[f"chat/img{i}.jpg"] == ungrouped[f"chat/img{i}.jpg"]  # the original keeps its split
    assert len(set(grouped.values())) == 3

    with pytest.raises(DatasetError, match="not a valid regular expression"):
        discover(root, SplitSettings(split_group="("))


def _names(root, split_folder: str, per_class: int, start: int = 0) -> None:
    """Empty files named like images (discovery reads names only)."""
    for colour in ("red", "green", "blue"):
        folder = root / split_folder / colour
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            (folder / f"img_{i}.jpg").write_bytes(b"")


def test_validation_is_carved_out_of_train_by_hash_when_there_is_no_validation_folder(tmp_path):
    _names(tmp_path, "train", 100)
    _names(tmp_path, "test", 10)
    settings = SplitSettings(validation_split=0.2, seed=4)
    first = discover(tmp_path, settings)
    splits = {e.relpath: e.split for e in first.entries}
    assert first.validation_source == "train-by-hash" and splits == {
        e.relpath: e.split for e in discover(tmp_path, settings).entries}  # deterministic
    assert all(split == "test" for path, split in splits.items() if path.startswith("test/"))  # never touched
    carved = [path for path, split in splits.items() if split == "validation"]
    assert all(path.startswith("train/") for path in carved) and 30 <= len(carved) <= 90  # about 20 % of 300
    assert carved != [e.relpath for e in discover(tmp_path, SplitSettings(0.2, seed=5)).entries
                      if e.split == "validation"]  # drawn from the seed
    assert {e.split for e in discover(tmp_path, SplitSettings(0.0)).entries} == {"train", "test"}
    _names(tmp_path, "train", 50, start=100)  # new images never move existing ones
    after = {e.relpath: e.split for e in discover(tmp_path, settings).entries}
    assert {path: after[path] for path in splits} == splits
    with_folder = tmp_path / "with-val"
    for split in ("train", "validation", "test"):
        _names(with_folder, split, 5)
    found = discover(with_folder, settings)
    assert found.validation_source == "folder" and found.split_counts() == {"train": 15, "validation": 15, "test": 15}


def test_store_info_states_the_carved_validation_and_test_split_is_refused(tmp_path):
    from click.testing import CliRunner

    from cli import cli

    make_image_folder(tmp_path / "images" / "train", per_class=10)
    make_image_folder(tmp_path / "images" / "test", per_class=2, start=10)
    fast = ["--backbone", "mobilenet_v2", "--weights", "none", "--input-size", "32", "--engine", "keras", "--quiet"]
    store = str(tmp_path / "f.h5")
    extract = ["extract", str(tmp_path / "images"), "--store", store, *fast]
    refused = CliRunner().invoke(cli, [*extract, "--test-split", "0.2"])
    assert refused.exit_code == 1 and refused.output.startswith("Error: --test-split does not apply")
    assert CliRunner().invoke(cli, [*extract, "--validation-split", "0.3", "--seed", "2"]).exit_code == 0
    info = CliRunner().invoke(cli, ["store", "info", store])
    assert "  validation: 30 % of train/ by hash (seed 2; no validation folder; test/ untouched)\n" in info.output
    counts = dict(part.split() for part in info.output.split("splits: ")[1].splitlines()[0].split(", "))
    assert counts["test"] == "6" and int(counts["validation"]) > 0
