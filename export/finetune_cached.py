"""Fine-tuning on a CPU: the last blocks and the classifier trained on cached front outputs, kept only if
they beat the head.

1. The backbone is cut before its last ``blocks`` blocks (``export.front_cut``); the front's output for
   every train image (and its mirror image) and every validation image is computed once
   (``export.front_cache``, in memory). The test split is not read.
2. The frozen back gives the ordinary features of those images; a head of the ``--head``'s kind (the
   tool's softmax without ``--head``) is fitted on the train images alone, with its own cross-validated
   settings, and scored on the validation images: the figure to beat. (The ``--head`` itself was fitted
   on train and validation together, so its validation score would not compare like with like.)
3. The classifier starts from that head's dense layers (a softmax one fitted the same way when the
   kind has none, e.g. rbf): linear probe, then fine-tune. The back's layers (BatchNorm excepted, in
   inference mode) and the classifier train on the cached tensors, as-is or mirrored at random, with
   Adam and a cosine-decaying learning rate; early stopping on the validation loss restores the best
   epoch (so validation also picks the epoch, as cross-validation picked the head's settings).
4. The fine-tuned model is kept only when its validation accuracy is above the head's (a tie keeps the
   head: it is smaller and already exported); otherwise no model is written. Either way one line says
   which, and the report holds both figures. Only then is the test split read, for the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from classify.errors import HeadMismatch
from classify.heads import make_head
from export.data import LabelledImages
from export.fit_loop import TrainingRun, checkpointed_fit, compile_classifier, empty_history, progress_bars, record_history
from export.front_cache import CachedSplit, cache_front
from export.front_cut import BackboneHalves, cut_backbone
from export.keras_models import backbone_of, classifier_model, set_trainable
from extract.errors import TransferKitError

if TYPE_CHECKING:
    from export.finetune import StartingPoint, TrainingSettings

DEFAULT_BLOCKS = 4
CACHED_EPOCHS = 6
CACHED_LEARNING_RATE = 1e-4
BASELINE_KIND = "softmax"  # the head to beat without --head


@dataclass
class HeadComparison:
    """Fine-tuned model against the head, both trained on the same train images, on the same validation images."""

    head_kind: str
    head: float  # validation accuracy of the head fitted on the train images
    fine_tuned: float  # validation accuracy of the fine-tuned model (kept epoch)
    validation_images: int
    train_images: int
    on: str = "validation"

    @property
    def kept(self) -> str:
        return "fine-tuned" if keep_fine_tuned(self.fine_tuned, self.head) else "head"

    def line(self, model_path: str) -> str:
        if self.kept == "fine-tuned":
            return (f"fine-tuned {self.fine_tuned:.3f} on validation > {self.head_kind} head {self.head:.3f} "
                    f"({self.validation_images} images): kept the fine-tuned model; wrote {model_path}")
        return (f"fine-tuned {self.fine_tuned:.3f} on validation <= {self.head_kind} head {self.head:.3f} "
                f"({self.validation_images} images): kept the head; model not written")

    def to_dict(self) -> dict:
        return {**asdict(self), "kept": self.kept}


def keep_fine_tuned(fine_tuned_accuracy: float, head_accuracy: float) -> bool:
    """The rule: the fine-tuned model replaces the head only when strictly more accurate on validation."""
    return fine_tuned_accuracy > head_accuracy


def inference(model: keras.Model, tensors: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model`` on cached tensors in inference mode, ``batch_size`` at a time, as float32."""
    parts = [np.asarray(model(tensors[i:i + batch_size], training=False), np.float32)
             for i in range(0, len(tensors), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.output.shape[-1]), np.float32)


def baseline_head(kind: str, train: CachedSplit, validation: CachedSplit, back: keras.Model, seed: int):
    """The head to beat fitted on the train images; the classifier's starting layers and dropout; and the
    comparison's head figures (validation accuracy)."""
    X_train, X_val = inference(back, train.tensors), inference(back, validation.tensors)  # the back before training
    head = make_head(kind, seed).fit(X_train, train.labels)
    accuracy = float(np.mean(head.predict(X_val) == validation.labels))
    try:
        start = head.network()
        dropout = float(getattr(head, "dropout", 0.0))
    except HeadMismatch:  # a kernel machine: start the classifier from a linear probe instead
        start, dropout = make_head(BASELINE_KIND, seed).fit(X_train, train.labels).network(), 0.0
    return accuracy, start, dropout


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


def cosine_schedule(learning_rate: float, epochs: int, batches: int):
    """From ``learning_rate`` down to 0 over the epochs."""
    return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, epochs * batches))


def validation_accuracy(trainer: keras.Model, validation: CachedSplit, batch_size: int) -> float:
    if not len(validation.labels):
        return 0.0
    predicted = inference(trainer, validation.tensors, batch_size).argmax(1)
    return float(np.mean(predicted == validation.labels))


def train_cached(begin: "StartingPoint", train_images: LabelledImages, validation_images: LabelledImages,
                 settings: "TrainingSettings", checkpoint: Path,
                 skipped: dict[str, str]) -> tuple[keras.Model, TrainingRun, HeadComparison]:
    """Steps 1-3 of the module docstring: the classifier model (trained in place), what training did,
    and the validation comparison that decides whether it is kept."""
    halves = cut_backbone(begin.built, settings.blocks)
    size, batch_size = begin.built.input_size, settings.batch_size
    train = cache_front(halves.front, train_images, size, batch_size, True, skipped, settings.progress,
                        "caching train (+ mirrored)")
    validation = cache_front(halves.front, validation_images, size, batch_size, False, skipped, settings.progress,
                             "caching validation")
    if not len(train.labels) or not len(validation.labels):
        raise TransferKitError("no train or no validation image could be read")
    kind = begin.trained.kind if begin.trained is not None else BASELINE_KIND
    head_accuracy, layers, dropout = baseline_head(kind, train, validation, halves.back, settings.seed)
    classifier = classifier_model(begin.built, len(begin.images.class_names), layers, dropout, settings.seed)
    trainable = set_trainable(classifier, halves.back_layers)
    trainer = trainer_model(classifier, halves)
    batches = -(-len(train.labels) // batch_size)
    compile_classifier(trainer, cosine_schedule(settings.learning_rate, settings.epochs, batches))
    val_ds = cached_dataset(validation, batch_size, settings.seed, train=False)
    loss_before, accuracy_before = trainer.evaluate(val_ds, verbose=0)
    fit, best_epoch = checkpointed_fit(trainer, cached_dataset(train, batch_size, settings.seed, train=True), val_ds,
                                       settings.epochs, settings.patience, checkpoint, settings.verbose,
                                       progress_bars(settings.progress, batches, "fine-tuning"))
    history = empty_history()
    record_history(history, fit)
    comparison = HeadComparison(kind, head_accuracy, validation_accuracy(trainer, validation, batch_size),
                                len(validation.labels), len(train.labels))
    run = TrainingRun(history=history, trainable_layers=trainable, epochs_run=len(fit.history["loss"]),
                      best_epoch=best_epoch,
                      validation_before={"loss": float(loss_before), "accuracy": float(accuracy_before)},
                      cut={"layer": halves.cut_layer, "blocks": halves.blocks,
                           "cache_bytes_per_image": train.bytes_per_image,
                           "cached_tensors": 2 * len(train.labels) + len(validation.labels)})
    return classifier, run, comparison
