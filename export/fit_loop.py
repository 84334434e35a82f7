"""The training loop both fine-tuning modes share: Adam, early stopping that restores the best epoch,
the best model checkpointed on disk meanwhile (removed again when training fails or is interrupted),
progress bars on stderr."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import keras

from export.progress import EpochProgress


@dataclass
class TrainingRun:
    """What training did: the curves, and where fine-tuning stopped."""

    history: dict[str, list[float]]
    trainable_layers: int
    epochs_run: int
    best_epoch: int  # 1-based fine-tuning epoch whose weights were kept
    validation_before: dict
    cut: dict | None = None  # cached-front mode: cut layer, blocks trained, cache bytes per image


def compile_classifier(model: keras.Model, learning_rate) -> None:
    """Adam on sparse cross-entropy; ``learning_rate`` is a float or a schedule."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])


def empty_history() -> dict[str, list[float]]:
    return {k: [] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}


def record_history(history: dict[str, list[float]], fit) -> None:
    for key in history:
        history[key] += [float(v) for v in fit.history[key]]


def progress_bars(progress: bool, batches: int, label: str, held_out: str = "val") -> list:
    return [EpochProgress(batches, label, held_out)] if progress else []


def quiet_fit(model: keras.Model, train_ds, val_ds, epochs: int, verbose: int, callbacks: list):
    """``model.fit`` without Keras' end-of-epoch "ran out of data" warning (the datasets' length is
    unknown when undecodable files are filtered out)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        return model.fit(train_ds, validation_data=val_ds, epochs=epochs, shuffle=False, verbose=verbose,
                         callbacks=callbacks)


def checkpointed_fit(model: keras.Model, train_ds, val_ds, epochs: int, patience: int, checkpoint: Path,
                     verbose: int = 0, bars: list | None = None):
    """Fit with early stopping on the validation loss (the best epoch's weights restored) and the best
    model saved to ``checkpoint`` meanwhile; Ctrl-C or an error removes the checkpoint. Returns the
    fit history and the 1-based best epoch."""
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    saver = keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss", save_best_only=True)
    try:
        fit = quiet_fit(model, train_ds, val_ds, epochs, verbose, [stopper, saver, *(bars or [])])
    except BaseException:  # Ctrl-C included: no half-trained checkpoint left behind
        checkpoint.unlink(missing_ok=True)
        raise
    return fit, stopper.best_epoch + 1
