"""Near-duplicate groups from three kinds of evidence, and what they mean for the splits.

- ``exact``: the same file bytes (sha256).
- ``pixels``: 16x16 greyscale thumbnails (or one against the other's mirror) with cosine >=
  ``PIXEL_THRESHOLD``: resized, re-encoded and mirrored copies score 0.99-1.0.
- ``features``: backbone features (centred, unit length) with cosine >= ``FEATURE_THRESHOLD``:
  slightly cropped, shifted, zoomed or rotated copies. Mirrored copies score 0.89-0.96 here
  without a mirrored extraction; the thumbnails' mirror catches them for the cost of a 16x16 flip.

Thresholds, measured on ../shared/datasets/fruits and trashnet with EfficientNet-Lite0 (see
``bench/audit_bench.py`` and the README): a 16x16 thumbnail of an unrelated photo on the same
white background scores up to 0.98, so pixels alone only decide near-exact copies; features of
copies cropped to 90 % score 0.93 (median), re-augmented stock photos 0.85-0.95, different photos
of the same kind of fruit up to about 0.87. At 0.90, 10 of 12 sampled fruits pairs were copies.

Groups are connected components: two images are in one group when a chain of pairs links them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from classify.audit_images import ImageSignatures
from extract.neighbours import NEAR_DUPLICATE_COSINE, connected_groups, exact_pairs, normalise, similar_pairs
from extract.splits import SPLITS

FEATURE_THRESHOLD = NEAR_DUPLICATE_COSINE
PIXEL_THRESHOLD = 0.99


@dataclass
class DuplicateGroup:
    rows: list[int]
    kinds: list[str]  # evidence that linked its members: exact, pixels, features
    max_similarity: float
    splits: list[str] = field(default_factory=list)  # distinct splits, in SPLITS order
    labels: list[str] = field(default_factory=list)  # distinct class names

    @property
    def leak(self) -> bool:
        return len(self.splits) > 1

    @property
    def conflict(self) -> bool:
        return len(self.labels) > 1


def _with_mirror(unit: np.ndarray, mirrored: np.ndarray, threshold: float, progress=None) -> np.ndarray:
    """Pairs i < j where unit[i]·unit[j] or unit[i]·mirrored[j] reaches ``threshold``."""
    direct = similar_pairs(unit, threshold, progress=progress)
    crossed = similar_pairs(unit, threshold, others=mirrored)
    crossed[:, :2] = np.sort(crossed[:, :2], axis=1)
    return np.concatenate([direct, crossed])


def find_pairs(features: np.ndarray, pixels: ImageSignatures | None, feature_threshold: float = FEATURE_THRESHOLD,
               pixel_threshold: float = PIXEL_THRESHOLD, progress=None) -> dict[str, np.ndarray]:
    """``{"exact"|"pixels"|"features": (m, 3) array of (i, j, similarity)}``, i < j."""
    found = {"features": similar_pairs(normalise(features), feature_threshold, progress=progress)}
    if pixels is not None:
        found["exact"] = exact_pairs(pixels.sha256)
        found["pixels"] = _with_mirror(pixels.signatures, pixels.mirrored, pixel_threshold)
    return found


def group_duplicates(pairs: dict[str, np.ndarray], splits: np.ndarray, labels: np.ndarray,
                     class_names: list[str]) -> list[DuplicateGroup]:
    """Connected groups with their evidence, splits and labels; leaks and conflicts first."""
    n = len(splits)
    every = [p for p in pairs.values() if len(p)]
    groups = connected_groups(n, np.concatenate(every) if every else np.zeros((0, 3)))
    group_of = {row: k for k, rows in enumerate(groups) for row in rows}
    kinds: list[set[str]] = [set() for _ in groups]
    best = [0.0] * len(groups)
    for kind, found in pairs.items():
        for i, _, similarity in found:
            k = group_of[int(i)]
            kinds[k].add(kind)
            if kind != "exact":
                best[k] = max(best[k], float(similarity))
            else:
                best[k] = 1.0
    order = SPLITS
    result = []
    for k, rows in enumerate(groups):
        present = set(splits[rows].tolist())
        result.append(DuplicateGroup(
            rows=rows, kinds=sorted(kinds[k]), max_similarity=round(best[k], 4),
            splits=[s for s in order if s in present],
            labels=sorted({class_names[int(label)] for label in labels[rows]}),
        ))
    result.sort(key=lambda g: (not g.conflict, not g.leak, -len(g.rows), g.rows[0]))
    return result


def leaked_test_rows(groups: list[DuplicateGroup], splits: np.ndarray) -> np.ndarray:
    """Test rows that have a copy in the train split (the ones that flatter a test score)."""
    leaked = [row for g in groups if "train" in g.splits and "test" in g.splits
              for row in g.rows if splits[row] == "test"]
    return np.asarray(sorted(leaked), dtype=np.int64)
