"""Classify new image files with a head, a fine-tuned model.keras or an exported model.onnx.

    >>> model = open_classifier(head="head/")
    >>> files, failed = extract.inputs.collect_images(["photos/", "extra/*.jpg"])
    >>> for row in predict_images(model, files):
    ...     print(row["image"], row.get("label"), row.get("probability"), row.get("error"))

Arguments are files, folders (searched recursively for image extensions, like ``extract``) or
quoted glob patterns. Each file is classified or gets an ``error``; the CLI exits 1 when any failed.

A model.onnx exported with the unknown score (``ood_score`` output and ``ood`` metadata) adds
``ood_score`` and ``unknown`` to each row, like the edge runner: an unknown image's ``label`` is
``"unknown"`` and its best class stays first in ``top``. Heads and model.keras files have no score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from classify.classifiers import Classifier
from edge.imageio import ImageDecodeError, load_image

TOP_K = 3


def _decode(path: str, size: int) -> np.ndarray | str:
    try:
        return load_image(path, (size, size))  # regular files only: a FIFO is refused, never opened
    except ImageDecodeError as exc:
        return str(exc)


def _label_rows(model: Classifier, rows: list[dict], arrays: list[np.ndarray], keep: bool, unknown: bool) -> None:
    probabilities, scores = model.predict_with_ood(np.stack(arrays)) if unknown else (
        model.predict_proba(np.stack(arrays)), None)
    threshold = float(model.ood["threshold"]) if scores is not None else None
    for index, (row, p) in enumerate(zip(rows, probabilities)):
        score = scores[index] if scores is not None else None
        if not np.all(np.isfinite(p)) or (score is not None and not np.isfinite(score)):
            row["error"] = "model produced non-finite output"
            continue
        order = np.argsort(-p, kind="stable")[:TOP_K]
        row["label"] = model.class_names[order[0]]
        row["probability"] = float(p[order[0]])
        row["top"] = [{"label": model.class_names[i], "probability": float(p[i])} for i in order]
        if score is not None:
            row["ood_score"], row["unknown"] = float(score), bool(score > threshold)
            if row["unknown"]:
                row["label"] = "unknown"
        if keep:
            row["probabilities"] = p


def predict_images(model: Classifier, images: list[str | Path], batch_size: int = 32, progress: bool = False,
                   keep_probabilities: bool = False, unknown: bool = True) -> list[dict]:
    """One dict per image, in order: ``label``, ``probability`` and ``top`` classes, or ``error``.

    ``keep_probabilities`` adds every class's probability (``probabilities``, an array) for reports.
    ``unknown=False`` ignores the model's unknown score (no ``ood_score``, ``unknown``, "unknown" label).
    """
    from tqdm import tqdm

    results: list[dict] = []
    with tqdm(total=len(images), unit="img", desc="classify", disable=not progress, leave=False) as bar:
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
                _label_rows(model, rows, arrays, keep_probabilities, unknown)
            bar.update(len(images[start:start + batch_size]))
    return results
