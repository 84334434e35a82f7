"""Progress of Keras training on stderr: one tqdm bar per epoch (batches), then the epoch's metrics.

Keras' own ``verbose=1`` bar goes to stdout, shows ``Unknown`` steps for a filtered dataset and
cannot be turned off separately from the epoch lines; this callback can (``--quiet``).
"""

from __future__ import annotations

import sys

import keras
from tqdm import tqdm


class EpochProgress(keras.callbacks.Callback):
    """A bar over ``batches`` training batches per epoch; ``label`` names the phase (warm-up, fine-tuning).

    ``held_out`` names the rows Keras' ``val_*`` metrics are computed on, as the epoch line shows
    them: ``val`` (the validation split, end-to-end mode) or ``stop`` (the train rows that pick the
    epoch in the cached mode, which never sees the validation split)."""

    def __init__(self, batches: int, label: str, held_out: str = "val"):
        super().__init__()
        self.batches, self.label, self.held_out = batches, label, held_out
        self.bar: tqdm | None = None
        self.epochs = 0

    def on_train_begin(self, logs=None) -> None:
        self.epochs = int(self.params.get("epochs") or 0)

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.bar = tqdm(total=self.batches, unit="batch", desc=f"{self.label} epoch {epoch + 1}/{self.epochs}",
                        file=sys.stderr, leave=False)

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        seconds = self.bar.format_dict["elapsed"] if self.bar is not None else 0.0
        self._close()
        metrics = "  ".join(f"{k.replace('val_', self.held_out + '_', 1)} {v:.4f}" for k, v in (logs or {}).items()
                            if k in ("loss", "accuracy", "val_loss", "val_accuracy"))
        print(f"{self.label} epoch {epoch + 1}/{self.epochs} ({seconds:.0f} s): {metrics}", file=sys.stderr, flush=True)

    def on_train_end(self, logs=None) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
