"""The frozen front's outputs, computed once per image and kept in memory for the training epochs.

In memory, float32: efficientnet_lite0 cut before its last 4 blocks gives a 7 x 7 x 192 tensor per
image at 224 px, 37,632 bytes (the train images that train, the fit rows of ``export.holdout``, are
cached twice, as is and mirrored, the only augmentation a cache can hold; ``fine-tune``'s metrics.json
gives the count, ``cut.cached_tensors``). An on-disk cache would save the
front pass on a second run, but each run is one pass anyway and the key (backbone record, cut,
image hash) would have to track every change of either; it is not worth its invalidation rules.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import keras
import numpy as np
from tqdm import tqdm

from edge.imageio import ImageDecodeError, load_image
from export.data import LabelledImages


@dataclass
class CachedSplit:
    """One split's front outputs (``mirrored``: of the mirrored images, or None), labels and images."""

    tensors: np.ndarray  # (n, h, w, c) float32
    labels: np.ndarray  # (n,) int
    mirrored: np.ndarray | None = None
    relpaths: list[str] | None = None  # the images the rows came from (those that decoded)

    @property
    def bytes_per_image(self) -> int:
        return int(self.tensors[0].nbytes) if len(self.tensors) else 0


def cache_front(front: keras.Model, images: LabelledImages, size: int, batch_size: int, mirror: bool,
                skipped: dict[str, str], progress: bool = False, label: str = "caching") -> CachedSplit:
    """``front`` on every image that decodes (the others go to ``skipped``), and on its mirror image when
    ``mirror``; a tqdm bar over the images on stderr when ``progress``."""
    outputs, mirrored, kept = [], [], []
    paths = images.paths
    with tqdm(total=len(paths), desc=label, unit="img", file=sys.stderr, disable=not progress, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            batch = []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    batch.append(load_image(paths[i], (size, size)))
                    kept.append(i)
                except ImageDecodeError as exc:
                    skipped[paths[i]] = str(exc)
            if batch:
                batch = np.stack(batch)
                outputs.append(np.asarray(front(batch, training=False), np.float32))
                if mirror:
                    mirrored.append(np.asarray(front(batch[:, :, ::-1], training=False), np.float32))
            bar.update(min(batch_size, len(paths) - start))
    shape = tuple(front.output.shape[1:])
    empty = np.zeros((0, *shape), np.float32)
    return CachedSplit(
        tensors=np.concatenate(outputs) if outputs else empty, labels=images.labels[kept],
        mirrored=(np.concatenate(mirrored) if mirrored else empty) if mirror else None,
        relpaths=[images.relpaths[i] for i in kept],
    )
