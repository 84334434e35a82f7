"""The contracts between stages: the backbone record, the split settings, the shared file helpers and scoring."""

from __future__ import annotations

import json
import os
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest

from extract.backbones import get_backbone
from extract.errors import DatasetError, StoreError
from extract.files import atomic_write, file_sha256, write_atomic
from extract.record import PLAIN_RECORD_VERSION, RECORD_VERSION, BackboneRecord, Preprocessing, RecordError, WeightsRecord
from extract.splits import SPLITS, SplitSettings, split_counts
from extract.record import random_init_id

# A record exactly as transferkit wrote it into stores and heads before records were typed (version 1).
V1_STORE_RECORD = {
    "name": "mobilenet_v2", "constructor": "keras.applications:MobileNetV2", "preprocessing": "tf",
    "input_size": 32, "feature_dim": 1280, "weights_source": "keras-applications",
    "weights": {"kind": "none", "id": "random-init:seed=7", "sha256": None, "file": None},
    "dtype": "float16", "engine": "onnx", "versions": {"transferkit": "0.2.0", "keras": "3.6.0"},
    "created": "2026-11-20T10:00:00Z",
}


def _record(**changes) -> BackboneRecord:
    weights = WeightsRecord(kind="none", id=random_init_id(4), seed=4)
    return replace(BackboneRecord.create(get_backbone("mobilenet_v2"), weights, 48, dtype="float32"), **changes)
    spec = get_backbone("mobilenet_v2")
    return replace(BackboneRecord.create(spec, resolve_weights(spec, "none", seed=4).record(), 48, dtype="float32"),
                   **changes)


# ------------------------------------------------------------------------------------------ the record


def test_record_round_trips_through_json():
    record = _record(engine="onnx")
    data = json.loads(json.dumps(record.to_dict()))
    assert BackboneRecord.from_dict(data) == record
    assert data["record_version"] == PLAIN_RECORD_VERSION
    assert data["weights"] == {"kind": "none", "id": "random-init:seed=4", "sha256": None, "file": None, "seed": 4}
    assert data["preprocessing"] == {"mode": "tf", "color": "RGB", "resize": "bilinear"}
    assert {"python", "transferkit", "keras", "numpy"} <= set(data["versions"]) and data["created"]


def test_record_is_frozen():
    with pytest.raises(FrozenInstanceError):
        _record().input_size = 64


def test_reads_version_1_records_from_existing_stores_heads_and_models():
    record = BackboneRecord.from_dict(V1_STORE_RECORD)
    assert record.weights == WeightsRecord(kind="none", id="random-init:seed=7", sha256=None, file=None, seed=7)
    assert record.preprocessing == Preprocessing(mode="tf", color="RGB", resize="bilinear")
    assert (record.dtype, record.engine, record.created) == ("float16", "onnx", "2026-11-20T10:00:00Z")
    assert record.versions == {"transferkit": "0.2.0", "keras": "3.6.0"}
    # ONNX metadata and sidecars of version 1 held the record without the extraction fields
    bare = {k: v for k, v in V1_STORE_RECORD.items() if k not in ("dtype", "engine", "versions", "created")}
    imagenet = {**bare, "weights": {"kind": "imagenet", "id": "imagenet:0123456789abcdef", "sha256": "ab" * 32,
                                    "file": "w.h5"}}
    assert BackboneRecord.from_dict(imagenet).weights.seed is None
    assert BackboneRecord.from_dict(bare).dtype is None
    # what a version-1 reader needs survives in the version-2 dict
    again = BackboneRecord.from_dict(record.to_dict())
    assert again == record and again.to_dict()["weights"]["id"] == "random-init:seed=7"


@pytest.mark.parametrize("change, message", [
    ({"name": None}, "'name' is missing"),
    ({"input_size": "224"}, "'input_size' is missing or not a int"),
    ({"weights": {"kind": "none", "id": "random"}}, "expected random-init:seed=N"),
    ({"weights": {"kind": "cloud", "id": "x"}}, "unknown kind 'cloud'"),
    ({"preprocessing": 3}, "'preprocessing' is missing or malformed"),
    ({"record_version": RECORD_VERSION + 1}, "newer than this transferkit reads"),
])
def test_damaged_or_newer_records_are_refused(change, message):
    with pytest.raises(RecordError, match=message):
        BackboneRecord.from_dict({**V1_STORE_RECORD, **change})


def test_same_features_compares_backbone_weights_and_size_only():
    record = _record()
    assert record.same_features(replace(record, engine="onnx", created="later", versions={}))
    assert not record.same_features(replace(record, input_size=64))
    assert not record.same_features(replace(record, weights=replace(record.weights, id="random-init:seed=5")))
    assert "mobilenet_v2 features from weights random-init:seed=4 at 48 px" == record.describe()


def test_ray_runner_details_are_carried():
    runner = {"name": "ray", "shards": 4, "worker_versions": {"numpy": "2.1"}}
    record = BackboneRecord.from_dict({**V1_STORE_RECORD, "runner": runner})
    assert record.runner == runner and record.to_dict()["runner"] == runner


def test_scores_give_accuracy_as_a_fraction():
    from classify.scoring import scores

    got = scores(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]))
    assert got["accuracy"] == 0.75 and 0 < got["macro_f1"] < 1
def test_head_file_with_a_damaged_record_is_refused(tmp_path):
    from conftest import make_feature_store

    from classify.errors import HeadFileError
    from classify.persist import load_head
    from classify.train import fit_heads

    store = make_feature_store(tmp_path / "f.h5")
    fit_heads(store, kind="softmax", out=tmp_path / "head")
    config = json.loads((tmp_path / "head" / "head.json").read_text())
    assert BackboneRecord.from_dict(config["backbone"]) == load_head(tmp_path / "head").backbone
    config["backbone"]["weights"]["kind"] = "cloud"
    (tmp_path / "head" / "head.json").write_text(json.dumps(config))
    with pytest.raises(HeadFileError, match="head.json: backbone record has weights of unknown kind"):
        load_head(tmp_path / "head")


# ------------------------------------------------------------------------------------------ splits


def test_split_defaults_are_defined_once_and_stored_settings_win():
    assert SplitSettings() == SplitSettings.resolve(None) == SplitSettings.resolve({})
    assert SplitSettings().to_attrs() == {"validation_split": 0.1, "test_split": 0.1, "seed": 0, "split_group": "",
                                          "split_group_by": "none"}
    stored = {"validation_split": 0.3, "test_split": 0.2, "seed": 5, "format": "x"}  # an old store: no split_group
    assert SplitSettings.resolve(stored) == SplitSettings(0.3, 0.2, 5, "")
    assert SplitSettings.resolve(stored, seed=5, split_group=None) == SplitSettings(0.3, 0.2, 5, "")
    assert SplitSettings.resolve(None, seed=9) == SplitSettings(seed=9)


def test_split_setting_clash_names_the_stored_values():
    stored = SplitSettings(0.3, 0.2, 5, "").to_attrs()
    with pytest.raises(StoreError, match=r"built with --seed 5, --test-split 0\.2; pass the same values"):
        SplitSettings.resolve(stored, seed=6, test_split=0.1, validation_split=0.3)
    with pytest.raises(StoreError, match=r"built with --split-group ''"):
        SplitSettings.resolve(stored, split_group="_aug")


def test_split_settings_refuse_impossible_shares():
    with pytest.raises(DatasetError, match="sum to less than 1"):
        SplitSettings(validation_split=0.6, test_split=0.4)


def test_split_counts_name_every_split_in_order():
    assert split_counts(["test", "train", "train"]) == {"train": 2, "validation": 0, "test": 1}
    assert tuple(split_counts([])) == SPLITS


# ------------------------------------------------------------------------------------------ file helpers


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "a.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.json"]
    assert file_sha256(path) == "11507a0e2f5e69d5dfa40a62a1bd7b6ee57e6bcd85c67c9b8431b36fff21c437"


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old model")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".onnx") and tmp != path
            tmp.write_bytes(b"half a mod")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old model" and os.listdir(tmp_path) == ["model.onnx"]


def test_atomic_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(tmp_path / "x.bin", b"data")
    assert synced[0].startswith(str(tmp_path / "x.bin.tmp-")) and synced[-1] == str(tmp_path)
