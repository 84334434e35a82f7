"""Fine-tune a backbone and its classifier (linear probe, then fine-tune), in one of two modes.

**Cached front** (the default, ``export.finetune_cached``, whose docstring holds the design): the
backbone is cut before its last ``blocks`` blocks (4); the frozen front's outputs are computed once
per image and kept in memory (lite0 at 224 px: 37,632 bytes per image); the last blocks and the
classifier train on them for a few epochs (6, Adam at 1e-4 with cosine decay, each train image as-is
or mirrored), the epoch picked on a carved-off part of the train split. The model is written only when
its validation accuracy beats a head of the ``--head``'s kind fitted on the same train images (the
validation images chose nothing before); one line says which was kept.

**End to end on images** (``cache_front=False``): one Keras model takes uint8 RGB images:
augmentation (training only) -> the backbone's preprocessing -> the backbone -> the classifier. The
classifier starts from a trained head when one is given (a head is dense layers with the
standardisation folded in, so the model predicts exactly what the head predicted); otherwise a
random one is warmed up for a few epochs on the frozen backbone. Then the top ``unfreeze`` backbone
layers train with a small learning rate (1e-5). The model is always written.

In both, the backbone is called with ``training=False`` so BatchNorm keeps its statistics (and its
layers never train); early stopping on the validation loss restores the best epoch, with a checkpoint
of the best model on disk meanwhile. With a store, images get the store's own train/validation/test
column; without one, splits are drawn from ``SplitSettings`` with the given seed. The test split is
read only after training and the choice, for the report.

Example::

    result = fine_tune("photos/", "efficientnet_lite0", "model.keras", head="head", store="features.h5")
    print(result.comparison, result.written, result.test)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from classify.data import features_for_head
from classify.persist import TrainedHead, head_dir, load_head
from classify.scoring import scores
from edge.imageio import ImageDecodeError, load_image
from export.data import LabelledImages, from_feature_set, from_folder, from_store
from export.finetune_cached import (
    CACHED_EPOCHS,
    CACHED_LEARNING_RATE,
    DEFAULT_BLOCKS,
    HeadComparison,
    train_cached,
)
from export.holdout import row_roles
from export.keras_models import classifier_model, save_fine_tuned, set_trainable
from export.metadata import TRANSFERKIT_VERSION, path_fingerprint
from export.fit_loop import (
    TrainingRun,
    checkpointed_fit,
    compile_classifier,
    empty_history,
    progress_bars,
    quiet_fit,
    record_history,
)
from extract.clock import utc_now
from extract.errors import TransferKitError
from extract.leak_free import ANCHORS_ATTR
from extract.models import BuiltBackbone, build_backbone
from extract.splits import SPLITS, SplitSettings
from extract.store import FeatureStore

DEFAULT_UNFREEZE = "20"
DEFAULT_LEARNING_RATE = 1e-5
WARMUP_LEARNING_RATE = 1e-3


def parse_unfreeze(text: str | int) -> int | None:
    """``"all"`` -> None (every layer), ``"N"`` -> N top layers."""
    if str(text).lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise TransferKitError(f"--unfreeze must be a number of layers (>= 0) or 'all', got {text!r}")
    return value


@dataclass
class FineTuneResult:
    model_path: str
    report_dir: str
    trainable_layers: int  # backbone layers with weights that were trained
    warmup_epochs: int
    epochs_run: int  # fine-tuning epochs before early stopping
    best_epoch: int  # 1-based fine-tuning epoch whose weights were kept
    validation_before: dict  # loss and accuracy right before fine-tuning (cached front: on the stop rows)
    test: dict  # accuracy, macro_f1, images
    skipped: dict[str, str] = field(default_factory=dict)  # undecodable images -> reason
    seconds: float = 0.0
    head_test: dict | None = None  # the starting head on the same test split (accuracy, macro_f1, images)
    comparison: dict | None = None  # cached-front mode: the decide rows' accuracies and row counts (HeadComparison)
    written: bool = True  # whether the model file was written (False: the head was kept)
    cut: dict | None = None  # cached-front mode: cut layer, blocks trained, cache bytes per image

    def to_dict(self) -> dict:
        return asdict(self)


def image_dataset(images: LabelledImages, size: int, batch_size: int, shuffle: bool, seed: int,
                  skipped: dict[str, str]):
    """tf.data pipeline: paths -> ``load_image`` in parallel -> batches; undecodable files are skipped
    (and recorded in ``skipped``)."""
    def decode(path):
        path = path.numpy().decode()
        try:
            return load_image(path, (size, size)), True
        except ImageDecodeError as exc:
            skipped[path] = str(exc)
            return np.zeros((size, size, 3), np.uint8), False

    def tf_decode(path, label):
        image, ok = tf.py_function(decode, [path], [tf.uint8, tf.bool])
        image.set_shape((size, size, 3))
        ok.set_shape(())
        return image, label, ok

    ds = tf.data.Dataset.from_tensor_slices((images.paths, images.labels))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)

    def decoded(image, label, ok):
        return ok

    def without_flag(image, label, ok):
        return image, label

    ds = ds.map(tf_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(decoded).map(without_flag)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def evaluate_test(model, dataset, class_names: list[str], report_dir: Path) -> dict:
    """Write ``test_report.txt`` (classification report) and return accuracy and macro-F1."""
    from sklearn.metrics import classification_report

    y_true, y_pred = [], []
    for images, labels in dataset:
        y_pred.append(np.asarray(model(images, training=False)).argmax(axis=1))
        y_true.append(np.asarray(labels))
    if not y_true:
        (report_dir / "test_report.txt").write_text("no test images\n")
        return {"accuracy": None, "macro_f1": None, "images": 0}
    y_true, y_pred = np.concatenate(y_true), np.concatenate(y_pred)
    labels = sorted(set(y_true.tolist()) | set(y_pred.tolist()))  # a class absent from the test split is not scored
    accuracy, macro_f1 = scores(y_true, y_pred).values()
    text = classification_report(y_true, y_pred, labels=labels, target_names=[class_names[i] for i in labels],
                                 digits=3, zero_division=0)
    (report_dir / "test_report.txt").write_text(
        f"{text}\naccuracy {accuracy:.4f} on {len(y_true)} test images\nmacro-F1 {macro_f1:.4f}\n"
    )
    return {"accuracy": accuracy, "macro_f1": macro_f1, "images": int(len(y_true))}


def plot_curves(history: dict[str, list[float]], warmup_epochs: int, best_epoch: int, path: Path,
                held_out: str = "validation") -> None:
    """Loss and accuracy per epoch (integer ticks), train and the ``held_out`` rows that pick the epoch; a
    dashed line where fine-tuning starts and the kept (best) epoch marked. ``best_epoch`` counts
    fine-tuning epochs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    epochs = np.arange(1, len(history["loss"]) + 1)
    best = warmup_epochs + best_epoch
    for ax, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
        ax.plot(epochs, history[metric], marker="o", label="train")
        ax.plot(epochs, history[f"val_{metric}"], marker="o", label=held_out)
        if warmup_epochs:
            ax.axvline(warmup_epochs + 0.5, color="grey", linestyle="--", label="fine-tuning starts")
        if 1 <= best <= len(epochs):
            ax.axvline(best, color="tab:green", linestyle=":", label=f"kept: epoch {best}")
            ax.plot([best], [history[f"val_{metric}"][best - 1]], marker="*", markersize=14, color="tab:green")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend(fontsize=8)
    figure.savefig(path)


def head_test_score(head: str | Path | None, store: dict | None) -> dict | None:
    """The head's accuracy on the store's test split: what the fine-tuned model has to beat."""
    from classify.data import split_rows
    from classify.errors import TrainingDataError

    if head is None or store is None:
        return None
    trained = load_head(head)
    try:
        X, y, _ = split_rows(features_for_head(trained, store["path"]), "test", store["path"])
    except TrainingDataError:  # no test split
        return None
    return {**scores(y, trained.predict_proba(X).argmax(axis=1)), "images": int(len(y))}


@dataclass
class StartingPoint:
    """What a fine-tuning run starts from: the backbone, the classifier's layers, the images and their split."""

    built: BuiltBackbone
    images: LabelledImages  # with the store's split column, or splits drawn from split_settings
    split_settings: SplitSettings
    split_anchors: str = ""  # the store's near-duplicate anchors (JSON), see extract/leak_free.py
    store: dict | None = None  # path and sha256 of the store
    head: dict | None = None  # path, kind and fingerprint of the head
    trained: TrainedHead | None = None  # the head itself

    @property
    def layers(self) -> list | None:
        """The head's dense layers (standardisation folded in); refused for a head that has none (rbf)."""
        return self.trained.head.network() if self.trained is not None else None

    @property
    def dropout(self) -> float:
        return float(getattr(self.trained.head, "dropout", 0.0)) if self.trained is not None else 0.0


def labelled_images(images_dir: str | Path, trained: TrainedHead | None, store: str | Path | None,
                    seed: int) -> tuple[LabelledImages, SplitSettings, str, dict | None]:
    """The images with their split: the store's column when there is a store (refused if its weights
    or classes differ from the head's), else drawn with the default settings and ``seed``. Also the
    split settings, the store's near-duplicate anchors and the store's path and hash."""
    class_names = trained.class_names if trained is not None else None
    if store is None:
        settings = SplitSettings(seed=seed)
        return from_folder(images_dir, settings, class_names), settings, "", None
    if trained is not None:
        features = features_for_head(trained, store)
        images, attrs = from_feature_set(features, images_dir), features.store_attrs
    else:
        state = FeatureStore(store).state
        images, attrs = from_store(state, images_dir), state.attrs
    store_info = {"path": str(Path(store).resolve()), "sha256": path_fingerprint(store)}
    return images, SplitSettings.resolve(attrs), str(attrs.get(ANCHORS_ATTR, "")), store_info


def starting_point(images_dir: str | Path, backbone: str | None, head: str | Path | None,
                   store: str | Path | None, weights: str | None, image_size: int | None,
                   seed: int) -> StartingPoint:
    """Resolve backbone, head and store into a consistent starting point; refuse any mismatch."""
    trained = load_head(head) if head is not None else None
    if trained is not None and store is None and Path(trained.store.get("path", "")).is_file():
        store = trained.store["path"]  # the split the head was trained and evaluated on
    if trained is None and backbone is None:
        raise TransferKitError("give --backbone (or --head, whose backbone is used)")
    if trained is not None:
        record = trained.backbone
        if backbone not in (None, record.name):
            raise TransferKitError(f"the head was trained on {record.name} features, not {backbone}")
        if image_size not in (None, record.input_size):
            raise TransferKitError(f"the head was trained on {record.input_size} px features, not {image_size} px")
    images, settings, anchors, store_info = labelled_images(images_dir, trained, store, seed)
    if trained is None:
        built = build_backbone(backbone, weights=weights or "imagenet", input_size=image_size, seed=seed)
        return StartingPoint(built, images, settings, anchors, store=store_info)
    folder = head_dir(head)
    return StartingPoint(
        built=trained.build_backbone(weights), images=images, split_settings=settings, split_anchors=anchors,
        store=store_info, trained=trained,
        head={"path": str(folder.resolve()), "kind": trained.kind, "fingerprint": path_fingerprint(folder)},
    )


SCHEDULES = ("cosine", "constant")  # the cached front's learning rate: decayed to 0 over the epochs, or held


@dataclass(frozen=True)
class TrainingSettings:
    """The hyper-parameters of one fine-tuning run."""

    unfreeze: str | int = DEFAULT_UNFREEZE
    epochs: int = 10
    learning_rate: float = DEFAULT_LEARNING_RATE
    batch_size: int = 32
    seed: int = 0
    patience: int = 3
    warmup_epochs: int = 2
    verbose: int = 0
    progress: bool = False  # a bar per epoch on stderr
    cache_front: bool = True  # train the last ``blocks`` blocks on cached front outputs (export.finetune_cached)
    blocks: int = DEFAULT_BLOCKS
    schedule: str = "cosine"  # cached front: one of SCHEDULES

    @classmethod
    def for_mode(cls, cache_front: bool, epochs: int | None, learning_rate: float | None,
                 **kwargs) -> "TrainingSettings":
        """Settings with the mode's own defaults for what is None: 6 epochs at 1e-4 (cosine) on the cached
        front, 10 epochs at 1e-5 end to end on images."""
        return cls(epochs=epochs or (CACHED_EPOCHS if cache_front else 10),
                   learning_rate=learning_rate or (CACHED_LEARNING_RATE if cache_front else DEFAULT_LEARNING_RATE),
                   cache_front=cache_front, **kwargs)

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise TransferKitError("--epochs, --batch-size and --patience must be at least 1")
        if self.schedule not in SCHEDULES:
            raise TransferKitError(f"the learning-rate schedule must be one of {', '.join(SCHEDULES)}, "
                                   f"got {self.schedule!r}")
        parse_unfreeze(self.unfreeze)

    def describe(self) -> dict:
        common = {"epochs": self.epochs, "learning_rate": self.learning_rate, "batch_size": self.batch_size,
                  "patience": self.patience, "seed": self.seed}
        if self.cache_front:
            schedule = "cosine decay to 0" if self.schedule == "cosine" else "constant"
            return {"mode": "cached-front", "blocks": self.blocks, **common, "schedule": schedule,
                    "augmentation": "mirror (cached)"}
        return {"mode": "images", "unfreeze": str(self.unfreeze), "warmup_epochs": self.warmup_epochs, **common,
                "augmentation": "flip horizontal, rotation 0.1, zoom 0.1"}


def train(model: keras.Model, train_ds, val_ds, settings: TrainingSettings, checkpoint: Path,
          batches: int) -> TrainingRun:
    """Warm up the classifier on the frozen backbone (``warmup_epochs``), then fine-tune the top
    layers with early stopping that restores the best epoch (checkpointed to ``checkpoint`` meanwhile;
    removed again if training fails or is interrupted). ``batches``: per epoch, for the progress bars."""
    history = empty_history()
    if settings.warmup_epochs:
        set_trainable(model, 0)
        compile_classifier(model, WARMUP_LEARNING_RATE)
        record_history(history, quiet_fit(model, train_ds, val_ds, settings.warmup_epochs, settings.verbose,
                                          progress_bars(settings.progress, batches, "warm-up")))
    trainable = set_trainable(model, parse_unfreeze(settings.unfreeze))
    compile_classifier(model, settings.learning_rate)  # after changing `trainable`, or the change is ignored
    loss_before, accuracy_before = model.evaluate(val_ds, verbose=0)
    fit, best_epoch = checkpointed_fit(model, train_ds, val_ds, settings.epochs, settings.patience, checkpoint,
                                       settings.verbose, progress_bars(settings.progress, batches, "fine-tuning"))
    record_history(history, fit)
    return TrainingRun(history=history, trainable_layers=trainable, epochs_run=len(fit.history["loss"]),
                       best_epoch=best_epoch,
                       validation_before={"loss": float(loss_before), "accuracy": float(accuracy_before)})


def fine_tune(
    images_dir: str | Path,
    backbone: str | None,
    out: str | Path,
    head: str | Path | None = None,
    unfreeze: str | int = DEFAULT_UNFREEZE,
    epochs: int | None = None,
    learning_rate: float | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    store: str | Path | None = None,
    weights: str | None = None,
    patience: int = 3,
    report_dir: str | Path | None = None,
    warmup_epochs: int = 2,
    verbose: int = 0,
    progress: bool = False,
    cache_front: bool = True,
    blocks: int = DEFAULT_BLOCKS,
) -> FineTuneResult:
    """Fine-tune ``backbone`` on ``images_dir``; write ``out`` (.keras + sidecar) when kept, and a report folder.

    ``head`` fixes backbone, weights and input size, and the kind of head to beat (cached front) or the
    classifier's start (images). ``store``: each image's split (otherwise drawn with ``seed``).
    ``weights`` None: the head's, or ImageNet. ``epochs``/``learning_rate`` None: the mode's defaults.
    ``unfreeze`` and ``warmup_epochs`` apply to ``cache_front=False`` only, ``blocks`` to the cached
    front. ``progress``: bars on stderr. Ctrl-C leaves neither the checkpoint nor an empty report folder.
    """
    started = time.perf_counter()
    out, report_dir = _outputs(out, report_dir)
    settings = TrainingSettings.for_mode(cache_front, epochs, learning_rate, unfreeze=unfreeze, batch_size=batch_size,
                                         seed=seed, patience=patience, warmup_epochs=warmup_epochs, verbose=verbose,
                                         progress=progress, blocks=blocks)
    settings.check()
    begin = starting_point(images_dir, backbone, head, store, weights, image_size, seed)
    if begin.head or cache_front:  # a head is a trained classifier; the cached mode starts from a train-split head
        settings = replace(settings, warmup_epochs=0)
    images = begin.images
    train_images, validation, test = (images.subset(s) for s in SPLITS)
    if cache_front:  # fit, stop and decide rows (export.holdout): a store without validation works
        roles = row_roles(train_images, validation, begin.split_settings, begin.split_anchors)
    else:
        _check_trainable(train_images, validation, images_dir)
    out.parent.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(seed)
    skipped, checkpoint = {}, out.with_name(f"{out.stem}.best.keras")
    if cache_front:
        model, run, comparison = train_cached(begin, roles, settings, checkpoint, skipped)
    else:
        model, run, comparison = *_train_on_images(begin, train_images, validation, settings, checkpoint, skipped), None
    return _report_and_write(model, run, comparison, begin, settings, test, (out, report_dir, checkpoint), images_dir,
                             head, skipped, started)


def _report_and_write(model: keras.Model, run: TrainingRun, comparison: HeadComparison | None,
                      begin: StartingPoint, settings: TrainingSettings, test: LabelledImages,
                      paths: tuple[Path, Path, Path], images_dir: str | Path, head: str | Path | None,
                      skipped: dict[str, str], started: float) -> FineTuneResult:
    """After the choice: the test report, the curves, the model (when kept) and ``metrics.json``.
    ``paths``: the model, the report folder, the checkpoint (removed)."""
    out, report_dir, checkpoint = paths
    report_dir.mkdir(parents=True, exist_ok=True)
    test_metrics = evaluate_test(model, image_dataset(test, begin.built.input_size, settings.batch_size, False,
                                                      settings.seed, skipped), begin.images.class_names, report_dir)
    plot_curves(run.history, settings.warmup_epochs, run.best_epoch, report_dir / "training_curves.png",
                "stop rows (pick the epoch)" if comparison else "validation")
    result = FineTuneResult(
        model_path=str(out), report_dir=str(report_dir), trainable_layers=run.trainable_layers,
        warmup_epochs=settings.warmup_epochs, epochs_run=run.epochs_run, best_epoch=run.best_epoch,
        validation_before=run.validation_before, test=test_metrics, skipped=dict(skipped),
        head_test=head_test_score(head, begin.store), comparison=comparison.to_dict() if comparison else None,
        written=comparison is None or comparison.kept == "fine-tuned", cut=run.cut,
    )
    if result.written:
        save_fine_tuned(model, out, sidecar_info(begin, images_dir, settings, run, test_metrics, comparison))
    checkpoint.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - started
    (report_dir / "metrics.json").write_text(json.dumps({**result.to_dict(), "history": run.history}, indent=2))
    return result


def _train_on_images(begin: StartingPoint, train_images: LabelledImages, validation: LabelledImages,
                     settings: TrainingSettings, checkpoint: Path,
                     skipped: dict[str, str]) -> tuple[keras.Model, TrainingRun]:
    """End to end on decoded, augmented images: the classifier model and what training did."""
    model = classifier_model(begin.built, len(begin.images.class_names), begin.layers, begin.dropout, settings.seed)
    size, batch_size, seed = begin.built.input_size, settings.batch_size, settings.seed
    run = train(model, image_dataset(train_images, size, batch_size, True, seed, skipped),
                image_dataset(validation, size, batch_size, False, seed, skipped), settings, checkpoint,
                batches=-(-len(train_images) // batch_size))
    return model, run


def _outputs(out: str | Path, report_dir: str | Path | None) -> tuple[Path, Path]:
    """The model path (must end in .keras) and the report folder (default: MODEL-report/ beside it)."""
    out = Path(out)
    if out.suffix != ".keras":
        raise TransferKitError(f"--out must end in .keras, got {out.name}")
    return out, Path(report_dir) if report_dir else out.with_name(f"{out.stem}-report")


def _check_trainable(train_images: LabelledImages, validation: LabelledImages, images_dir: str | Path) -> None:
    if not len(train_images) or not len(validation):
        raise TransferKitError(
            f"fine-tuning needs train and validation images; {images_dir} has {len(train_images)} train and "
            f"{len(validation)} validation images"
        )


def sidecar_info(begin: StartingPoint, images_dir: str | Path, settings: TrainingSettings, run: TrainingRun,
                 test_metrics: dict, comparison: HeadComparison | None = None) -> dict:
    """What ``MODEL.keras.json`` says about the model (``export.keras_models`` adds format and hash)."""
    return {
        "class_names": begin.images.class_names,
        "backbone": begin.built.record.to_dict(),
        "split_settings": begin.split_settings.to_attrs(),
        "split_anchors": begin.split_anchors,
        "images_root": str(Path(images_dir).resolve()),
        "store": begin.store,
        "head": begin.head,
        "training": {**settings.describe(), "trainable_layers": run.trainable_layers, "epochs_run": run.epochs_run,
                     "best_epoch": run.best_epoch, "cut": run.cut},
        "kept_over_head": comparison.to_dict() if comparison else None,
        "test": test_metrics,
        "created": utc_now(),
        "transferkit_version": TRANSFERKIT_VERSION,
    }
