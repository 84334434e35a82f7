"""Fine-tuning on cached front outputs: the cut, the frozen front, and the keep-or-discard rule on validation."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from export import finetune, finetune_cached
from export.data import from_feature_set, load_batch
from export.finetune import fine_tune
from export.finetune_cached import HeadComparison, keep_fine_tuned
from export.front_cache import cache_front
from export.front_cut import _graph_from, block_of, cut_backbone
from export.keras_models import backbone_of, load_fine_tuned, sidecar_path
from extract.errors import TransferKitError
from extract.models import build_backbone


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("mobilenet_v2", weights="none", input_size=32, seed=3)


def test_block_names_of_the_backbone_families():
    assert block_of("blocks_11_bn2") == "blocks_11"  # EfficientNet-Lite (this project)
    assert block_of("block_12_add") == "block_12"  # MobileNetV2
    assert block_of("conv4_block6_out") == "conv4_block6"  # ResNet50
    assert block_of("block6a_expand_conv") == "block6a"  # keras EfficientNet
    assert block_of("Conv_1_bn") is None and block_of("conv_head") is None


def test_cached_front_is_the_frozen_models_intermediate_output(backbone, workspace):
    halves = cut_backbone(backbone, blocks=4)
    assert halves.cut_layer == "block_12_add" and halves.blocks == ["block_13", "block_14", "block_15", "block_16"]
    images = from_feature_set(workspace.features()).first(10)
    cached = cache_front(halves.front, images, 32, batch_size=4, mirror=True, skipped={})
    base = backbone_of(backbone.model)
    intermediate = keras.Model(base.input, base.get_layer("block_12_add").output)
    batch, _ = load_batch(images.paths, 32)
    preprocessed = backbone.model.get_layer("preprocessing")(batch)
    np.testing.assert_allclose(cached.tensors, intermediate(preprocessed), atol=1e-5)
    np.testing.assert_allclose(cached.mirrored, intermediate(preprocessed[:, :, ::-1]), atol=1e-5)
    assert cached.bytes_per_image == 2 * 2 * 96 * 4 and list(cached.labels) == list(images.labels)
    # front then back is the whole frozen backbone: the features the store holds
    np.testing.assert_allclose(halves.back(cached.tensors, training=False), backbone.model(batch), atol=1e-5)


def test_cuts_that_do_not_exist_are_refused(backbone):
    with pytest.raises(TransferKitError, match="--blocks must be between 0 and 15"):
        cut_backbone(backbone, blocks=16)
    base = backbone_of(backbone.model)
    with pytest.raises(TransferKitError, match="a connection crosses it"):  # block_12's residual skips this layer
        _graph_from(base, base.get_layer("block_12_project_BN"))


def test_cli_refuses_more_blocks_than_the_backbone_has(workspace, tmp_path):
    result = CliRunner().invoke(cli, ["fine-tune", str(workspace.images), "--head", str(workspace.head),
                                      "--store", str(workspace.store), "--blocks", "16", "--out", str(tmp_path / "m.keras")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == ("Error: --blocks must be between 0 and 15 for mobilenet_v2 "
                                                      "(16 blocks), got 16")
    assert list(tmp_path.iterdir()) == []


def test_keep_rule():
    assert keep_fine_tuned(0.90, 0.89) and not keep_fine_tuned(0.89, 0.89) and not keep_fine_tuned(0.88, 0.89)
    won = HeadComparison("svm", head=0.871, fine_tuned=0.889, validation_images=252, train_images=1770)
    lost = HeadComparison("svm", head=0.889, fine_tuned=0.871, validation_images=252, train_images=1770)
    assert won.line("m.keras") == ("fine-tuned 0.889 on validation > svm head 0.871 (252 images): "
                                   "kept the fine-tuned model; wrote m.keras")
    assert lost.line("m.keras") == ("fine-tuned 0.871 on validation <= svm head 0.889 (252 images): "
                                    "kept the head; model not written")
    assert won.to_dict()["kept"] == "fine-tuned" and lost.to_dict()["kept"] == "head"


def test_head_wins_no_model_written(workspace, tmp_path):
    """A learning rate that wrecks the network: the head (perfect on validation here) is kept."""
    out = tmp_path / "m.keras"
    result = CliRunner().invoke(cli, [
        "fine-tune", str(workspace.images), "--head", str(workspace.head), "--store", str(workspace.store),
        "--epochs", "1", "--learning-rate", "50", "--batch-size", "12", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m-report" / "metrics.json").read_text())
    comparison = metrics["comparison"]
    assert comparison["kept"] == "head" and comparison["fine_tuned"] <= comparison["head"]
    # before training, the classifier is the head fitted on the train images: the same validation accuracy
    assert metrics["validation_before"]["accuracy"] == pytest.approx(comparison["head"])
    assert (f"fine-tuned {comparison['fine_tuned']:.3f} on validation <= softmax head {comparison['head']:.3f} "
            f"({comparison['validation_images']} images): kept the head; model not written") in result.stdout
    assert not out.exists() and not sidecar_path(out).exists() and not (tmp_path / "m.best.keras").exists()
    assert metrics["written"] is False and "(the fine-tuned model, not written)" in result.stdout
    assert result.stderr == ""  # --quiet: no bars


@pytest.fixture(scope="module")
def fine_tuned_won(workspace, tmp_path_factory):
    """A cached run where the head to beat is made wrong on every validation image; records the order in
    which images were read and the decision made."""
    patch = pytest.MonkeyPatch()
    events = []
    real_baseline, real_cache_load, real_report_load = (finetune_cached.baseline_head, finetune_cached.cache_front,
                                                        finetune.load_image)

    def wrong_head(*args, **kwargs):
        _, start, dropout = real_baseline(*args, **kwargs)
        return 0.0, start, dropout

    def cached(front, images, *args, **kwargs):
        events.extend(("cache", p) for p in images.relpaths)
        return real_cache_load(front, images, *args, **kwargs)

    def decided(*args, **kwargs):
        trained = real_train(*args, **kwargs)
        events.append(("decided", trained[2].kept))
        return trained

    def report_load(path, *args, **kwargs):
        events.append(("report", path))
        return real_report_load(path, *args, **kwargs)

    real_train = finetune.train_cached
    patch.setattr(finetune_cached, "baseline_head", wrong_head)
    patch.setattr(finetune_cached, "cache_front", cached)
    patch.setattr(finetune, "train_cached", decided)
    patch.setattr(finetune, "load_image", report_load)
    out = tmp_path_factory.mktemp("won") / "m.keras"
    try:
        result = fine_tune(workspace.images, None, out, head=workspace.head, store=workspace.store, epochs=1,
                           batch_size=12)  # 36 train images: whole batches, one trace of the train step
    finally:
        patch.undo()
    return out, result, events


def test_fine_tuned_wins_model_written(fine_tuned_won, workspace):
    out, result, _ = fine_tuned_won
    assert result.comparison["kept"] == "fine-tuned" and result.written and result.comparison["head"] == 0.0
    model, info = load_fine_tuned(out)
    assert info["kept_over_head"] == result.comparison and info["training"]["mode"] == "cached-front"
    assert info["training"]["cut"]["layer"] == "block_12_add" and result.epochs_run == 1
    # the written model is the usual classifier on images (export-onnx, evaluate --model, predict take it)
    batch, _ = load_batch([str(workspace.images / workspace.features().paths[0])], 32)
    assert np.asarray(model(batch, training=False)).shape == (1, 3)


def test_training_touches_only_the_blocks_after_the_cut(fine_tuned_won, backbone):
    model, _ = load_fine_tuned(fine_tuned_won[0])
    fresh, tuned = backbone_of(backbone.model), backbone_of(model)  # the store's backbone: seed 3
    cut = [layer.name for layer in fresh.layers].index("block_12_add")
    changed = {layer.name for layer in fresh.layers if layer.weights and not all(
        np.array_equal(a, b) for a, b in zip(layer.get_weights(), tuned.get_layer(layer.name).get_weights()))}
    after = {layer.name for layer in fresh.layers[cut + 1:] if layer.weights}
    assert changed and changed <= after  # nothing before the cut moved
    assert not any(isinstance(tuned.get_layer(name), keras.layers.BatchNormalization) for name in changed)
    assert {"block_13_project", "block_16_project", "Conv_1"} <= changed


def test_validation_decides_and_test_is_read_only_afterwards(fine_tuned_won, workspace):
    _, result, events = fine_tuned_won
    features = workspace.features()
    split_of = dict(zip(features.paths, features.splits))
    cached = [p for kind, p in events if kind == "cache"]
    assert sorted(cached) == sorted(p for p, s in split_of.items() if s != "test")  # train and validation only
    decided_at = events.index(("decided", "fine-tuned"))
    test_paths = {str(workspace.images / p) for p, s in split_of.items() if s == "test"}
    reported = [i for i, (kind, p) in enumerate(events) if kind == "report" and p in test_paths]
    assert reported and min(reported) > decided_at  # test images are decoded after the decision, for the report
    assert result.comparison["validation_images"] == sum(s == "validation" for s in split_of.values())
    assert result.test["images"] == len(test_paths)


@pytest.mark.parametrize("kind", ["rbf", "mlp"])
def test_the_head_to_beat_and_the_classifiers_start(kind):
    """The head to beat has the --head's kind; the classifier starts from its dense layers, or from a
    softmax probe when the kind has none (rbf)."""
    from export.finetune_cached import baseline_head
    from export.front_cache import CachedSplit

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))

    def split(n):
        labels = np.arange(n) % 3
        tensors = (centres[labels][:, None, None, :] + rng.normal(0, 1, (n, 2, 2, 8))).astype(np.float32)
        return CachedSplit(tensors, labels, tensors[:, :, ::-1])

    back = keras.Sequential([keras.Input((2, 2, 8)), keras.layers.GlobalAveragePooling2D()])
    accuracy, layers, dropout = baseline_head(kind, split(30), split(15), back, seed=0)
    assert 0.9 <= accuracy <= 1.0  # well separated classes
    assert [W.shape for W, _ in layers][-1] == (layers[-1][0].shape[0], 3)
    assert len(layers) == (1 if kind == "rbf" else 2) and dropout == (0.0 if kind == "rbf" else pytest.approx(0.3))
