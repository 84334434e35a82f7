"""Fine-tuning: classifier initialised from a head, frozen BatchNorm, the store's split, report files, CLI."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import STORE_SEED, make_image_folder

from classify.persist import load_head
from cli import cli
from export.data import from_feature_set, from_folder, load_batch
from extract.splits import SplitSettings
from export.finetune import fine_tune, parse_unfreeze, starting_point
from export.keras_models import (
    backbone_of,
    classifier_layers,
    classifier_model,
    load_fine_tuned,
    set_trainable,
)
from extract.errors import TransferKitError
from extract.models import build_backbone


def _batch_norms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in backbone_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)]


@pytest.mark.parametrize("head_name", ["head", "mlp_head"])
def test_classifier_starts_as_the_head(workspace, head_name):
    head_path = getattr(workspace, head_name)
    trained = load_head(head_path)
    begin = starting_point(workspace.images, None, head_path, workspace.store, None, None, seed=0)
    model = classifier_model(begin.built, 3, begin.layers, begin.dropout)
    for (W, b), (W_head, b_head) in zip(classifier_layers(model), trained.head.network(), strict=True):
        np.testing.assert_array_equal(W, W_head)
        np.testing.assert_array_equal(b, b_head)
    dropouts = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert dropouts == ([0.3] if head_name == "mlp_head" else [])
    features = workspace.features()
    images = from_feature_set(features)
    batch, _ = load_batch(images.paths, 32)
    probs = np.asarray(model.predict(batch, verbose=0))
    np.testing.assert_allclose(probs, trained.predict_proba(features.features), atol=1e-4)
    assert np.mean(probs.argmax(1) == features.labels) == np.mean(trained.head.predict(features.features) == features.labels)


def test_unfreezing_never_touches_batch_norm():
    model = classifier_model(build_backbone("mobilenet_v2", weights="none", input_size=32), 3)
    assert set_trainable(model, None) > 0
    assert not any(bn.trainable for bn in _batch_norms(model))
    top = set_trainable(model, 10)
    assert 0 < top <= 10 and not any(bn.trainable for bn in _batch_norms(model))
    assert set_trainable(model, 0) == 0
    assert set_trainable(model, 10_000) == set_trainable(model, None)  # more than there are: all


def test_fine_tuned_model_files_and_frozen_statistics(fine_tuned, workspace):
    out, result = fine_tuned
    report = out.parent / "model-report"
    assert result.report_dir == str(report) and result.warmup_epochs == 0 and result.epochs_run == 2
    assert (report / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "macro-F1" in (report / "test_report.txt").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["test"]["images"] > 0 and 0 <= metrics["test"]["accuracy"] <= 1
    assert len(metrics["history"]["val_loss"]) == 2
    assert not (out.parent / "model.best.keras").exists()
    X_test, y_test = workspace.features().subset("test")  # the head's score on the same split, for comparison
    assert result.head_test == {"accuracy": pytest.approx(np.mean(load_head(workspace.head).head.predict(X_test) == y_test)),
                                "macro_f1": pytest.approx(result.head_test["macro_f1"]), "images": len(y_test)}

    # before any training step the model is the head: same validation accuracy
    trained = load_head(workspace.head)
    X_val, y_val = workspace.features().subset("validation")
    assert result.validation_before["accuracy"] == pytest.approx(np.mean(trained.head.predict(X_val) == y_val))

    model, info = load_fine_tuned(out)
    assert info["class_names"] == ["blue", "green", "red"]
    assert info["backbone"]["weights"]["id"] == f"random-init:seed={STORE_SEED}"
    assert info["split_settings"] == SplitSettings.resolve(workspace.features().store_attrs).to_attrs()
    assert info["head"]["kind"] == "softmax" and info["training"]["unfreeze"] == "all"
    fresh = backbone_of(build_backbone("mobilenet_v2", weights="none", input_size=32, seed=STORE_SEED).model)
    tuned = backbone_of(model)
    batch_norms = _batch_norms(model)
    assert batch_norms and not any(bn.trainable for bn in batch_norms)
    for bn in batch_norms:  # gamma, beta, moving mean and variance untouched by training
        for got, want in zip(bn.get_weights(), fresh.get_layer(bn.name).get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)
    convs = [layer.name for layer in fresh.layers if isinstance(layer, keras.layers.Conv2D)]
    assert all(not np.array_equal(tuned.get_layer(name).get_weights()[0], fresh.get_layer(name).get_weights()[0])
               for name in convs)  # --unfreeze all trained every convolution

def test_split_is_the_stores_column(workspace, monkeypatch):
    """With a store, fine-tuning reads each image's split from the store; it never re-discovers the folder."""
    from export import finetune

    features = workspace.features()
    monkeypatch.setattr(finetune, "from_folder", lambda *a, **k: pytest.fail("the folder was re-discovered"))
    for trained in (None, load_head(workspace.head)):
        images, settings, _, store = finetune.labelled_images(workspace.images, trained, workspace.store, seed=0)
        by_path = dict(zip(images.relpaths, images.split))
        assert by_path == dict(zip(features.paths, features.splits))
        assert settings.seed == STORE_SEED and store["path"] == str(workspace.store.resolve())
    monkeypatch.undo()
    default = from_folder(workspace.images, SplitSettings())
    assert dict(zip(default.relpaths, default.split)) != by_path  # the store's seed matters


def test_cli_fine_tune_with_warm_up(workspace, tmp_path):
    out = tmp_path / "warm.keras"
    result = CliRunner().invoke(cli, [
        "fine-tune", str(workspace.images), "--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32",
        "--store", str(workspace.store), "--epochs", "1", "--warmup-epochs", "1", "--unfreeze", "5", "--no-cache-front",
        "--batch-size", "16", "--out", str(out), "--report-dir", str(tmp_path / "report"),
    ])
    assert result.exit_code == 0, result.output
    assert "after 1 warm-up epochs" in result.output and "test: accuracy" in result.output
    assert "val_accuracy" in result.stderr and "stop_" not in result.stderr  # end-to-end: the validation split picks the epoch
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["warmup_epochs"] == 1 and len(metrics["history"]["loss"]) == 2
    assert (tmp_path / "report" / "training_curves.png").is_file()
    _, info = load_fine_tuned(out)
    assert info["head"] is None and info["split_settings"]["seed"] == STORE_SEED


def test_cli_fine_tune_from_a_head_shows_progress_and_compares_with_the_head(workspace, tmp_path):
    result = CliRunner().invoke(cli, [
        "fine-tune", str(workspace.images), "--head", str(workspace.head), "--store", str(workspace.store),
        "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "m.keras")])
    assert result.exit_code == 0, result.output
    X_test, y_test = workspace.features().subset("test")
    head_accuracy = 100 * np.mean(load_head(workspace.head).head.predict(X_test) == y_test)
    comparison = next(line for line in result.stdout.splitlines() if line.startswith("compared with the head: "))
    assert f"vs {head_accuracy:.2f}% head on the same test split ({len(y_test)} images in the store)" in comparison
    epoch_line = next(line for line in result.stderr.splitlines() if line.startswith("fine-tuning epoch 1/1 ("))
    assert "stop_accuracy" in epoch_line and "val_" not in epoch_line  # the cached mode's epoch is picked on stop rows
    assert "caching fit rows (+ mirrored)" in result.stderr and "caching stop rows" in result.stderr
    assert "caching decide rows" in result.stderr
    assert "fine-tuning epoch" not in result.stdout


@pytest.mark.parametrize("cache_front", [True, False])
def test_ctrl_c_during_fine_tuning_leaves_no_checkpoint_and_no_report(workspace, tmp_path, monkeypatch, cache_front):
    from export.progress import EpochProgress

    original = EpochProgress.on_epoch_begin

    def interrupt_second_epoch(self, epoch, logs=None):
        if epoch == 1:  # the first epoch's checkpoint is on disk by now
            assert (tmp_path / "m.best.keras").is_file()
            raise KeyboardInterrupt
        original(self, epoch, logs)

    monkeypatch.setattr(EpochProgress, "on_epoch_begin", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(workspace.images, None, tmp_path / "m.keras", head=workspace.head, store=workspace.store,
                  epochs=2, batch_size=16, unfreeze="2", progress=True, cache_front=cache_front)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no m.best.keras, no m-report/, no m.keras


def test_refusals(workspace, tmp_path):
    runner = CliRunner()

    def refused(*args):
        result = runner.invoke(cli, ["fine-tune", *map(str, args)])
        assert result.exit_code != 0 and "Traceback" not in result.output
        return result.output

    images, head = workspace.images, workspace.head
    assert "trained on mobilenet_v2 features, not resnet50" in refused(images, "--head", head, "--backbone", "resnet50",
                                                                       "--out", tmp_path / "m.keras")
    assert "trained on 32 px features, not 64 px" in refused(images, "--head", head, "--image-size", 64,
                                                             "--out", tmp_path / "m.keras")
    assert "--unfreeze must be" in refused(images, "--head", head, "--no-cache-front", "--unfreeze", "top",
                                           "--out", tmp_path / "m.keras")
    assert "must end in .keras" in refused(images, "--head", head, "--out", tmp_path / "m.h5")
    other = make_image_folder(tmp_path / "other", per_class=3, classes={"cat": (1, 2, 3), "dog": (200, 100, 0)})
    assert "has classes ['cat', 'dog']" in refused(other, "--head", head, "--out", tmp_path / "m.keras")
    assert "the store's images are not at" in refused(other, "--head", head, "--store", workspace.store,
                                                      "--out", tmp_path / "m.keras")
    assert list(tmp_path.glob("*.keras")) == []
    tiny = make_image_folder(tmp_path / "tiny", per_class=1)
    with pytest.raises(TransferKitError, match="needs more train images: 3 to train on, 0 to pick the epoch"):
        fine_tune(tiny, "mobilenet_v2", tmp_path / "m.keras", weights="none", image_size=32, epochs=1)
    with pytest.raises(TransferKitError, match="needs train and validation images"):
        fine_tune(tiny, "mobilenet_v2", tmp_path / "m.keras", weights="none", image_size=32, epochs=1,
                  cache_front=False)


def test_parse_unfreeze():
    assert parse_unfreeze("all") is None and parse_unfreeze("ALL") is None
    assert parse_unfreeze("0") == 0 and parse_unfreeze(12) == 12
    with pytest.raises(TransferKitError):
        parse_unfreeze("-1")


def test_predict_and_evaluate_accept_the_fine_tuned_model(fine_tuned, workspace, tmp_path):
    out, result = fine_tuned
    report = CliRunner().invoke(cli, ["evaluate", "--model", str(out), "--store", str(workspace.store),
                                      "--report-dir", str(tmp_path / "r"), "--json", "--quiet"])
    assert report.exit_code == 0, report.output
    metrics = json.loads(report.stdout)
    assert metrics["kind"] == "fine-tuned" and metrics["n"] == result.test["images"]
    assert metrics["accuracy"] == pytest.approx(result.test["accuracy"])  # the same test split as fine-tune's
    assert (tmp_path / "r" / "confusion_matrix.png").is_file() and (tmp_path / "r" / "tsne.png").is_file()

    image = workspace.images / workspace.features().paths[0]
    predicted = CliRunner().invoke(cli, ["predict", "--model", str(out), str(image), "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert "engine Keras (model.keras)" in predicted.stderr
    model, _ = load_fine_tuned(out)
    batch, _ = load_batch([str(image)], 32)
    expected = np.asarray(model(batch, training=False))[0]
    assert json.loads(predicted.stdout)["probability"] == pytest.approx(float(expected.max()), abs=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--unfreeze", "all"], "Error: --unfreeze is not used with --cache-front (the default): give --no-cache-front"),
    (["--warmup-epochs", "1", "--unfreeze", "3"],
     "Error: --unfreeze, --warmup-epochs are not used with --cache-front (the default)"),
    (["--no-cache-front", "--blocks", "3"], "Error: --blocks is not used with --no-cache-front: give --cache-front"),
])
def test_an_option_the_mode_never_reads_is_refused_not_ignored(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["fine-tune", str(tmp_path), "--backbone", "mobilenet_v2", *args,
                                      "--out", str(tmp_path / "m.keras")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.keras").exists()
