"""Classify new image files with a saved head: backbone (rebuilt from the head's record) + head.

    >>> for row in predict_images("head/", ["photo.jpg"]):
    ...     print(row["image"], row.get("label"), row.get("probability"), row.get("error"))

The backbone is built with the preprocessing, input size and weights the head was trained on; the
weights available now must have the same id (same file hash, or the same random-init seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from classify.persist import load_head
from edge.imageio import ImageDecodeError, load_image

TOP_K = 3


def predict_images(head: str | Path, images: list[str | Path], weights: str | None = None, engine: str = "auto",
                   batch_size: int = 32) -> list[dict]:
    """One dict per image, in order: ``label``, ``probability`` and ``top`` classes, or ``error``."""
    trained = load_head(head)
    run = trained.open_engine(weights, engine)
    size = (trained.backbone.input_size, trained.backbone.input_size)
    results: list[dict] = []
    for start in range(0, len(images), batch_size):
        rows, arrays = [], []
        for path in images[start:start + batch_size]:
            results.append(row := {"image": str(path)})
            try:
                arrays.append(load_image(path, size))
                rows.append(row)
            except ImageDecodeError as exc:
                row["error"] = str(exc)
        if not arrays:
            continue
        for row, p in zip(rows, trained.predict_proba(run(np.stack(arrays)))):
            order = np.argsort(-p, kind="stable")[:TOP_K]
            row["label"] = trained.class_names[order[0]]
            row["probability"] = float(p[order[0]])
            row["top"] = [{"label": trained.class_names[i], "probability": float(p[i])} for i in order]
    return results
