"""Mirror-averaged features (``extract --tta flip``): each row is the mean of the image's features and
its horizontally mirrored copy's.

Averaging a photo with its mirror image removes the left/right accidents of one shot; on TrashNet
and fruits it gains about a point with EfficientNet-Lite heads (issue #16, ``docs/bench/accuracy.md``).
It doubles the backbone's work per image. Such features are stored under their own name,
``BACKBONE@flip`` (their record says ``"tta": "flip"``), and never mixed with plain rows; the exported
ONNX model does the same averaging inside its graph (``export/composite.py``).

    >>> features = mirror_averaged(engine, uint8_batch)  # [N, H, W, 3] -> [N, D]
"""

from __future__ import annotations

import numpy as np

FLIP = "flip"
FLIP_SUFFIX = "@flip"


def mirrored(batch: np.ndarray) -> np.ndarray:
    """The NHWC batch mirrored left to right (the width axis reversed)."""
    return batch[:, :, ::-1]


def mirror_averaged(run_engine, batch: np.ndarray) -> np.ndarray:
    """The mean of ``run_engine``'s features for ``batch`` and for its mirror image, in one call of 2N
    images (the exported graph runs the same batch of 2N)."""
    both = np.asarray(run_engine(np.concatenate([batch, mirrored(batch)])), dtype=np.float32)
    return (both[:len(batch)] + both[len(batch):]) / 2


def tta_suffix(tta: str | None) -> str:
    return FLIP_SUFFIX if tta == FLIP else ""
