"""The int8 extraction engine: quantized once and cached by its images, gated on a linear head's
accuracy, its features kept apart from fp32 ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_image_folder, write_image

import extract.int8
from classify.data import features_for_head
from classify.heads import make_head
from classify.persist import TrainedHead
from extract.int8 import features_name
from extract.job import run_extraction
from extract.paths import cache_dir
from extract.store import FeatureStore

INT8 = dict(backbone="mobilenet_v2", weights="none", input_size=32, progress=False, engine="onnx-int8")
GREYS = {"dark": (40, 40, 40), "mid": (75, 75, 75), "light": (110, 110, 110)}


def _grey_folder(root, size):
    """Three classes told apart by brightness only (each test its own ``size``: its own cache key)."""
    return make_image_folder(root, per_class=10, size=size, classes=GREYS)


def _head_on(features, store) -> TrainedHead:
    head = make_head("softmax", seed=0).fit(*features.subset("train"))
    return TrainedHead(head, features.class_names, features.backbone, {"path": str(store), "fingerprint": ""})


def _int8_engines() -> set[str]:
    return {p.name for p in cache_dir("engines").glob("*-int8-*.onnx")}


def _no_quantizing(*args, **kwargs):
    raise AssertionError("quantized again although an engine for these images is cached")


def test_int8_engine_is_cached_and_keyed_by_its_images(tmp_path, monkeypatch):
    images = _grey_folder(tmp_path / "images", size=40)
    before = _int8_engines()
    first = run_extraction(images, tmp_path / "a.h5", **INT8)
    assert (first.backbone, first.engine, first.extracted) == ("mobilenet_v2@int8", "onnx-int8", 30)
    assert first.notes[0].startswith("int8 engine for mobilenet_v2 accepted") and "cosine" in first.notes[0]
    new = _int8_engines() - before
    assert len(new) == 1
    record = FeatureStore(tmp_path / "a.h5").read("mobilenet_v2@int8").backbone
    assert record.engine == "onnx-int8" and record.quantization["format"] == "QDQ"
    assert record.quantization["engine_key"] in new.pop()
    report = json.loads(next(cache_dir("engines").glob(f"*{record.quantization['engine_key']}.json")).read_text())
    assert report["accuracy_fp32"] == 1.0 and report["drop_points"] <= 0.5

    with monkeypatch.context() as patch:
        patch.setattr(extract.int8, "quantize_int8", _no_quantizing)
        again = run_extraction(images, tmp_path / "b.h5", **INT8)  # another store, same images: the cached engine
    assert again.backbone == "mobilenet_v2@int8" and again.notes[0].endswith("(cached)")
    np.testing.assert_array_equal(FeatureStore(tmp_path / "a.h5").read("mobilenet_v2@int8").features,
                                  FeatureStore(tmp_path / "b.h5").read("mobilenet_v2@int8").features)

    for path in (images / "dark").iterdir():  # the calibration images change
        write_image(path, (45, 45, 45), size=40, seed=7)
    run_extraction(images, tmp_path / "c.h5", **INT8)
    assert len(_int8_engines() - before) == 2


def test_broken_calibration_is_refused_and_fp32_used(tmp_path, monkeypatch):
    images = _grey_folder(tmp_path / "images", size=36)
    calibrate = extract.int8._calibration_batches
    # calibrated on white images only, every darker pixel saturates: the classes become one
    monkeypatch.setattr(extract.int8, "_calibration_batches", lambda x: calibrate(np.full_like(x, 255)))
    summary = run_extraction(images, tmp_path / "f.h5", **INT8)
    assert (summary.backbone, summary.engine, summary.extracted) == ("mobilenet_v2", "onnx", 30)
    assert summary.notes[0].startswith("int8 engine for mobilenet_v2 refused: linear-head accuracy 100.0% fp32")
    assert summary.notes[0].endswith("computed fp32 features (mobilenet_v2) instead")
    assert FeatureStore(tmp_path / "f.h5").backbones == ["mobilenet_v2"]

    monkeypatch.setattr(extract.int8, "quantize_int8", _no_quantizing)
    again = run_extraction(images, tmp_path / "g.h5", **INT8)  # the cached verdict, not a new quantization
    assert again.backbone == "mobilenet_v2" and "refused" in again.notes[0]


def test_too_few_images_to_judge_is_refused(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=1, size=28, classes=GREYS)
    summary = run_extraction(images, tmp_path / "f.h5", **INT8)
    assert summary.backbone == "mobilenet_v2" and "too few images to check its accuracy" in summary.notes[0]


def test_int8_rows_never_mix_with_fp32_rows(tmp_path):
    images = _grey_folder(tmp_path / "images", size=40)  # the first test's images: its cached engine
    store = tmp_path / "f.h5"
    run_extraction(images, store, **{**INT8, "engine": "onnx"})
    fp32_before = FeatureStore(store).read("mobilenet_v2").features.copy()
    run_extraction(images, store, **INT8)
    reader = FeatureStore(store)
    assert reader.backbones == ["mobilenet_v2", "mobilenet_v2@int8"]
    np.testing.assert_array_equal(reader.read("mobilenet_v2").features, fp32_before)
    assert reader.read("mobilenet_v2").backbone.engine == "onnx"
    assert reader.read("mobilenet_v2").backbone.quantization is None
    int8 = reader.read("mobilenet_v2@int8").features
    assert int8.shape == fp32_before.shape and not np.array_equal(int8, fp32_before)

    head = _head_on(reader.read("mobilenet_v2@int8"), store)
    assert features_for_head(head, store).backbone.engine == "onnx-int8"  # not the fp32 rows beside them

    make_image_folder(images, per_class=1, size=40, classes=GREYS, start=50)  # 3 new images
    summary = run_extraction(images, store, **{**INT8, "engine": "auto"})  # both held: auto means fp32
    assert (summary.backbone, summary.extracted) == ("mobilenet_v2", 3)
    assert len(FeatureStore(store).read("mobilenet_v2@int8").paths) == 30


def test_auto_keeps_a_store_of_int8_rows_int8(tmp_path):
    images = _grey_folder(tmp_path / "images", size=40)  # the first test's images: its cached engine
    store = tmp_path / "f.h5"
    run_extraction(images, store, **INT8)
    make_image_folder(images, per_class=1, size=40, classes=GREYS, start=60)
    summary = run_extraction(images, store, **{**INT8, "engine": "auto"})
    assert (summary.backbone, summary.engine, summary.extracted) == ("mobilenet_v2@int8", "onnx-int8", 3)
    assert FeatureStore(store).backbones == [features_name("mobilenet_v2", True)]


def test_cli_engine_choice_and_tolerance(tmp_path):
    from click.testing import CliRunner

    from cli import cli

    images = _grey_folder(tmp_path / "images", size=40)
    result = CliRunner().invoke(cli, ["extract", str(images), "--store", str(tmp_path / "f.h5"), "--backbone",
                                      "mobilenet_v2", "--weights", "none", "--input-size", "32", "--engine",
                                      "onnx-int8", "--tolerance", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "int8 engine for mobilenet_v2 accepted" in result.output
    assert "mobilenet_v2@int8: 30 images" in result.output
    bad = CliRunner().invoke(cli, ["extract", str(images), "--store", str(tmp_path / "g.h5"), "--tolerance", "-1"])
    assert bad.exit_code == 2 and "--tolerance" in bad.output


def test_extract_on_a_cached_int8_engine_imports_no_tensorflow_nor_sklearn(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    images = _grey_folder(tmp_path / "images", size=40)  # the first test's images: its cached engine
    run_extraction(images, tmp_path / "a.h5", **INT8)  # quantizes and gates, unless an earlier test did
    heavy = ("tensorflow", "keras", "tf2onnx", "sklearn", "onnx")
    argv = ["cli.py", "extract", str(images), "--store", str(tmp_path / "b.h5"), "--backbone", "mobilenet_v2",
            "--weights", "none", "--input-size", "32", "--engine", "onnx-int8", "--quiet"]
    probe = ("import atexit, runpy, sys; "
             f"atexit.register(lambda: print('heavy:', [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)); "
             f"sys.argv = {argv!r}; runpy.run_path('cli.py', run_name='__main__')")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr
    assert "mobilenet_v2@int8: 30 images" in done.stdout and "(cached)" in done.stderr
    assert done.stderr.splitlines()[-1] == "heavy: []", done.stderr


def test_the_int8_engine_runs_in_streams_like_fp32(tmp_path, monkeypatch):
    import extract.job

    images = _grey_folder(tmp_path / "images", size=40)  # the first test's images: its cached engine
    real, used = extract.job.run_in_streams, []

    def spy(compute, items, streams, take):
        engine = compute.args[0]  # compute: partial(_features_of, engine, feature_dim)
        used.append((engine.name, streams, engine.session.get_session_options().intra_op_num_threads))
        return real(compute, items, streams, take)

    monkeypatch.setattr(extract.job, "run_in_streams", spy)
    summary = run_extraction(images, tmp_path / "a.h5", threads=2, **INT8)
    assert summary.backbone == "mobilenet_v2@int8" and used == [("onnx-int8", 2, 1)]
