"""``retrain``: a sorted review folder back into the training images, a new head and a new model file.

The store and softmax head are copies of the session ``workspace`` (random-init MobileNetV2 at 32 px
on generated coloured squares); the model to retrain is a stub ONNX file carrying the metadata an
export writes (its ``source`` names the copied store and head), so only the retrained model is
really exported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import make_image_folder
from test_edge import METADATA, build_model

from classify.persist import load_head
from cli import cli
from export.metadata import read_metadata
from extract.store import FeatureStore
from extract.store_files import data_dir


OLD_SCORE = json.dumps({"method": "stub", "threshold": 1.0})  # the stub model "had" an unknown score


@pytest.fixture
def setup(workspace, tmp_path: Path) -> dict:
    images, store, head = tmp_path / "images", tmp_path / "features.h5", tmp_path / "head"
    shutil.copytree(workspace.images, images)
    shutil.copy(workspace.store, store)
    shutil.copytree(data_dir(workspace.store), data_dir(store))  # the store's segment files
    shutil.copytree(workspace.head, head)
    source = {"kind": "head", "store": str(store), "head": str(head)}
    model = build_model(tmp_path / "model.onnx", metadata={
        **METADATA, "source": json.dumps(source), "transferkit_version": "test", "created": "now", "ood": OLD_SCORE})
    return {"images": images, "store": store, "head": head, "model": model, "tmp": tmp_path}


def invoke(setup: dict, review: Path, *extra) -> object:
    args = ["retrain", "--model", setup["model"], "--review", review, "--out", setup["tmp"] / "new.onnx",
            "--images", setup["images"], "--quiet", *extra]
    return CliRunner().invoke(cli, [str(a) for a in args])


def rows_by_path(store: Path) -> dict[str, np.ndarray]:
    features = FeatureStore(store).read("mobilenet_v2")
    return dict(zip(features.paths, features.features))


def test_retrain_extracts_only_the_new_images_and_writes_a_new_model(setup):
    before = rows_by_path(setup["store"])
    review = make_image_folder(setup["tmp"] / "review", per_class=3, size=40, start=100)
    (review / "unknown").mkdir()  # sorted empty: ignored
    result = invoke(setup, review)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("added 9 review images to ") and "(blue 3, green 3, red 3); 0 were already" in lines[0]
    assert lines[1] == f"extract: 9 images computed, {len(before)} unchanged, 0 failed"
    assert lines[2].startswith("test accuracy on the old test split (") and lines[2].endswith(
        " images, no review image): 100.00% old, 100.00% new (the same)")
    assert lines[3].startswith("test accuracy on all ")
    after = rows_by_path(setup["store"])
    assert len(after) == len(before) + 9 and all(np.array_equal(after[p], f) for p, f in before.items())
    assert (setup["images"] / "red" / "img_100.jpg").samefile(review / "red" / "img_100.jpg")  # hard link
    new = setup["tmp"] / "new.onnx"
    meta = read_metadata(new)
    assert meta["source"]["head"] == str((setup["tmp"] / "new-head").resolve())
    assert meta["ood"]["threshold"] > 0 and [o.name for o in onnx.load(str(new)).graph.output] == [
        "probabilities", "ood_score"]
    assert load_head(setup["tmp"] / "new-head").kind == load_head(setup["head"]).kind == "softmax"
    again = invoke(setup, review)  # --out exists now: never overwritten unless told to
    assert again.exit_code == 1 and again.output.startswith("Error: ") and "exists" in again.output


def test_a_model_exported_without_the_unknown_score_is_retrained_without_it(setup):
    meta = {**read_metadata(setup["model"]), "transferkit_version": "test"}
    del meta["ood"]
    build_model(setup["model"], metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    review = make_image_folder(setup["tmp"] / "review", per_class=1, size=40, start=100)
    result = invoke(setup, review)
    assert result.exit_code == 0, result.output
    new = setup["tmp"] / "new.onnx"
    assert "ood" not in read_metadata(new) and [o.name for o in onnx.load(str(new)).graph.output] == ["probabilities"]


def test_a_worse_model_is_refused_unless_allowed(setup):
    review = setup["tmp"] / "review"
    missorted = {"red": (30, 200, 40), "green": (30, 40, 220), "blue": (220, 30, 30)}  # green as red, ...
    make_image_folder(review, per_class=40, size=40, start=200, classes=missorted)
    result = invoke(setup, review)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: the retrained softmax head is worse on the old model's ")
    assert "wrote no model" in result.output and len(result.output.splitlines()) == 1
    assert not (setup["tmp"] / "new.onnx").exists() and not (setup["tmp"] / "new-head").exists()
    assert len(rows_by_path(setup["store"])) == 60 + 120  # the images were added and extracted all the same
    allowed = invoke(setup, review, "--allow-worse")
    assert allowed.exit_code == 0, allowed.output
    assert "0 images computed, 180 unchanged" in allowed.output and "new (WORSE)" in allowed.output, allowed.output
    assert (setup["tmp"] / "new.onnx").is_file()


@pytest.mark.parametrize("folder, message", [
    ("unknown", "unknown/ holds 1 images; move each into the folder of its class"),
    ("purple", "purple/ is not a class of the model and holds 1 images"),
])
def test_unknown_and_new_classes_are_one_error_line(setup, folder, message):
    review = make_image_folder(setup["tmp"] / "review", per_class=1, classes={"red": (220, 30, 30),
                                                                              folder: (128, 128, 128)})
    result = invoke(setup, review)
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output
    assert len(result.output.splitlines()) == 1
    assert not (setup["images"] / "red" / "img_0.jpg").samefile(review / "red" / "img_0.jpg")  # nothing copied


def test_the_old_model_is_never_the_output_unless_told(setup):
    review = make_image_folder(setup["tmp"] / "review", per_class=1, size=40, start=100)
    result = CliRunner().invoke(cli, [str(a) for a in ("retrain", "--model", setup["model"], "--review", review,
                                                       "--out", setup["model"], "--quiet")])
    assert result.exit_code == 1 and "is the model being retrained" in result.output
