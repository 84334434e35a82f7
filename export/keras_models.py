"""Keras-side models: classifiers on a backbone (initialised from heads) and fine-tuned ``.keras`` files.

A fine-tuned model is ``MODEL.keras`` plus ``MODEL.keras.json`` (the sidecar): class names in output
order, the backbone record (weights id included), the split settings (``split_settings``; files
written before it was named hold them as ``splits``) and where the images were.
The sidecar names the sha256 of the model file, so a model and a sidecar from different runs are
refused. ``.keras`` files are only ever loaded with ``safe_mode=True`` (a Lambda layer would be code).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

import extract.preprocessing  # noqa: F401  (registers ImagePreprocessing for deserialisation)
from edge.imageio import strict_json
from extract.errors import TransferKitError
from extract.files import atomic_write, file_sha256, write_atomic
from extract.models import BuiltBackbone

SIDECAR_FORMAT = "transferkit-fine-tuned-model"
SIDECAR_VERSION = 1


def backbone_of(model: keras.Model) -> keras.Model:
    """The bare Keras application nested in a backbone or classifier model (augmentation is a Sequential)."""
    return next(layer for layer in model.layers
                if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential))


def augmentation(seed: int) -> keras.Sequential:
    """Random flips, rotations and zooms; Keras runs them only when training."""
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.1, seed=seed + 1),
        keras.layers.RandomZoom(0.1, seed=seed + 2),
    ], name="augmentation")


def classifier_model(
    built: BuiltBackbone,
    n_classes: int,
    layers: list[tuple[np.ndarray, np.ndarray]] | None = None,
    dropout: float = 0.0,
    seed: int = 0,
) -> keras.Model:
    """uint8 image -> augmentation -> preprocessing -> backbone -> dense layers -> probabilities.

    ``layers`` ([(W, b), ...], ReLU between, softmax after the last) initialise the classifier, e.g.
    a trained head's ``network()`` with its standardisation folded in; ``dropout`` goes between them.
    Without ``layers`` the classifier is one randomly initialised Dense layer.
    """
    image = keras.Input((built.input_size, built.input_size, 3), dtype="uint8", name="image")
    x = augmentation(seed)(image)
    x = built.model.get_layer("preprocessing")(x)
    # training=False keeps BatchNorm in inference mode (its ImageNet statistics) even once the
    # layers around it are unfrozen: fine-tuning on a small data set would otherwise wreck them.
    x = backbone_of(built.model)(x, training=False)
    shapes = [W.shape[1] for W, _ in layers] if layers else [n_classes]
    if shapes[-1] != n_classes:
        raise TransferKitError(f"the head predicts {shapes[-1]} classes, the images have {n_classes}")
    dense_layers = []
    for i, units in enumerate(shapes):
        last = i == len(shapes) - 1
        dense = keras.layers.Dense(units, activation="softmax" if last else "relu",
                                   name="probabilities" if last else f"dense_{i}")
        x = dense(x)
        dense_layers.append(dense)
        if not last and dropout:
            x = keras.layers.Dropout(dropout, seed=seed, name=f"dropout_{i}")(x)
    model = keras.Model(image, x, name=f"{built.spec.name}_classifier")
    for dense, (W, b) in zip(dense_layers, layers or []):
        dense.set_weights([np.asarray(W, np.float32), np.asarray(b, np.float32)])
    return model


def classifier_layers(model: keras.Model) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (W, b) of the classifier's Dense layers, in order."""
    return [tuple(layer.get_weights()) for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def set_trainable(model: keras.Model, unfreeze: int | None) -> int:
    """Unfreeze the top ``unfreeze`` layers of the backbone (all when None), never BatchNorm.

    Returns how many backbone layers with weights are trainable. The model must be recompiled.
    """
    base = backbone_of(model)
    layers = base.layers
    count = len(layers) if unfreeze is None else min(unfreeze, len(layers))
    chosen = {id(layer) for layer in layers[len(layers) - count:]}
    base.trainable = True
    for layer in layers:
        layer.trainable = id(layer) in chosen and not isinstance(layer, keras.layers.BatchNormalization)
    trainable = sum(1 for layer in layers if layer.trainable and layer.weights)
    if not trainable:
        base.trainable = False
    return trainable


def sidecar_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def save_fine_tuned(model: keras.Model, path: Path, info: dict) -> None:
    """Write the model then its sidecar, each atomically (the sidecar names the model's sha256)."""
    with atomic_write(path) as tmp:
        model.save(tmp)
        sha = file_sha256(tmp)
    document = {"format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION, **info, "model_sha256": sha}
    write_atomic(sidecar_path(path), strict_json(document, indent=2).encode())


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of a fine-tuned model, checked against the model file."""
    path = Path(path)
    if not path.is_file():
        raise TransferKitError(f"model {path} does not exist")
    side = sidecar_path(path)
    if not side.is_file():
        raise TransferKitError(
            f"{path} has no {side.name} beside it (class names, backbone and splits); "
            f"train it with `cli.py fine-tune`, which writes both"
        )
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except ValueError:
        raise TransferKitError(f"{side} is not valid JSON") from None
    if info.get("format") != SIDECAR_FORMAT:
        raise TransferKitError(f"{side} is not a transferkit model description")
    if int(info.get("format_version", 0)) > SIDECAR_VERSION:
        raise TransferKitError(f"{side} was written by a newer transferkit")
    if info.get("model_sha256") != file_sha256(path):
        raise TransferKitError(f"{side} describes another model file than {path.name} (sha256 differs)")
    if "split_settings" not in info:  # written before the key was renamed (anchors were inside it)
        info["split_settings"] = info.pop("splits", {})
        info.setdefault("split_anchors", info["split_settings"].get("split_anchors", ""))
    return info


def load_fine_tuned(path: str | Path) -> tuple[keras.Model, dict]:
    """The model (loaded with ``safe_mode=True``) and its sidecar."""
    info = read_sidecar(path)
    try:
        model = keras.models.load_model(path, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, TypeError, zipfile errors...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TransferKitError(f"cannot load {path} safely: {reason}") from None
    return model, info
