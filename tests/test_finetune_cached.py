"""Fine-tuning on cached front outputs: the cut, the frozen front, and the keep-or-discard rule on validation."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_image_folder

from cli import cli
from export import finetune, finetune_cached
from export.data import from_feature_set, load_batch
from export.finetune import fine_tune
from export.finetune_cached import HeadComparison, keep_fine_tuned
from export.front_cache import cache_front
from export.front_cut import _graph_from, block_of, cut_backbone
from export.holdout import row_roles
from export.keras_models import backbone_of, load_fine_tuned, sidecar_path
from extract.errors import TransferKitError
from extract.job import run_extraction
from extract.models import build_backbone
from extract.splits import SplitSettings
from extract.store import FeatureStore


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


def comparison(head: float, fine_tuned: float) -> HeadComparison:
    return HeadComparison("svm", head=head, fine_tuned=fine_tuned, decide_images=252, head_images=2025,
                          fit_images=1822, stop_images=203, stop_accuracy=0.95)


def test_keep_rule():
    assert keep_fine_tuned(0.90, 0.89) and not keep_fine_tuned(0.89, 0.89) and not keep_fine_tuned(0.88, 0.89)
    won, lost, tie = comparison(0.871, 0.889), comparison(0.889, 0.871), comparison(0.889, 0.889)
    assert won.line("m.keras") == ("fine-tuned 0.889 > svm head 0.871 on 252 images (validation split; the epoch "
                                   "was picked on 203 other train images): kept the fine-tuned model; wrote m.keras")
    assert lost.line("m.keras") == ("fine-tuned 0.871 <= svm head 0.889 on 252 images (validation split; the epoch "
                                    "was picked on 203 other train images): kept the head; model not written")
    assert won.to_dict()["kept"] == "fine-tuned" and lost.to_dict()["kept"] == "head"
    assert tie.kept == "head"  # a tie keeps the head: smaller, already exported


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
    assert metrics["validation_before"]["on"] == "stop rows"
    assert (f"fine-tuned {comparison['fine_tuned']:.3f} <= softmax head {comparison['head']:.3f} on "
            f"{comparison['decide_images']} images (validation split; the epoch was picked on "
            f"{comparison['stop_images']} other train images): kept the head; model not written") in result.stdout
    assert not out.exists() and not sidecar_path(out).exists() and not (tmp_path / "m.best.keras").exists()
    assert metrics["written"] is False and "(the fine-tuned model, not written)" in result.stdout
    assert result.stderr == ""  # --quiet: no bars


@pytest.fixture(scope="module")
def fine_tuned_won(workspace, tmp_path_factory):
    """A cached run where the head to beat is made wrong on every validation image; records the order in
    which images were read, which rows each step read, and the decision made."""
    patch = pytest.MonkeyPatch()
    events = []
    real_baseline, real_cache_load, real_report_load = (finetune_cached.baseline_head, finetune_cached.cache_front,
                                                        finetune.load_image)
    real_dataset, real_accuracy = finetune_cached.cached_dataset, finetune_cached.accuracy_on

    def wrong_head(kind, rows, back, seed):
        events.append(("head", {"fit": rows.fit.relpaths, "stop": rows.stop.relpaths, "decide": rows.decide.relpaths}))
        baseline = real_baseline(kind, rows, back, seed)
        baseline.accuracy = 0.0
        return baseline

    def dataset(split, batch_size, seed, train):  # train=True: gradient steps; False: the early-stopping loss
        events.append(("train" if train else "pick epoch", split.relpaths))
        return real_dataset(split, batch_size, seed, train)

    def scored(trainer, split, batch_size):
        accuracy = real_accuracy(trainer, split, batch_size)
        events.append(("score", (frozenset(split.relpaths), accuracy)))
        return accuracy

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
    patch.setattr(finetune_cached, "cached_dataset", dataset)
    patch.setattr(finetune_cached, "accuracy_on", scored)
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
    assert result.comparison["decide_images"] == sum(s == "validation" for s in split_of.values())
    assert result.test["images"] == len(test_paths)


def test_the_epoch_is_picked_on_train_rows_the_validation_split_decides(fine_tuned_won, workspace):
    """No image both picks the epoch and decides keep-or-not; the head to beat was fitted on the fit and stop
    rows, the stop rows are the stated hash carve of the train split."""
    _, result, events = fine_tuned_won
    features = workspace.features()
    split_of = dict(zip(features.paths, features.splits))
    validation = {p for p, s in split_of.items() if s == "validation"}
    trained = {p for kind, rows in events if kind == "train" for p in rows}
    picked = {p for kind, rows in events if kind == "pick epoch" for p in rows}
    assert trained and picked and not trained & picked and not (trained | picked) & validation
    assert trained | picked == {p for p, s in split_of.items() if s == "train"}
    images = from_feature_set(features, workspace.images)
    stated = row_roles(images.subset("train"), images.subset("validation"), SplitSettings.resolve(features.store_attrs))
    assert picked == set(stated.stop.relpaths) and trained == set(stated.fit.relpaths)
    [head_rows] = [rows for kind, rows in events if kind == "head"]
    assert set(head_rows["fit"]) | set(head_rows["stop"]) == trained | picked  # the head: the same train images
    assert set(head_rows["decide"]) == validation
    scores = dict(rows for kind, rows in events if kind == "score")
    assert result.comparison["fine_tuned"] == scores[frozenset(validation)]  # what decided: validation rows
    assert result.comparison["stop_accuracy"] == scores[frozenset(picked)]  # reported, not deciding
    assert result.comparison["stop_images"] == len(picked) and result.comparison["fit_images"] == len(trained)
    assert result.comparison["head_images"] == len(trained | picked) and result.comparison["on"] == "validation split"


def test_a_store_without_validation_decides_on_a_second_carve_of_train(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=10, size=40)
    store = tmp_path / "features.h5"
    run_extraction(images, store, backbone="mobilenet_v2", weights="none", input_size=32, seed=0,
                   validation_split=0.0, test_split=0.2, engine="keras", progress=False)
    out = tmp_path / "m.keras"
    result = fine_tune(images, "mobilenet_v2", out, store=store, weights="none", image_size=32, epochs=1, batch_size=8)
    splits = FeatureStore(store).read("mobilenet_v2").splits
    c = result.comparison
    assert "validation" not in set(splits) and c["on"] == "carved from train (no validation split)"
    assert c["fit_images"] + c["stop_images"] + c["decide_images"] == int(np.sum(splits == "train"))
    assert c["decide_images"] == 3 and c["stop_images"] == 3  # one image of each class for each job
    assert c["head_kind"] == "softmax" and result.written == (c["kept"] == "fine-tuned") == out.exists()
    assert json.loads((tmp_path / "m-report" / "metrics.json").read_text())["comparison"] == c


@pytest.mark.parametrize("kind", ["rbf", "mlp"])
def test_the_head_to_beat_and_the_classifiers_start(kind, monkeypatch):
    """The head to beat has the --head's kind and is fitted on the fit + stop rows; the classifier starts
    from the dense layers of one fitted on the fit rows alone, a softmax probe when the kind has none (rbf)."""
    from classify.heads import make_head
    from export.finetune_cached import CachedRows, baseline_head
    from export.front_cache import CachedSplit

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))

    def split(n):
        labels = np.arange(n) % 3
        tensors = (centres[labels][:, None, None, :] + rng.normal(0, 1, (n, 2, 2, 8))).astype(np.float32)
        return CachedSplit(tensors, labels, tensors[:, :, ::-1])

    fits = []

    def recording(name, seed):
        head = make_head(name, seed)
        fit = head.fit
        head.fit = lambda X, y: (fits.append((name, len(y))), fit(X, y))[1]
        return head

    monkeypatch.setattr(finetune_cached, "make_head", recording)
    rows = CachedRows(split(30), split(6), split(15), "validation split")
    back = keras.Sequential([keras.Input((2, 2, 8)), keras.layers.GlobalAveragePooling2D()])
    baseline = baseline_head(kind, rows, back, seed=0)
    assert fits == [(kind, 36), ("softmax" if kind == "rbf" else kind, 30)]
    X = {name: rows_of.tensors.mean(axis=(1, 2)) for name, rows_of in vars(rows).items() if name != "decide_source"}
    again = make_head(kind, 0).fit(np.concatenate([X["fit"], X["stop"]]), np.r_[rows.fit.labels, rows.stop.labels])
    assert baseline.accuracy == np.mean(again.predict(X["decide"]) == rows.decide.labels) >= 0.9
    assert baseline.head_images == 36 and [W.shape for W, _ in baseline.start][-1][1] == 3
    assert len(baseline.start) == (1 if kind == "rbf" else 2)
    assert baseline.dropout == (0.0 if kind == "rbf" else pytest.approx(0.3))


def test_the_sweep_trains_every_setting_from_the_same_start(workspace, tmp_path):
    """bench/finetune_sweep.py: one front cache, the back's weights restored before each setting, so the
    same setting twice gives the same figures, to the last bit of the training loss; test is scored."""
    from dataclasses import replace

    from bench.finetune_sweep import parse_settings, sweep
    from export.finetune import TrainingSettings, starting_point

    begin = starting_point(workspace.images, None, workspace.head, workspace.store, None, None, 0)
    roles = row_roles(begin.images.subset("train"), begin.images.subset("validation"), begin.split_settings)
    base = replace(TrainingSettings.for_mode(True, None, None, batch_size=12), patience=1)
    settings = parse_settings("3e-4:constant:1,3e-4:constant:1")
    assert settings[0] == {"learning_rate": 3e-4, "schedule": "constant", "epochs": 1}
    head, rows = sweep(begin, roles, base, settings, tmp_path)
    figures = [(r["train_loss"], r["stop"], r["decide"], r["test"], r["best_epoch"]) for r in rows]
    assert figures[0] == figures[1]  # without the restore, the second would start from the first's weights
    assert head["rows"]["decide"] == int(np.sum(begin.images.split == "validation"))
    assert head["rows"]["test"] == int(np.sum(begin.images.split == "test")) and 0 <= head["test"] <= 1


def test_the_sweep_summary_ranks_settings_by_mean_validation_score_not_test(tmp_path):
    from bench.finetune_sweep import summarize

    def run(data, *rows):
        path = tmp_path / f"{data}.json"
        settings = [{"learning_rate": lr, "schedule": "cosine", "epochs": 6, "stop": 0.9, "decide": decide,
                     "test": test, "kept": "fine-tuned"} for lr, decide, test in rows]
        path.write_text(json.dumps({"data": f"../shared/datasets/{data}", "settings": settings}))
        return str(path)

    fruits = run("fruits", (3e-4, 0.99, 0.90), (1e-4, 0.97, 0.99), (3e-5, 1.0, 1.0))  # 3e-5: one set only
    summary = summarize([fruits, run("trashnet", (3e-4, 0.90, 0.80), (1e-4, 0.91, 0.95))])
    assert [(r["learning_rate"], r["mean_decide"]) for r in summary["settings"]] == [
        (1e-4, pytest.approx(0.94)), (3e-4, pytest.approx(0.945))]
    assert summary["best"] == (3e-4, "cosine", 6)  # the validation score decides, though 1e-4 is better on test
    default = (finetune_cached.CACHED_LEARNING_RATE, "cosine", finetune_cached.CACHED_EPOCHS)
    assert summary["default"] == default
    tied = summarize([run("fruits", (3e-5, 0.95, 0.9), default[:1] + (0.95, 0.8)), run("trashnet", (3e-5, 0.9, 0.9),
                                                                                       default[:1] + (0.9, 0.8))])
    assert tied["best"] == default  # a tie keeps the default, whatever its place in the table


def test_an_unknown_schedule_is_refused_not_run_as_cosine():
    from bench.finetune_sweep import parse_settings
    from export.finetune import TrainingSettings

    with pytest.raises(ValueError, match="'linear'"):
        parse_settings("1e-4:cosine:6,1e-4:linear:6")
    with pytest.raises(TransferKitError, match="schedule must be one of cosine, constant"):
        TrainingSettings(schedule="linear").check()
    TrainingSettings(schedule="constant").check()


@pytest.mark.parametrize("kind", ["svm", "softmax", "mlp", "rbf"])
def test_a_head_kind_says_whether_a_classifier_can_start_from_its_layers(kind):
    """has_dense_layers (the classifier starts from the head's own layers, else from softmax) follows
    what the fitted head's network() does."""
    from classify.errors import HeadMismatch
    from classify.heads import make_head

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 8)), np.repeat([0, 1, 2], 20)
    head = make_head(kind).fit(X + y[:, None], y)
    if finetune_cached.has_dense_layers(kind):
        assert len(head.network()) >= 1
    else:
        with pytest.raises(HeadMismatch):
            head.network()
