"""Fine-tuning on a CPU: the last blocks and the classifier trained on cached front outputs, kept only if
they beat the head on images that neither trained nor chose either of them.

1. The labelled images get three disjoint jobs (``export.holdout``): **fit** rows train, **stop** rows
   (a stratified hash carve of the train split) pick the epoch, **decide** rows (the validation split;
   a second carve of train when the store has none) decide keep-or-not and nothing else.
2. The backbone is cut before its last ``blocks`` blocks (``export.front_cut``); the front's output for
   every fit image (and its mirror image), stop and decide image is computed once
   (``export.front_cache``, in memory). The test split is not read.
3. The frozen back gives the ordinary features of those images. The head to beat, of the ``--head``'s
   kind (the tool's softmax without ``--head``), with its own cross-validated settings, is fitted on
   the fit and stop rows: the images the fine-tuned model learned from or chose with, so both had the
   same train images and neither saw the decide rows. (The ``--head`` itself was fitted on train and
   validation together, so its validation score would not compare like with like.)
4. The classifier starts from a head of that kind fitted on the fit rows only (a softmax one when the
   kind has no dense layers, e.g. rbf): linear probe, then fine-tune. The back's layers (BatchNorm
   excepted, in inference mode) and the classifier train on the cached fit tensors, as-is or mirrored
   at random, with Adam and the learning-rate schedule; early stopping on the stop rows' loss restores
   the best epoch.
5. The fine-tuned model is kept only when its accuracy on the decide rows is above the head's (a tie
   keeps the head: it is smaller and already exported); otherwise no model is written. Either way one
   line says which, and the report holds both figures and the row counts. Only then is the test split
   read, for the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from classify.heads import HEAD_KINDS, make_head
from export.fit_loop import TrainingRun, checkpointed_fit, compile_classifier, empty_history, progress_bars, record_history
from export.front_cache import CachedSplit, cache_front
from export.front_cut import BackboneHalves, cut_backbone
from export.holdout import RowRoles
from export.keras_models import backbone_of, classifier_model, set_trainable
from extract.errors import TransferKitError

if TYPE_CHECKING:
    from export.finetune import StartingPoint, TrainingSettings

DEFAULT_BLOCKS = 4
# Adam at 1e-4, cosine decay over 6 epochs: the best mean validation score over fruits and TrashNet of the
# settings bench/finetune_sweep.py tried (docs/bench/finetune-sweep.md)
CACHED_EPOCHS = 6
CACHED_LEARNING_RATE = 1e-4
BASELINE_KIND = "softmax"  # the head to beat without --head


@dataclass
class HeadComparison:
    """Fine-tuned model against the head on the decide rows, which neither trained on nor chose with."""

    head_kind: str
    head: float  # accuracy on the decide rows of the head fitted on the fit + stop rows
    fine_tuned: float  # accuracy on the decide rows of the fine-tuned model (epoch picked on the stop rows)
    decide_images: int
    head_images: int  # the fit + stop rows the head was fitted on
    fit_images: int  # the rows the fine-tuned model trained on
    stop_images: int  # the rows that picked its epoch
    stop_accuracy: float  # the fine-tuned model on the stop rows: optimistic (they chose the epoch), not used
    on: str = "validation split"  # where the decide rows come from

    @property
    def kept(self) -> str:
        return "fine-tuned" if keep_fine_tuned(self.fine_tuned, self.head) else "head"

    def line(self, model_path: str) -> str:
        won = self.kept == "fine-tuned"
        return (f"fine-tuned {self.fine_tuned:.3f} {'>' if won else '<='} {self.head_kind} head {self.head:.3f} "
                f"on {self.decide_images} images ({self.on}; the epoch was picked on {self.stop_images} other "
                f"train images): " + (f"kept the fine-tuned model; wrote {model_path}" if won
                                      else "kept the head; model not written"))

    def to_dict(self) -> dict:
        return {**asdict(self), "kept": self.kept}


def keep_fine_tuned(fine_tuned_accuracy: float, head_accuracy: float) -> bool:
    """The rule: the fine-tuned model replaces the head only when strictly more accurate on the decide rows."""
    return fine_tuned_accuracy > head_accuracy


@dataclass
class CachedRows:
    """The front's outputs of the fit (with mirror images), stop and decide rows."""

    fit: CachedSplit
    stop: CachedSplit
    decide: CachedSplit
    decide_source: str

    @property
    def tensors(self) -> int:
        return 2 * len(self.fit.labels) + len(self.stop.labels) + len(self.decide.labels)


@dataclass
class Baseline:
    """The head to beat (its accuracy on the decide rows) and the classifier's starting layers."""

    kind: str
    accuracy: float
    head_images: int
    start: list = field(repr=False)
    dropout: float = 0.0
    head: object = field(default=None, repr=False)  # the fitted head to beat (features of the untrained back)


def inference(model: keras.Model, tensors: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model`` on cached tensors in inference mode, ``batch_size`` at a time, as float32."""
    parts = [np.asarray(model(tensors[i:i + batch_size], training=False), np.float32)
             for i in range(0, len(tensors), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.output.shape[-1]), np.float32)


def has_dense_layers(kind: str) -> bool:
    """Whether a head of ``kind`` is dense layers a classifier can start from (rbf is a kernel machine)."""
    return HEAD_KINDS[kind].dense_layers


def baseline_head(kind: str, rows: CachedRows, back: keras.Model, seed: int) -> Baseline:
    """The head to beat, fitted on the fit + stop rows and scored on the decide rows; the classifier's
    start, a head fitted on the fit rows alone (softmax when ``kind`` has no dense layers)."""
    X_fit, X_stop, X_decide = (inference(back, s.tensors) for s in (rows.fit, rows.stop, rows.decide))
    y_fit, y_stop = rows.fit.labels, rows.stop.labels
    to_beat = make_head(kind, seed).fit(np.concatenate([X_fit, X_stop]), np.concatenate([y_fit, y_stop]))
    accuracy = float(np.mean(to_beat.predict(X_decide) == rows.decide.labels))
    start = make_head(kind if has_dense_layers(kind) else BASELINE_KIND, seed).fit(X_fit, y_fit)
    return Baseline(kind, accuracy, len(y_fit) + len(y_stop), start.network(), float(getattr(start, "dropout", 0.0)),
                    to_beat)


def trainer_model(classifier: keras.Model, halves: BackboneHalves) -> keras.Model:
    """Cached tensor -> back (inference-mode BatchNorm) -> the classifier's own dense layers: training it
    trains ``classifier``, whose layers it shares."""
    cached = keras.Input(halves.back.input.shape[1:], name="cached_front")
    x = halves.back(cached, training=False)
    after = classifier.layers.index(backbone_of(classifier)) + 1
    for layer in classifier.layers[after:]:
        x = layer(x)
    return keras.Model(cached, x, name="last_blocks_and_classifier")


def cached_dataset(split: CachedSplit, batch_size: int, seed: int, train: bool) -> tf.data.Dataset:
    """Batches of (tensor, label); for training shuffled each epoch, each image as-is or mirrored at random."""
    if not train:
        return tf.data.Dataset.from_tensor_slices((split.tensors, split.labels)).batch(batch_size)
    ds = tf.data.Dataset.from_tensor_slices((split.tensors, split.mirrored, split.labels))
    ds = ds.shuffle(len(split.labels), seed=seed, reshuffle_each_iteration=True)
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed))

    def pick(sample, coin):
        plain, mirrored, label = sample
        return tf.where(coin % 2 == 0, plain, mirrored), label

    return ds.map(pick).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def learning_rate_schedule(settings: "TrainingSettings", batches: int):
    """Cosine decay from the learning rate to 0 over the epochs, or the learning rate held constant."""
    if settings.schedule == "constant":
        return settings.learning_rate
    return keras.optimizers.schedules.CosineDecay(settings.learning_rate,
                                                  decay_steps=max(1, settings.epochs * batches))


def accuracy_on(trainer: keras.Model, split: CachedSplit, batch_size: int) -> float:
    """The trainer's accuracy on cached rows."""
    predicted = inference(trainer, split.tensors, batch_size).argmax(1)
    return float(np.mean(predicted == split.labels))


@dataclass
class Prepared:
    """What every training of a run shares: the cut backbone, the cached rows and the head to beat."""

    halves: BackboneHalves
    rows: CachedRows
    baseline: Baseline


def prepare(begin: "StartingPoint", roles: RowRoles, settings: "TrainingSettings", skipped: dict[str, str]) -> Prepared:
    """Steps 2-3 of the module docstring: cut, cache the fit, stop and decide rows, fit the head to beat."""
    halves = cut_backbone(begin.built, settings.blocks)
    size, batch_size, progress = begin.built.input_size, settings.batch_size, settings.progress

    def cached(images, mirror: bool, job: str) -> CachedSplit:
        return cache_front(halves.front, images, size, batch_size, mirror, skipped, progress, f"caching {job}")

    rows = CachedRows(cached(roles.fit, True, "fit rows (+ mirrored)"), cached(roles.stop, False, "stop rows"),
                      cached(roles.decide, False, "decide rows"), roles.decide_source)
    if not all(len(s.labels) for s in (rows.fit, rows.stop, rows.decide)):
        raise TransferKitError("no image to train on, to pick the epoch or to decide on could be read")
    kind = begin.trained.kind if begin.trained is not None else BASELINE_KIND
    return Prepared(halves, rows, baseline_head(kind, rows, halves.back, settings.seed))


def train_back(begin: "StartingPoint", prepared: Prepared, settings: "TrainingSettings",
               checkpoint: Path) -> tuple[keras.Model, keras.Model, TrainingRun]:
    """Step 4: a classifier from the baseline's start, its back and dense layers trained on the fit rows with
    early stopping on the stop rows. Returns the classifier (on images), the trainer (on cached tensors,
    sharing its layers) and what training did."""
    halves, rows, start = prepared.halves, prepared.rows, prepared.baseline
    classifier = classifier_model(begin.built, len(begin.images.class_names), start.start, start.dropout,
                                  settings.seed)
    trainable = set_trainable(classifier, halves.back_layers)
    trainer = trainer_model(classifier, halves)
    batch_size = settings.batch_size
    batches = -(-len(rows.fit.labels) // batch_size)
    compile_classifier(trainer, learning_rate_schedule(settings, batches))
    stop_ds = cached_dataset(rows.stop, batch_size, settings.seed, train=False)
    loss_before, accuracy_before = trainer.evaluate(stop_ds, verbose=0)
    fit, best_epoch = checkpointed_fit(trainer, cached_dataset(rows.fit, batch_size, settings.seed, train=True),
                                       stop_ds, settings.epochs, settings.patience, checkpoint, settings.verbose,
                                       progress_bars(settings.progress, batches, "fine-tuning", held_out="stop"))
    history = empty_history()
    record_history(history, fit)
    run = TrainingRun(history=history, trainable_layers=trainable, epochs_run=len(fit.history["loss"]),
                      best_epoch=best_epoch,
                      validation_before={"loss": float(loss_before), "accuracy": float(accuracy_before),
                                         "on": "stop rows"},
                      cut={"layer": halves.cut_layer, "blocks": halves.blocks,
                           "cache_bytes_per_image": rows.fit.bytes_per_image, "cached_tensors": rows.tensors})
    return classifier, trainer, run


def compare(trainer: keras.Model, prepared: Prepared, batch_size: int) -> HeadComparison:
    """Step 5's figures: the trained model and the head to beat on the decide rows."""
    rows, baseline = prepared.rows, prepared.baseline
    return HeadComparison(
        baseline.kind, baseline.accuracy, accuracy_on(trainer, rows.decide, batch_size), len(rows.decide.labels),
        baseline.head_images, len(rows.fit.labels), len(rows.stop.labels),
        accuracy_on(trainer, rows.stop, batch_size), rows.decide_source)


def train_cached(begin: "StartingPoint", roles: RowRoles, settings: "TrainingSettings", checkpoint: Path,
                 skipped: dict[str, str]) -> tuple[keras.Model, TrainingRun, HeadComparison]:
    """Steps 2-5 of the module docstring: the classifier model (trained in place), what training did,
    and the comparison on the decide rows that decides whether it is kept."""
    prepared = prepare(begin, roles, settings, skipped)
    classifier, trainer, run = train_back(begin, prepared, settings, checkpoint)
    return classifier, run, compare(trainer, prepared, settings.batch_size)
