"""The tutorials' way, reproduced faithfully but with the correct preprocessing, for the benchmarks.

What the seed tutorials (``../shared/seeds/000_*`` and ``001_*``) do, on any image folder:
``keras.utils.image_dataset_from_directory`` with a seeded validation split, a frozen ImageNet
backbone behind random flip/rotation augmentation, GlobalAveragePooling + Dropout(0.2) + Dense
softmax, Adam(1e-3) on categorical cross-entropy for a fixed number of epochs, then scikit-learn's
``classification_report`` on a held-out test split.

Two things differ from the tutorials, on purpose, so that the comparison is about the workflow and
not about a bug or a different network:
- the backbone is ``extract.models.build_backbone`` (the same weights and in-graph preprocessing as
  ``cli.py extract``; tutorial 000 used ``Rescaling(1/255)``, the wrong scaling for its backbone);
- the test split is cut from the images held out by the seeded split (tutorial 001 had its own
  test folder), so that train/validation/test sizes equal the tool's (``--validation-split`` and
  ``--test-split`` are shares of the images Keras finds).
A ``DIR/{train,validation,test}/<class>/`` folder is loaded one split folder at a time, as in 001.

The model is tutorial 001's functional one (``base(x, training=False)``) rather than tutorial 000's
``Sequential``: a Sequential model calls the backbone with ``training=True`` during ``fit``, which
switches on the dropout layers inside some backbones even when they are frozen.

Prints the epochs and the classification report, then one JSON line of results (last line).

Example:
    python bench/tutorial_way.py ../shared/datasets/trashnet --backbone efficientnet_lite0 --epochs 5
"""

from __future__ import annotations

import time

SCRIPT_START = time.time()  # before the heavy imports: they are part of the tutorials' wall time

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.metrics import classification_report  # noqa: E402

from extract.backbones import get_backbone  # noqa: E402
from extract.dataset import SPLIT_FOLDERS  # noqa: E402
from extract.models import build_backbone, check_input_size  # noqa: E402


def split_folders(data: Path) -> dict[str, Path] | None:
    """``{"train": ..., "validation": ..., "test": ...}`` when ``data`` is laid out by split, else None."""
    subdirs = [d for d in data.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not subdirs or any(d.name.lower() not in SPLIT_FOLDERS for d in subdirs):
        return None
    return {SPLIT_FOLDERS[d.name.lower()]: d for d in subdirs}


def load_splits(data: Path, size: int, seed: int, validation_split: float,
                test_split: float) -> tuple[dict[str, tuple[tf.data.Dataset, int]], list[str]]:
    """Unbatched (image, one-hot label) datasets and their sizes by split, and the class names."""
    options = dict(image_size=(size, size), label_mode="categorical", batch_size=None, seed=seed)
    folders = split_folders(data)
    if folders:
        splits = {}
        for split, folder in folders.items():
            dataset = keras.utils.image_dataset_from_directory(folder, **options)
            splits[split] = (dataset, len(dataset.file_paths))
        if "train" not in splits or "validation" not in splits:
            raise SystemExit(f"{data}: split folders need at least train/ and validation/")
        return splits, splits["train"][0].class_names
    listing = keras.utils.image_dataset_from_directory(data, shuffle=False, **options)  # the images Keras sees
    n = len(listing.file_paths)
    n_val, n_test = round(validation_split * n), round(test_split * n)
    if n_val < 1:
        raise SystemExit(f"{data}: {n} images leave no validation image at --validation-split {validation_split}")
    # Keras keeps int(share * n) images for validation: +0.5 makes that exactly n_val + n_test.
    train, held_out = keras.utils.image_dataset_from_directory(
        data, validation_split=(n_val + n_test + 0.5) / n, subset="both", **options)
    # The validation subset is never reshuffled, so take/skip cut the same images every epoch.
    splits = {"train": (train, len(train.file_paths)), "validation": (held_out.take(n_val), n_val)}
    if n_test:
        splits["test"] = (held_out.skip(n_val), n_test)
    return splits, listing.class_names


def build_model(backbone: str, weights: str, size: int, n_classes: int, seed: int) -> keras.Model:
    """Tutorial 001's model around the tool's backbone: augmentation, preprocessing, frozen base, dense head."""
    built = build_backbone(backbone, weights=weights, input_size=size, seed=seed)
    preprocessing = built.model.get_layer("preprocessing")
    base = built.model.layers[-1]  # the Keras application, frozen, global-average-pooled
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)],
                                    name="data_augmentation")
    inputs = keras.Input((size, size, 3))
    x = augmentation(inputs)
    x = preprocessing(x)
    x = base(x, training=False)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="DIR/<class>/<image> or DIR/{train,validation,test}/<class>/<image>")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet, none or a weights file (as for extract)")
    parser.add_argument("--input-size", type=int, default=None, help="square input size [default: the backbone's]")
    parser.add_argument("--epochs", type=int, default=5, help="fixed number of epochs (tutorial 001 stopped after 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--validation-split", type=float, default=0.1)
    parser.add_argument("--test-split", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    size = check_input_size(get_backbone(args.backbone), args.input_size)
    splits, class_names = load_splits(args.data, size, args.seed, args.validation_split, args.test_split)
    (train, n_train), (validation, n_val) = splits["train"], splits["validation"]
    test, n_test = splits.get("test", (None, 0))
    model = build_model(args.backbone, args.weights, size, len(class_names), args.seed)
    autotune = tf.data.AUTOTUNE
    train_batches = train.batch(args.batch_size).cache().shuffle(1000, seed=args.seed).prefetch(autotune)
    validation_batches = validation.batch(args.batch_size).cache().prefetch(autotune)
    model.compile(loss=keras.losses.CategoricalCrossentropy(), optimizer=keras.optimizers.Adam(1e-3),
                  metrics=[keras.metrics.CategoricalAccuracy()])

    fit_start = time.time()
    history = model.fit(train_batches, epochs=args.epochs, validation_data=validation_batches, verbose=2)
    trained_at = time.time()

    result = {
        "data": str(args.data), "backbone": args.backbone, "weights": args.weights, "input_size": size,
        "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "classes": class_names,
        "n_train": n_train, "n_val": n_val, "n_test": n_test,
        "script_start": SCRIPT_START, "fit_start": fit_start, "trained_at": trained_at,
        "fit_seconds": trained_at - fit_start,
        "val_accuracy_by_epoch": [float(v) for v in history.history["val_categorical_accuracy"]],
        "test_accuracy": None, "test_macro_f1": None,
    }
    if test is not None:
        # As in tutorial 000: predict batch by batch, argmax, then scikit-learn's report.
        predictions, truth = [], []
        for x, y in test.batch(args.batch_size):
            predictions.append(np.argmax(model.predict(x, verbose=0), axis=-1))
            truth.append(np.argmax(y.numpy(), axis=-1))
        y_pred, y_true = np.concatenate(predictions), np.concatenate(truth)
        labels = list(range(len(class_names)))
        print(classification_report(y_true, y_pred, labels=labels, target_names=class_names, zero_division=0))
        report = classification_report(y_true, y_pred, labels=labels, target_names=class_names, zero_division=0,
                                       output_dict=True)
        result["test_accuracy"] = float(report["accuracy"])
        result["test_macro_f1"] = float(report["macro avg"]["f1-score"])
    print(f"trained in {trained_at - SCRIPT_START:.1f} s from script start ({result['fit_seconds']:.1f} s in fit)",
          file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
