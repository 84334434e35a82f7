"""Name the ImageNet classes a backbone sees in photos: a quick check that its weights and preprocessing are right.

Images are decoded by ``edge.imageio.load_image`` like everywhere else, but framed the way ImageNet
classifiers are evaluated: shorter side resized to ``size / 0.875`` and a centred ``size`` x ``size``
crop, rather than the whole photo squashed to a square. That view is what the 1000-class tops were
trained and evaluated on; the extraction pipeline keeps its own (uncropped) framing for new heads.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from edge.imageio import ImageDecodeError, decode_image, read_image_file
from extract.errors import TransferKitError
from extract.models import build_backbone

CENTRE_CROP_FRACTION = 0.875
BATCH_SIZE = 16
_ROTATED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@lru_cache(maxsize=1)
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, indexed by class id."""
    return json.loads((Path(__file__).with_name("imagenet_classes.json")).read_text(encoding="utf-8"))


def _upright_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) after EXIF rotation, from the header only; None when unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if img.getexif().get(ExifTags.Base.Orientation) in _ROTATED_ORIENTATIONS:
                width, height = height, width
            return width, height
    except Exception:  # decode_image reports the reason when it tries the same bytes
        return None


def load_centre_crop(path: str | Path, size: int, fraction: float = CENTRE_CROP_FRACTION) -> np.ndarray:
    """``(size, size, 3)`` uint8 RGB: the aspect-preserving ImageNet evaluation view of a file.

    The file is read once (regular files only: a FIFO or device is refused, never opened).
    """
    data = read_image_file(path).data
    upright = _upright_size(data)
    if upright is None:
        return decode_image(data, (size, size))  # raises ImageDecodeError with the reason
    width, height = upright
    scale = size / fraction / min(width, height)
    resized = decode_image(data, (max(size, round(height * scale)), max(size, round(width * scale))))
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top : top + size, left : left + size]


def _batches(paths: Iterable[str | Path], size: int, results: list[dict]) -> Iterator[list[tuple[dict, np.ndarray]]]:
    """Decoded images in batches; each file gets its result dict appended (with "error" if unreadable)."""
    batch: list[tuple[dict, np.ndarray]] = []
    for path in paths:
        entry: dict = {"path": str(path)}
        results.append(entry)
        try:
            batch.append((entry, load_centre_crop(path, size)))
        except ImageDecodeError as exc:
            entry["error"] = str(exc)
            continue
        if len(batch) == BATCH_SIZE:
            yield batch
            batch = []
    if batch:
        yield batch


def identify(
    paths: Iterable[str | Path],
    backbone: str = "efficientnet_lite0",
    top: int = 5,
    weights: str | None = "imagenet",
) -> list[dict]:
    """Top-``top`` ImageNet classes per image, in input order.

    Each result is ``{"path", "top": [{"class_id", "name", "probability"}, ...]}``, or
    ``{"path", "error"}`` for a file that cannot be decoded.
    """
    names = imagenet_class_names()
    if not 1 <= top <= len(names):
        raise TransferKitError(f"--top must be between 1 and {len(names)}, got {top}")
    built = build_backbone(backbone, weights, include_top=True)
    results: list[dict] = []
    for batch in _batches(paths, built.input_size, results):
        probabilities = np.asarray(built.model.predict_on_batch(np.stack([image for _, image in batch])))
        if probabilities.shape[1] != len(names):
            raise TransferKitError(
                f"{backbone} with weights {weights} predicts {probabilities.shape[1]} classes, not the "
                f"{len(names)} ImageNet classes"
            )
        for (entry, _), probs in zip(batch, probabilities):
            best = np.argsort(-probs, kind="stable")[:top]
            entry["top"] = [
                {"class_id": int(i), "name": names[i], "probability": float(probs[i])} for i in best
            ]
    return results
