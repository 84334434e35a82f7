"""Registry, in-graph preprocessing (checked against Keras' own preprocess_input) and weights loading."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from extract.backbones import get_backbone, list_backbones
from extract.errors import WeightsUnavailable
from extract.models import build_backbone
from extract.preprocessing import ImagePreprocessing, preprocess_numpy
from extract.weights import resolve_weights

EXPECTED = {  # name: (feature dim, preprocessing, keras preprocess_input module)
    "resnet50": (2048, "caffe", keras.applications.resnet50),
    "resnet50v2": (2048, "tf", keras.applications.resnet_v2),
    "xception": (2048, "tf", keras.applications.xception),
    "inception_v3": (2048, "tf", keras.applications.inception_v3),
    "inception_resnet_v2": (1536, "tf", keras.applications.inception_resnet_v2),
    "mobilenet_v2": (1280, "tf", keras.applications.mobilenet_v2),
    "efficientnet_b0": (1280, "raw", keras.applications.efficientnet),
    "vgg16": (512, "caffe", keras.applications.vgg16),
}


def test_registry_lists_every_required_backbone():
    names = {spec.name for spec in list_backbones()}
    assert set(EXPECTED) | {"efficientnet_lite0"} <= names
    assert [s.name for s in list_backbones("resnet*")] == ["resnet50", "resnet50v2"]
    assert get_backbone("efficientnet_lite0").preprocessing == "lite"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preprocessing_matches_keras_preprocess_input(name):
    dim, mode, module = EXPECTED[name]
    spec = get_backbone(name)
    assert (spec.feature_dim, spec.preprocessing) == (dim, mode)
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.float32)
    original = images.copy()
    expected = module.preprocess_input(images.copy())
    np.testing.assert_allclose(preprocess_numpy(images, mode), expected, rtol=1e-5, atol=1e-4)
    layer_out = keras.ops.convert_to_numpy(ImagePreprocessing(mode)(images.astype(np.uint8)))
    np.testing.assert_allclose(layer_out, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(images, original)  # never mutated in place


def test_lite_preprocessing():
    x = np.array([[[[0, 127, 255]]]], dtype=np.uint8)
    np.testing.assert_allclose(preprocess_numpy(x, "lite"), [[[[-127 / 128, 0, 1]]]])


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "vgg16"])
def test_random_init_backbones_give_their_feature_dim(name):
    built = build_backbone(name, weights="none", input_size=32)
    out = built.model(np.zeros((2, 32, 32, 3), np.uint8))
    assert out.shape == (2, get_backbone(name).feature_dim)
    assert built.record.weights.id == "random-init:seed=0" and built.record.weights.seed == 0


def test_missing_imagenet_weights_name_the_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights(get_backbone("resnet50"), "imagenet")
    message = str(info.value)
    assert str(tmp_path / "keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5") in message
    assert "--weights PATH" in message and "--weights none" in message


def test_weights_from_keras_cache_and_from_path(tmp_path, monkeypatch):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    donor = build_backbone("mobilenet_v2", weights="none", input_size=32, seed=7)
    base = donor.model.layers[-1]
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    # the Keras cache holds legacy-format .h5 files under their download names
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cached = tmp_path / "keras" / "models" / get_backbone("mobilenet_v2").weights_file_notop
    cached.parent.mkdir(parents=True)
    with h5py.File(cached, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, base)
    from_cache = build_backbone("mobilenet_v2", weights="imagenet", input_size=32)
    np.testing.assert_allclose(from_cache.model(x), donor.model(x), rtol=1e-5)
    assert from_cache.weights.weights_id.startswith("imagenet:")
    # a local file given with --weights PATH
    weights_file = tmp_path / "mine.weights.h5"
    base.save_weights(weights_file)
    from_path = build_backbone("mobilenet_v2", weights=str(weights_file), input_size=32)
    np.testing.assert_allclose(from_path.model(x), donor.model(x), rtol=1e-5)
    assert from_path.weights.weights_id.startswith("file:mine.weights.h5:")
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        build_backbone("mobilenet_v2", weights=str(tmp_path / "nope.h5"), input_size=32)


def test_cli_backbones_and_weights_error(tmp_path, monkeypatch, image_folder):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    help_text = " ".join(CliRunner().invoke(cli, ["extract", "--help"]).output.split())
    assert "Works offline (weights install with the tool): efficientnet_lite0, efficientnet_lite1," in help_text
    result = CliRunner().invoke(cli, ["backbones", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["resnet50"]["weights_offline"] is False
    assert rows["efficientnet_lite0"]["weights_offline"] is True
    result = CliRunner().invoke(cli, ["extract", str(image_folder), "--store", str(tmp_path / "s.h5")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: no ImageNet weights for resnet50 here; --backbone efficientnet_lite0 "
                                    "works offline (its weights install with the tool). For resnet50: put ")
    assert len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("s.h5*"))  # a failed first run leaves no store, lock or segment folder


def test_cli_extract_and_store_info(tmp_path, image_folder):
    store = str(tmp_path / "s.h5")
    args = ["extract", str(image_folder), "--store", store, "--backbone", "mobilenet_v2", "--weights", "none",
            "--input-size", "32", "--engine", "keras", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "mobilenet_v2: 18 images" in result.output and "18 extracted" in result.output
    info = json.loads(CliRunner().invoke(cli, ["store", "info", store, "--json"]).output)
    assert {"images", "failed", "classes", "split_counts", "backbones"} <= set(info)
    assert info["backbones"]["mobilenet_v2"] == {**info["backbones"]["mobilenet_v2"], "rows": 18, "dim": 1280}
    missing = CliRunner().invoke(cli, ["store", "info", str(tmp_path / "nope.h5")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    not_a_store = tmp_path / "x.h5"
    not_a_store.write_text("hello")
    bad = CliRunner().invoke(cli, ["store", "info", str(not_a_store)])
    assert bad.exit_code == 1 and bad.output.startswith("Error: cannot open feature store")
