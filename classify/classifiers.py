"""Anything that turns uint8 images into class probabilities: a head, a fine-tuned model, an ONNX file.

``predict`` and ``evaluate`` take any of the three, so a user can compare a fine-tuned or exported
model with the head it came from on the same images:

    >>> model = open_classifier(head="head/")            # backbone engine + head in numpy
    >>> model = open_classifier(model="model.onnx")      # onnxruntime, metadata gives classes and size
    >>> model = open_classifier(model="model.keras")     # Keras, classes and size from its sidecar
    >>> probabilities = model.predict_proba(uint8_batch)

A head uses the backbone's cached ONNX engine when there is one: then neither TensorFlow nor
Keras is imported, and the head runs in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from classify.persist import TrainedHead, load_head
from extract.errors import TransferKitError
from extract.record import BackboneRecord
from extract.splits import SplitSettings


@dataclass
class Classifier:
    """``predict_proba(uint8 [N, S, S, 3]) -> [N, C]``; ``features`` is set for heads (t-SNE, reports)."""

    name: str  # what the user gave: head folder or model file
    kind: str  # head kind (svm, softmax, mlp), "fine-tuned keras" or "onnx"
    class_names: list[str]
    input_size: int
    engine: str  # which engine computes the probabilities, for the user
    backbone: str
    run: Callable[[np.ndarray], np.ndarray]
    features: Callable[[np.ndarray], np.ndarray] | None = None
    head: TrainedHead | None = None
    split_settings: dict | None = None  # the train/validation/test settings it was trained with, when known
    # exported models with the unknown score: (probabilities, ood_score [N]) and the ``ood`` metadata
    run_with_ood: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    ood: dict | None = None
    split_settings: SplitSettings | None = None  # the settings it was trained with, when known
    split_anchors: str = ""  # and its store's near-duplicate anchors (JSON, see extract/leak_free.py)

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.run(batch), dtype=np.float64)

    def predict_with_ood(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and the unknown score (higher: farther from every class), None without one."""
        if self.run_with_ood is None:
            return self.predict_proba(batch), None
        probs, scores = self.run_with_ood(batch)
        return np.asarray(probs, dtype=np.float64), np.asarray(scores, dtype=np.float64)


def head_classifier(head: str | Path, weights: str | None = None, engine: str = "auto",
                    threads: int | None = None) -> Classifier:
    """Backbone engine (cached ONNX without TensorFlow when possible) followed by the head in numpy."""
    trained = load_head(head)
    backbone = trained.open_engine(weights, engine, threads)  # refuses other weights before any build
    description = ("onnxruntime (cached backbone engine) + numpy head" if backbone.name == "onnx"
                   else "Keras backbone + numpy head")
    return Classifier(name=str(head), kind=trained.kind, class_names=list(trained.class_names),
                      input_size=trained.input_size, engine=description, backbone=trained.features_name,
                      run=lambda batch: trained.predict_proba(backbone(batch)), features=backbone, head=trained)


def onnx_classifier(path: str | Path, threads: int | None = None) -> Classifier:
    """An exported model: class names, input size and backbone from its metadata."""
    from edge.model import ModelError, load_model
    from extract.engine import default_threads

    try:
        model = load_model(path, threads or default_threads())
    except ModelError as exc:
        raise TransferKitError(str(exc)) from None
    # Only the name is needed; a model exported by another tool may carry a partial record or none
    # (the edge contract does not require it), so it is not parsed as a full BackboneRecord.
    name = model.backbone.get("name") if isinstance(model.backbone, dict) else None
    backbone = name if isinstance(name, str) else "?"
    return Classifier(name=str(path), kind="onnx", class_names=model.class_names, input_size=model.input_size[0],
                      engine=f"onnxruntime ({Path(path).name})", backbone=backbone, run=model.predict,
                      run_with_ood=model.predict_scores if model.ood is not None else None, ood=model.ood)


def keras_classifier(path: str | Path) -> Classifier:
    """A fine-tuned ``model.keras`` (loaded with safe_mode) and its sidecar."""
    from export.keras_models import load_fine_tuned

    model, info = load_fine_tuned(path)
    record = BackboneRecord.from_dict(info["backbone"])
    return Classifier(name=str(path), kind="fine-tuned", class_names=list(info["class_names"]),
                      input_size=record.input_size, engine=f"Keras ({Path(path).name})", backbone=record.name,
                      run=lambda batch: np.asarray(model(batch, training=False)),
                      split_settings=SplitSettings.resolve(info["split_settings"]),
                      split_anchors=info.get("split_anchors", ""))


def open_classifier(head: str | Path | None = None, model: str | Path | None = None, weights: str | None = None,
                    engine: str = "auto") -> Classifier:
    """Exactly one of ``head`` (a fit-head folder) or ``model`` (``.onnx`` or ``.keras``)."""
    if (head is None) == (model is None):
        raise TransferKitError("give either --head HEAD or --model MODEL.onnx|MODEL.keras")
    if head is not None:
        return head_classifier(head, weights, engine)
    suffix = Path(model).suffix.lower()
    if suffix == ".onnx":
        return onnx_classifier(model)
    if suffix == ".keras":
        return keras_classifier(model)
    raise TransferKitError(f"--model must be a .onnx file (export-onnx) or a .keras file (fine-tune), got {model}")
