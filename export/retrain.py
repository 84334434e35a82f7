"""Retrain an exported model with a sorted review folder: the loop from the edge back to a new model file.

``retrain("model.onnx", "review/", "model-v2.onnx")`` reads what the model was made from (its
``source`` metadata names the store and head; the head holds the backbone record, kind, seed and
folds; the store its split settings and image folder; the graph its opset; an accepted
``MODEL.int8.onnx`` beside it its quantization), then:

1. checks the review folder: ``DIR/<class>/`` images whose classes the model knows. A folder named
   ``unknown`` or after a class the model does not know, holding images, is refused: sort them into
   class folders first (a new class needs a new head: add its folder to the images and run
   ``extract``/``fit-head``/``export-onnx``). Empty folders are ignored;
2. hard-links (or copies) each image into the model's image folder under the same ``<class>/<name>``
   (``train/<class>/<name>`` for a folder with split folders), where it gets its split by the
   store's own rule, like any image added to the folder; an image already there with the same bytes
   is kept, one with other bytes is refused;
3. runs ``extract`` on that folder into the same store: only the new images are computed;
4. fits a head of the same kind with the same seed and folds (hyper-parameters chosen by CV again);
5. scores the old and the new head on the store's test images that are not review images (the
   rows the old head was scored on, labelled before the review) and refuses to go on when the new one is less accurate, unless
   ``allow_worse``. Both are also scored on every test row of the store now (review images drawn
   into the test split included), which is printed but does not decide: review labels are what the
   new head learned, so a systematic sorting mistake would reward it there;
6. exports the new store + head with the old model's opset, its unknown score or none (as the old
   model had), and int8 when the old model had an accepted int8 file, parity-checked, to ``out``;
   ``out`` (and the new head folder) must not exist unless ``overwrite``.

The review images stay in the image folder and the store whatever the verdict: they are labelled
images; only the new head and model depend on it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from classify.data import features_for_head
from classify.persist import head_dir, load_head
from edge.files import link_or_copy
from export.metadata import read_metadata
from export.onnx_export import ExportResult, export_onnx
from export.quantize import int8_path
from extract.dataset import SPLIT_FOLDERS, walk_image_files
from extract.engine import ENGINES
from extract.errors import TransferKitError
from extract.files import file_sha256
from extract.int8 import INT8_ENGINE
from extract.job import ExtractionSummary, run_extraction
from extract.steps import step
from extract.weights import resolve_record_weights

UNKNOWN_FOLDER = "unknown"  # the edge runner's --review folder for images of no class


@dataclass(frozen=True)
class Source:
    """What an exported model was made from, and how it was exported."""

    store: Path
    head: Path
    opset: int
    quantize: str | None  # "int8" when the model had an accepted int8 file
    calibration_images: int | None
    unknown: bool  # the model had an unknown score (export-onnx without --unknown off)


@dataclass
class Comparison:
    """Old and new head on the same test rows."""

    images: int
    old_accuracy: float
    new_accuracy: float

    @property
    def verdict(self) -> str:
        if self.new_accuracy > self.old_accuracy:
            return "better"
        return "the same" if self.new_accuracy == self.old_accuracy else "WORSE"


@dataclass
class RetrainResult:
    added: dict[str, int]  # review images linked or copied in, per class
    already_there: int  # review images found in the image folder with the same bytes
    images: str  # the image folder they went to
    extraction: ExtractionSummary
    head: str
    kind: str
    test: Comparison  # the test rows the old head was scored on: this decides
    all_test: Comparison  # every test row of the store now, review images in the test split included
    export: ExportResult | None = None


def model_source(model: str | Path) -> Source:
    """The store, head and export options an exported model records."""
    meta = read_metadata(model)
    source = meta["source"] if isinstance(meta.get("source"), dict) else {}
    if source.get("kind") != "head":
        raise TransferKitError(f"{model} was not exported from a store and head (source kind "
                               f"{source.get('kind')!r}); retrain needs one made by export-onnx --store --head")
    store, head = Path(source.get("store") or ""), Path(source.get("head") or "")
    for name, path in (("store", store), ("head", head)):
        if not path.exists():
            raise TransferKitError(f"{model} was made from the {name} {path}, which is not there any more")
    quantization = meta.get("quantization")
    sibling = int8_path(Path(model))
    if quantization is None and sibling.is_file():
        quantization = read_metadata(sibling).get("quantization")
        if (quantization or {}).get("float_model_id") != meta["model_id"]:
            quantization = None  # an int8 file quantized from another model
    graph = onnx.load(str(model), load_external_data=False)
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    return Source(store, head_dir(head), opset, "int8" if quantization else None,
                  (quantization or {}).get("calibration_images"), unknown="ood" in meta)


def review_plan(review: str | Path, class_names: list[str], images: Path, layout: str) -> list[tuple[Path, Path]]:
    """(review image, where it goes in the image folder); refuses unknown/ and unknown classes."""
    review = Path(review)
    if review.resolve().is_relative_to(images.resolve()):
        raise TransferKitError(f"the review folder {review} is inside the image folder {images}; move it out")
    base = images
    if layout == "split-folders":
        base = next((d for d in images.iterdir() if d.is_dir() and SPLIT_FOLDERS.get(d.name.lower()) == "train"),
                    images / "train")
    plan = []
    for folder in sorted(p for p in review.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = walk_image_files(folder)
        if not files:
            continue
        if folder.name == UNKNOWN_FOLDER or folder.name not in class_names:
            what = "unknown/" if folder.name == UNKNOWN_FOLDER else f"{folder.name}/ is not a class of the model and"
            raise TransferKitError(
                f"{review}: {what} holds {len(files)} images; move each into the folder of its class "
                f"({', '.join(class_names)}) or delete them (a new class needs a new head: extract + fit-head)")
        plan += [(folder / rel, base / folder.name / rel) for rel in files]
    if not plan:
        raise TransferKitError(f"{review} has no images in class folders (expected {review}/<class>/<image>)")
    clashes = [dst for src, dst in plan if os.path.lexists(dst) and (not dst.is_file() or
                                                                     file_sha256(dst) != file_sha256(src))]
    if clashes:
        raise TransferKitError(f"{len(clashes)} review images would replace other files in {images}, e.g. "
                               f"{clashes[0]}; rename them in the review folder")
    return plan


def add_review_images(plan: list[tuple[Path, Path]]) -> tuple[dict[str, int], int]:
    """Hard-link (or copy) the planned images; returns the images added per class and those already there."""
    added: dict[str, int] = {}
    already = 0
    for src, dst in plan:
        if dst.exists():
            already += 1
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(str(src.parent), src.name, str(dst.parent), dst.name)
        added[dst.parent.name] = added.get(dst.parent.name, 0) + 1
    return added, already


def _accuracy(trained, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(trained.head.predict(X) == y)) if len(y) else float("nan")


def compare(old, new, features, review: set[str]) -> tuple[Comparison, Comparison]:
    """Both heads on the test rows that are not ``review`` images, and on every test row of ``features``."""
    test = features.splits == "test"
    earlier = test & ~np.isin(np.asarray(features.paths, dtype=object), list(review))
    if not earlier.any():
        raise TransferKitError("the store had no test images: old and new models cannot be compared")
    return tuple(Comparison(int(rows.sum()), _accuracy(old, features.features[rows], features.labels[rows]),
                            _accuracy(new, features.features[rows], features.labels[rows]))
                 for rows in (earlier, test))


def _check_outputs(out: Path, head_out: Path, model: Path, overwrite: bool) -> None:
    if out.suffix != ".onnx":
        raise TransferKitError(f"--out must end in .onnx, got {out.name}")
    if out.resolve() == model.resolve() and not overwrite:
        raise TransferKitError(f"--out {out} is the model being retrained; name a new file (or pass --overwrite)")
    for path in (out, head_out):
        if path.exists() and not overwrite:
            raise TransferKitError(f"{path} exists; name another (or pass --overwrite to replace it)")


def _extract_options(trained, weights: str | None) -> dict:
    """extract's backbone, weights, input size, dtype and engine (the one that computed the rows) for more
    rows of the head's features."""
    record = trained.backbone
    _, resolved = resolve_record_weights(record, weights, who="the head was trained on")
    return {"backbone": record.name, "weights": str(resolved.path) if resolved.kind == "file" else resolved.kind,
            "input_size": record.input_size, "dtype": record.dtype or "float32",
            "engine": INT8_ENGINE if record.quantization else record.engine if record.engine in ENGINES else "auto"}


def retrain(model: str | Path, review: str | Path, out: str | Path, images: str | Path | None = None,
            head_out: str | Path | None = None, weights: str | None = None, allow_worse: bool = False,
            overwrite: bool = False, progress: bool = False) -> RetrainResult:
    """Add ``review``'s sorted images to ``model``'s training images and write the retrained model to ``out``.

    See the module docstring; ``head_out`` defaults to ``OUT-head`` beside ``out``."""
    from classify.train import fit_heads

    model, out = Path(model), Path(out)
    source = model_source(model)
    head_out = Path(head_out) if head_out else out.with_name(out.stem + "-head")
    _check_outputs(out, head_out, model, overwrite)
    old = load_head(source.head)
    before = features_for_head(old, source.store)
    root = Path(images or before.store_attrs.get("images_root", ""))
    if not root.is_dir():
        raise TransferKitError(f"the model's images are not at {root}; pass --images DIR with its image folder")
    plan = review_plan(review, old.class_names, root, before.store_attrs.get("layout", "class-folders"))
    options = _extract_options(old, weights)
    review_rows = {dst.relative_to(root).as_posix() for _, dst in plan}
    step(f"retrain: adding {len(plan)} review images to {root}", progress)
    added, already = add_review_images(plan)
    summary = run_extraction(root, source.store, progress=progress, **options)
    rows = fit_heads(source.store, kind=old.kind, backbone=summary.backbone, out=head_out,
                     seed=int(old.metrics.get("seed", 0)), folds=int(old.metrics.get("cv_folds", 5)),
                     progress=progress)
    new = load_head(head_out)
    test, all_test = compare(old, new, features_for_head(new, source.store), review_rows)
    result = RetrainResult(added, already, str(root), summary, str(head_out), rows[0]["kind"], test, all_test)
    if test.verdict == "WORSE" and not allow_worse:
        shutil.rmtree(head_out)
        raise TransferKitError(
            f"the retrained {old.kind} head is worse on the old model's {test.images} test images ({100 * test.new_accuracy:.2f}% "
            f"vs {100 * test.old_accuracy:.2f}%); wrote no model (the review images stay in {root} and the store; "
            f"--allow-worse writes it anyway)")
    result.export = export_onnx(out, store=source.store, head=head_out, images=root, weights=weights,
                                opset=source.opset, quantize=source.quantize, progress=progress, unknown=source.unknown,
                                **({"calibration_images": source.calibration_images}
                                   if source.calibration_images else {}))
    return result
