"""Classify new image files with a head, a fine-tuned model.keras or an exported model.onnx.

    >>> model = open_classifier(head="head/")
    >>> files, failed = collect_images(["photos/", "extra/*.jpg"])
    >>> for row in predict_images(model, files):
    ...     print(row["image"], row.get("label"), row.get("probability"), row.get("error"))

Arguments are files, folders (searched recursively for image extensions, like ``extract``) or
quoted glob patterns. Each file is classified or gets an ``error``; the CLI exits 1 when any failed.
"""

from __future__ import annotations

import glob
import os
import stat
from pathlib import Path

import numpy as np

from classify.classifiers import Classifier, head_backbone
from classify.persist import TrainedHead
from edge.imageio import ImageDecodeError, load_image
from extract.dataset import walk_image_files
from extract.errors import TransferKitError

TOP_K = 3
GLOB_CHARACTERS = frozenset("*?[")


class NoImagesMatched(TransferKitError):
    """A glob or folder argument matched no image file."""


def build_backbone_for_head(trained: TrainedHead, weights: str | None = None):
    """The frozen Keras backbone whose features the head expects (for export and fine-tuning)."""
    from extract.models import build_backbone

    need = head_backbone(trained, weights)
    return build_backbone(need.spec.name, weights=need.weights, input_size=need.input_size, seed=need.seed)


def collect_images(arguments: list[str]) -> tuple[list[str], list[dict]]:
    """The image files named by ``arguments``, and a failed row per argument that names nothing usable.

    A folder gives its image files (recursively, hidden ones skipped); a pattern with ``* ? [`` that
    is not an existing path is expanded (recursive ``**`` allowed) and must match at least one file.
    """
    files: list[str] = []
    failed: list[dict] = []
    for argument in arguments:
        if os.path.isdir(argument):
            found = [os.path.join(argument, rel) for rel in walk_image_files(Path(argument))]
            if not found:
                failed.append({"image": argument, "error": "folder has no image files"})
            files += found
        elif not os.path.lexists(argument) and GLOB_CHARACTERS & set(argument):
            matched = sorted(p for p in glob.glob(argument, recursive=True) if not os.path.isdir(p))
            if not matched:
                raise NoImagesMatched(f"no file matches {argument!r}")
            files += matched
        else:
            files.append(argument)
    return files, failed


def _regular_file_reason(path: str) -> str | None:
    """Why ``path`` cannot be read as an image without risk (a FIFO would block the open forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if stat.S_ISDIR(mode):
        return "is a directory"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def _decode(path: str, size: int) -> np.ndarray | str:
    reason = _regular_file_reason(path)
    if reason:
        return reason
    try:
        return load_image(path, (size, size))
    except ImageDecodeError as exc:
        return str(exc)


def _label_rows(model: Classifier, rows: list[dict], arrays: list[np.ndarray]) -> None:
    for row, p in zip(rows, model.predict_proba(np.stack(arrays))):
        if not np.all(np.isfinite(p)):
            row["error"] = "model produced non-finite output"
            continue
        order = np.argsort(-p, kind="stable")[:TOP_K]
        row["label"] = model.class_names[order[0]]
        row["probability"] = float(p[order[0]])
        row["top"] = [{"label": model.class_names[i], "probability": float(p[i])} for i in order]


def predict_images(model: Classifier, images: list[str | Path], batch_size: int = 32) -> list[dict]:
    """One dict per image, in order: ``label``, ``probability`` and ``top`` classes, or ``error``."""
    results: list[dict] = []
    for start in range(0, len(images), batch_size):
        rows, arrays = [], []
        for path in images[start:start + batch_size]:
            results.append(row := {"image": str(path)})
            decoded = _decode(str(path), model.input_size)
            if isinstance(decoded, str):
                row["error"] = decoded
            else:
                rows.append(row)
                arrays.append(decoded)
        if arrays:
            _label_rows(model, rows, arrays)
    return results
