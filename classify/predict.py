"""Classify new image files with a saved head: backbone (rebuilt from the head's record) + head.

    >>> for row in predict_images("head/", ["photo.jpg"]):
    ...     print(row["image"], row.get("label"), row.get("probability"), row.get("error"))

The backbone is built with the preprocessing, input size and weights the head was trained on; the
weights available now must have the same id (same file hash, or the same random-init seed).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from classify.errors import HeadFileError, HeadMismatch
from classify.persist import TrainedHead, load_head
from edge.imageio import ImageDecodeError, load_image
from extract.backbones import UnknownBackbone, get_backbone
from extract.weights import resolve_weights

TOP_K = 3


def default_weights(record: dict) -> str:
    """The ``--weights`` choice that reproduces the head's features, when one can be named."""
    weights = record.get("weights", {})
    if weights.get("kind") in ("imagenet", "none"):
        return weights["kind"]
    raise HeadMismatch(f"the head was trained on features from the weights file {weights.get('file')!r} "
                       f"({weights.get('id')}); pass --weights PATH to that file")


def _random_init_seed(record: dict) -> int:
    weights_id = record.get("weights", {}).get("id", "")
    match = re.fullmatch(r"random-init:seed=(\d+)", weights_id)
    if record.get("weights", {}).get("kind") == "none" and not match:
        raise HeadFileError(f"the head's backbone record has weights id {weights_id!r}; expected random-init:seed=N")
    return int(match.group(1)) if match else 0


def build_backbone_for_head(trained: TrainedHead, weights: str | None = None):
    """The frozen backbone whose features the head expects; refuses a backbone or weights that differ.

    Everything is checked before the (slow) model build, so a refusal is immediate.
    """
    from extract.models import build_backbone

    record = trained.backbone
    try:
        spec = get_backbone(record.get("name", ""))
    except UnknownBackbone as exc:
        raise HeadMismatch(f"cannot rebuild the head's backbone: {exc}") from None
    for key in ("preprocessing", "feature_dim"):
        if getattr(spec, key) != record.get(key):
            raise HeadMismatch(f"the head was trained on {spec.name} features with {key} {record.get(key)}; "
                               f"this transferkit has {getattr(spec, key)}")
    choice = weights or default_weights(record)
    seed = _random_init_seed(record)
    want, have = record.get("weights", {}).get("id"), resolve_weights(spec, choice, seed=seed).weights_id
    if have != want:
        raise HeadMismatch(f"the head was trained on {spec.name} features from weights {want}; "
                           f"--weights {choice} gives {have}")
    return build_backbone(spec.name, weights=choice, input_size=record.get("input_size"), seed=seed)


def predict_images(head: str | Path, images: list[str | Path], weights: str | None = None, engine: str = "auto",
                   batch_size: int = 32) -> list[dict]:
    """One dict per image, in order: ``label``, ``probability`` and ``top`` classes, or ``error``."""
    from extract.engine import make_engine

    trained = load_head(head)
    built = build_backbone_for_head(trained, weights)
    run = make_engine(built, engine)
    size = (built.input_size, built.input_size)
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
