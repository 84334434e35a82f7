"""Export a classifier to one ONNX file for the edge runner: uint8 NHWC image in, probabilities out.

Two sources:
- a fine-tuned ``.keras`` model (``--model``), converted whole with tf2onnx;
- a frozen backbone and a trained head (``--store`` + ``--head``): the backbone is rebuilt from the
  head's backbone record with the very same weights, converted with tf2onnx, and the head's own
  ONNX graph is appended with ``onnx.compose.merge_models``. A head over several backbones or over
  mirror-averaged features gets them all in the same graph (``export.composite``).

Either way the ``backbone`` metadata is the record carried by the head (or the model's sidecar),
unchanged: the one written when the features were extracted.

Every export is checked against Keras on real images of the data set (``export.parity``) before it
is renamed into place, so a failed export leaves no file behind. ``--quantize int8`` then writes
``MODEL.int8.onnx`` only if it keeps the test accuracy (``export.quantize``).

Example::

    result = export_onnx("model.onnx", store="features.h5", head="head", quantize="int8")
    print(result.parity.summary())
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from classify.data import features_for_head
from classify.ood import unknown_scorer
from classify.ood_graph import OOD_OUTPUT, add_ood_output
from classify.persist import TRAINED_ON, head_dir, load_head
from export.composite import build_feature_model
from export.data import LabelledImages, from_feature_set, from_folder, from_store, load_batch
from export.finetune_ood import add_score_output, penultimate_scorer, with_features_output
from export.keras_models import load_fine_tuned
from export.metadata import (INPUT_NAME, OUTPUT_NAME, build_metadata, drift_reference, graph_model_id, path_fingerprint,
                             set_metadata)
from export.parity import PROBABILITY_ATOL, ParityReport, check_parity
from export.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_TOLERANCE, QuantizationReport, int8_path, quantize_checked
from extract.engine import keras_to_onnx
from extract.steps import step
from extract.errors import TransferKitError
from extract.files import atomic_write
from extract.record import BackboneRecord
from extract.splits import SplitSettings
from extract.store import FeatureStore

DEFAULT_OPSET = 17
DEFAULT_PARITY_IMAGES = 64
QUANTIZE_CHOICES = ("int8",)


@dataclass
class Conversion:
    """A float ONNX graph and what is needed to check and describe it."""

    model: onnx.ModelProto
    record: BackboneRecord  # carried unchanged from the head or the model's sidecar
    reference: Callable[[np.ndarray], np.ndarray]  # the Keras side: uint8 batch -> probabilities
    metadata: dict  # build_metadata(...), without model_id
    images: LabelledImages  # the data set, with its train/validation/test split


@dataclass
class ExportResult:
    path: str
    metadata: dict
    parity: ParityReport
    quantization: QuantizationReport | None = None
    removed_stale_int8: str | None = None  # an older MODEL.int8.onnx that no longer matched MODEL.onnx


def keras_graph(model, input_size: int, opset: int) -> onnx.ModelProto:
    """tf2onnx conversion of a uint8-input Keras model (via ``extract.engine.keras_to_onnx``)."""
    with tempfile.TemporaryDirectory(prefix="transferkit-export-") as tmp:
        path = keras_to_onnx(model, input_size, Path(tmp) / "model.onnx", opset=opset)
        return onnx.load(str(path))


def rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a tensor everywhere in the graph (inputs, outputs, node inputs and outputs)."""
    if old == new:
        return
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def name_io(model: onnx.ModelProto) -> None:
    """Input ``image``, outputs ``probabilities`` (and ``ood_score`` when present), batch axes named ``N``."""
    rename_value(model, model.graph.input[0].name, INPUT_NAME)
    rename_value(model, model.graph.output[0].name, OUTPUT_NAME)
    for value in model.graph.output[1:]:
        if value.name.endswith(OOD_OUTPUT):
            rename_value(model, value.name, OOD_OUTPUT)
    for value in (model.graph.input[0], *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"


def append_head(backbone: onnx.ModelProto, head: onnx.ModelProto) -> onnx.ModelProto:
    """Feed the backbone's features into the head graph (names prefixed ``head/`` to stay unique)."""
    head = onnx.compose.add_prefix(head, "head/")
    backbone.ir_version = head.ir_version = max(backbone.ir_version, head.ir_version)
    merged = onnx.compose.merge_models(
        backbone, head, io_map=[(backbone.graph.output[0].name, head.graph.input[0].name)]
    )
    # merge_models lists a domain shared by both models twice, which onnxruntime's quantizer refuses
    opsets = {opset.domain: opset.version for opset in merged.opset_import}
    del merged.opset_import[:]
    merged.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())
    return merged


def fine_tuned_images(info: dict, images_dir: str | Path | None) -> LabelledImages:
    """The images a fine-tuned model was trained on, with its split: the store's column when its
    store is still there, else drawn again with the split settings in its sidecar."""
    root = images_dir or info["images_root"]
    if not Path(root).is_dir():
        raise TransferKitError(f"the model's images are not at {root}; pass --images DIR with the folder it was trained on")
    store = (info.get("store") or {}).get("path")
    if store and Path(store).is_file():
        images = from_store(FeatureStore(store).state, root)
        if images.class_names != info["class_names"]:
            raise TransferKitError(f"the model's store {store} now has classes {images.class_names}, the model "
                                   f"{info['class_names']}; pass --images DIR or restore the store")
        return images
    return from_folder(root, SplitSettings.resolve(info["split_settings"]), info["class_names"],
                       info.get("split_anchors", ""))


def from_fine_tuned(model_path: str | Path, images_dir: str | Path | None, opset: int,
                    unknown: bool = True) -> Conversion:
    """``unknown=False``: no unknown score (no penultimate-feature pass, no ``ood_score``, no ``ood``)."""
    model, info = load_fine_tuned(model_path)
    record = BackboneRecord.from_dict(info["backbone"])
    images = fine_tuned_images(info, images_dir)
    source = {"kind": "fine-tuned", "model": str(Path(model_path).resolve()), "model_sha256": info["model_sha256"],
              "head": info["head"], "store": info["store"]}
    ood = {}
    if unknown:
        two_outputs = with_features_output(model)  # the unknown score, on the fine-tuned network's own features
        scorer = penultimate_scorer(two_outputs, images, record.input_size)
        graph = keras_graph(two_outputs, record.input_size, opset)
        add_score_output(graph, scorer)
        ood = {"ood": {**scorer.calibration_, "features": "penultimate layer of the fine-tuned model"}}
    else:
        graph = keras_graph(model, record.input_size, opset)
    return Conversion(
        model=graph, record=record,
        reference=lambda batch: np.asarray(model(batch, training=False)),
        metadata={**build_metadata(info["class_names"], record, source), **ood},
        images=images,
    )


def from_head(store: str | Path, head: str | Path, images_dir: str | Path | None, weights: str | None,
              opset: int, unknown: bool = True) -> Conversion:
    """``unknown=False``: no unknown score (nothing fitted, no ``ood_score`` output, no ``ood`` metadata)."""
    trained = load_head(head)
    features = features_for_head(trained, store)
    backbone = build_feature_model(trained.records, weights, who=TRAINED_ON)
    head_graph = trained.to_onnx(opset)
    ood = {}
    if unknown:  # the "unknown" score: a second output, calibrated without the test split
        scorer = unknown_scorer(features)
        add_ood_output(head_graph, scorer)
        ood = {"ood": scorer.calibration_}
    source = {"kind": "head", "head_kind": trained.kind, "store": str(Path(store).resolve()),
              "store_sha256": path_fingerprint(store), "head": str(head_dir(head).resolve()),
              "head_fingerprint": path_fingerprint(head_dir(head))}
    return Conversion(
        model=append_head(keras_graph(backbone, trained.input_size, opset), head_graph),
        record=trained.backbone,
        # predict_on_batch runs a traced graph that frees each activation once used, where an eager call of
        # a several-backbone composite held them all (the parity check's peak RSS: docs/bench/recipe-export.md)
        reference=lambda batch: trained.predict_proba(np.asarray(backbone.predict_on_batch(batch))),
        metadata={**build_metadata(trained.class_names, trained.backbone, source, trained.joined),
                  **ood, **_drift_reference(trained, features)},
        images=from_feature_set(features, images_dir),
    )


def _drift_reference(trained, features) -> dict:
    """``{"drift_reference": ...}`` from the head's predictions on the store's test rows (held out from
    the head), else its validation rows; ``{}`` for a store with neither."""
    splits = np.asarray(features.splits)
    for split in ("test", "validation"):
        rows = splits == split
        if rows.any():
            probabilities = trained.predict_proba(features.features[rows])
            return {"drift_reference": drift_reference(probabilities, trained.class_names, split)}
    return {}


def write_checked(conversion: Conversion, out: Path, parity_images: int, threads: int | None) -> tuple[dict, ParityReport]:
    """Name, describe and validate the graph, check parity on a temp file, then rename it to ``out``."""
    model = conversion.model
    name_io(model)
    metadata = {**conversion.metadata,
                "model_id": graph_model_id(model, conversion.record.name, conversion.metadata["source"]["kind"])}
    set_metadata(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    size = metadata["input_size"][0]
    batch, _ = load_batch(conversion.images.first(parity_images).paths, size)
    with atomic_write(out) as tmp:  # a model that fails the parity check never reaches ``out``
        onnx.save(model, str(tmp))
        parity = check_parity(conversion.reference, tmp, batch, PROBABILITY_ATOL, threads)
    return metadata, parity


def export_onnx(
    out: str | Path,
    model: str | Path | None = None,
    store: str | Path | None = None,
    head: str | Path | None = None,
    images: str | Path | None = None,
    weights: str | None = None,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    parity_images: int = DEFAULT_PARITY_IMAGES,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    threads: int | None = None,
    progress: bool = False,
    unknown: bool = True,
) -> ExportResult:
    """Export ``model`` (fine-tuned .keras) or ``store`` + ``head`` to ``out`` (and ``MODEL.int8.onnx``).

    ``progress``: what each long step is doing, and bars over calibration and scoring, on stderr.
    ``unknown=False``: the model gets no unknown score (it is neither fitted nor in the graph)."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise TransferKitError(f"--out must end in .onnx, got {out.name}")
    if (model is None) == (store is None and head is None):
        raise TransferKitError("give either --model MODEL.keras or --store STORE with --head HEAD")
    if model is None and (store is None or head is None):
        raise TransferKitError("--store and --head go together")
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise TransferKitError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}")
    if parity_images < 1:
        raise TransferKitError("--parity-images must be at least 1")
    step("export-onnx: loading the model and converting it to ONNX (tf2onnx)", progress)
    conversion = (from_fine_tuned(model, images, opset, unknown) if model is not None
                  else from_head(store, head, images, weights, opset, unknown))
    out.parent.mkdir(parents=True, exist_ok=True)
    step(f"export-onnx: checking Keras against onnxruntime on {parity_images} images", progress)
    metadata, parity = write_checked(conversion, out, parity_images, threads)
    result = ExportResult(path=str(out), metadata=metadata, parity=parity)
    int8 = int8_path(out)
    if quantize == "int8":
        result.quantization = quantize_checked(
            out, int8, metadata, conversion.images.subset("train"), conversion.images.subset("test"),
            metadata["input_size"][0], tolerance, calibration_images, threads, progress,
        )
    if int8.exists() and not (result.quantization and result.quantization.accepted):
        int8.unlink()
        result.removed_stale_int8 = str(int8)
    return result
