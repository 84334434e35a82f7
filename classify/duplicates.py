"""Near-duplicate groups from six kinds of evidence, and what they mean for the splits.

- ``exact``: the same file bytes (sha256).
- ``pixels``: 16x16 greyscale thumbnails with cosine >= ``PIXEL_THRESHOLD``, one against each of
  the other's 8 dihedral variants: resized, re-encoded, mirrored, turned by 90/180 degrees or
  transposed copies score 0.99-1.0.
- ``features``: backbone features (centred, unit length) with cosine >= ``FEATURE_THRESHOLD``:
  slightly cropped, shifted or zoomed copies, and the same object photographed twice.
- ``mutual``: two images that are each other's nearest neighbour in the features, with cosine
  >= ``MUTUAL_COSINE`` (under the feature threshold) that beats the next-nearest image of either
  by ``MUTUAL_MARGIN`` (in a class of look-alikes the nearest is not much nearer than the
  rest): the same object photographed twice
  (TrashNet) or a re-augmented stock photo (fruits). Looked at: 16 of 16 sampled TrashNet pairs
  between 0.80 and 0.90 were the same object; about 12 of 16 in fruits were the same photo. Between
  0.75 and 0.80 the rule would add 46 TrashNet pairs, of which 8 of 12 sampled looked like the same
  object: the cosine stays at 0.80.
- ``aligned``: pairs with a features cosine between ``CANDIDATE_COSINE`` and the feature
  threshold (at most ``CANDIDATES_PER_IMAGE`` per image, the most similar) whose pictures,
  once rotated, scaled, shifted and possibly mirrored onto each other, share their fine detail
  (``classify/audit_alignment.py``): copies rotated with black corners, zoomed, cropped to 80 %
  or mirrored, which score 0.75-0.90 in the features like different photos of the same fruit.
- ``keypoints``: pairs with a features cosine from ``KEYPOINT_COSINE`` (0.60) under the feature
  threshold (the same ``CANDIDATES_PER_IMAGE`` per image), not linked by the rules above, with 10+
  SIFT matches that agree on one rotation, zoom and shift, when one picture shows black fill or
  neither picture matches more than 2 candidates so (``classify/audit_keypoints.py``): copies
  rotated or shifted with black corners that the alignment scores low or never tries (in fruits,
  36 and 51 of the 87 such pairs looked for), and the same object photographed again, turned or
  moved (TrashNet: 64 pairs, 62 of them looked at as the same object, 2 probably), but not
  pictures that share a print with many others (cardboard boxes of one design). With
  ``thorough`` (``audit --thorough``) the rule also checks the pairs that share SIFT visual words
  (``classify/audit_words.py``), whatever their features say: copies rotated, cropped or
  recoloured beyond the features' reach.
  Its similarity is the share of the sparser picture's keypoints that agree (0-1).

Thresholds, measured on ../shared/datasets/fruits and trashnet with EfficientNet-Lite0 (see
``bench/audit_bench.py`` and the README): a 16x16 thumbnail of an unrelated photo on the same
white background scores up to 0.98, so pixels alone only decide near-exact copies; features of
copies cropped to 90 % score 0.93 (median), re-augmented stock photos 0.75-0.95, different photos
of the same kind of fruit up to about 0.87. At 0.90, 10 of 12 sampled fruits pairs were copies.

Groups are connected components: two images are in one group when a chain of pairs links them.
``copy_pairs`` gathers every kind of evidence and ``copy_groups`` makes the groups: the audit
reports them and ``extract --split-group-by near-duplicates`` keeps each in one split
(``extract/leak_free.py``), so both see the same groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from classify.audit_alignment import ALIGNED_THRESHOLD, CANDIDATE_COSINE, aligned_pairs
from classify.audit_images import ImageSignatures, images_reachable, read_images
from classify.audit_keypoints import KEYPOINT_COSINE, KEYPOINT_INLIERS, ImageKeypoints, keypoint_pairs
from classify.audit_words import word_candidates
from extract.neighbours import (NEAR_DUPLICATE_COSINE, connected_groups, exact_pairs, mutual_nearest_pairs,
                                normalise, similar_and_nearest, similar_pairs, unique_pairs)
from extract.splits import SPLITS

FEATURE_THRESHOLD = NEAR_DUPLICATE_COSINE
PIXEL_THRESHOLD = 0.99
MUTUAL_COSINE = 0.80
MUTUAL_MARGIN = 0.02  # ... and beating either image's next-nearest by this much: a twin, not a dense cluster
CANDIDATES_PER_IMAGE = 5  # aligning costs milliseconds a pair: bounded to 5 per image


EVIDENCE = {  # what each kind of evidence is, and what its similarity measures (the report's legend)
    "exact": "the same file bytes (similarity 1)",
    "pixels": f"16x16 thumbnails, one turned or mirrored onto the other (cosine, a copy from {PIXEL_THRESHOLD:g})",
    "features": "backbone features (centred cosine, a copy from the --threshold)",
    "mutual": f"each other's nearest neighbour in the features (centred cosine, from {MUTUAL_COSINE:.2f})",
    "aligned": "the pictures rotated, scaled and shifted onto each other (detail score -1..1, a copy from "
               f"{ALIGNED_THRESHOLD:g})",
    "keypoints": "SIFT keypoints agreeing on one rotation, zoom and shift (share of the sparser picture's "
                 f"keypoints that agree, 0-1: {KEYPOINT_INLIERS} or more agreeing keypoints make a copy)",
}


@dataclass
class DuplicateGroup:
    rows: list[int]
    kinds: list[str]  # evidence that linked its members (keys of EVIDENCE)
    max_similarity: float
    similarity_by_kind: dict[str, float] = field(default_factory=dict)  # the best pair of each kind
    splits: list[str] = field(default_factory=list)  # distinct splits, in SPLITS order
    labels: list[str] = field(default_factory=list)  # distinct class names

    @property
    def leak(self) -> bool:
        return len(self.splits) > 1

    @property
    def conflict(self) -> bool:
        return len(self.labels) > 1


def _with_variants(unit: np.ndarray, variants: np.ndarray, threshold: float) -> np.ndarray:
    """Pairs i < j where unit[i]·unit[j], or unit[i]·variant[j] for any variant, reaches ``threshold``."""
    found = [similar_pairs(unit, threshold)]
    for variant in variants:
        crossed = similar_pairs(unit, threshold, others=variant)
        crossed[:, :2] = np.sort(crossed[:, :2], axis=1)
        found.append(crossed)
    return np.concatenate(found)


def find_pairs(features: np.ndarray, pixels: ImageSignatures | None, feature_threshold: float = FEATURE_THRESHOLD,
               pixel_threshold: float = PIXEL_THRESHOLD, progress=None, align_progress=None,
               keypoint_progress=None, thorough: bool = False, word_progress=None) -> dict[str, np.ndarray]:
    """``{"exact"|"pixels"|"features"|"mutual"|"aligned"|"keypoints": (m, 3) array of (i, j, similarity)}``, i < j.

    ``align_progress(total)`` (and ``keypoint_progress(total)``) is called once with the number of
    pairs to align (of images to find keypoints in) and returns the callable that counts them (or None).
    ``thorough``: the keypoint rule also checks pairs that share visual words
    (``classify/audit_words.py``), counted by ``word_progress(k)``.
    """
    unit = normalise(features)
    search = candidate_search(feature_threshold) if pixels is not None else {}
    close, nearest, candidates = similar_and_nearest(unit, min(feature_threshold, CANDIDATE_COSINE), progress=progress,
                                                     **search)
    mutual = mutual_nearest_pairs(unit, nearest=nearest)
    keep = (mutual[:, 2] >= MUTUAL_COSINE) & (mutual[:, 2] < feature_threshold) & (mutual[:, 3] >= MUTUAL_MARGIN)
    found = {"features": close[close[:, 2] >= feature_threshold], "mutual": mutual[keep, :3]}
    if pixels is not None:
        found["exact"] = exact_pairs(pixels.sha256)
        found["pixels"] = _with_variants(pixels.signatures, pixels.variants, pixel_threshold)
        to_align = candidates[candidates[:, 2] >= CANDIDATE_COSINE]
        found["aligned"] = aligned_pairs(pixels.root, pixels.paths, to_align,
                                         progress=align_progress(len(to_align)) if align_progress else None)
        found["keypoints"] = _keypoint_evidence(pixels, candidates, found, thorough, keypoint_progress, word_progress)
    return found


def candidate_search(feature_threshold: float = FEATURE_THRESHOLD) -> dict:
    """``similar_and_nearest``'s options that pick the pairs the picture rules check: each image's
    ``CANDIDATES_PER_IMAGE`` most similar, from ``KEYPOINT_COSINE`` to under the feature threshold."""
    return {"per_row": CANDIDATES_PER_IMAGE, "band": (KEYPOINT_COSINE, feature_threshold)}


def _keypoint_evidence(pixels: ImageSignatures, candidates: np.ndarray, found: dict[str, np.ndarray],
                       thorough: bool, keypoint_progress=None, word_progress=None) -> np.ndarray:
    """The keypoint rule on the feature candidates not linked yet and, when ``thorough``, on the
    pairs that share visual words too (never fewer links than without)."""
    keypoints, own = ImageKeypoints(pixels.root, pixels.paths), None
    if thorough:
        default = {(int(i), int(j)) for i, j in candidates[:, :2]}
        candidates = unique_pairs([candidates, word_candidates(keypoints, progress=word_progress)])
        own = np.array([(int(i), int(j)) in default for i, j in candidates[:, :2]], dtype=bool)
    linked = _linked(len(pixels.paths), candidates, found)
    to_match, own = candidates[~linked], None if own is None else own[~linked]
    total = len(np.unique(to_match[:, :2]))
    return keypoint_pairs(pixels.root, pixels.paths, to_match, keypoints=keypoints, own=own,
                          progress=keypoint_progress(total) if keypoint_progress else None)


def _linked(n: int, candidates: np.ndarray, found: dict[str, np.ndarray]) -> np.ndarray:
    """Which candidate pairs have their two images already in one group."""
    group = np.arange(n)
    for k, rows in enumerate(pair_groups(n, found)):
        group[rows] = n + k
    i, j = candidates[:, 0].astype(np.int64), candidates[:, 1].astype(np.int64)
    return group[i] == group[j]


def copy_pairs(features: np.ndarray, paths: list[str], sha256: list[str | None], images_root: str | Path | None,
               feature_threshold: float = FEATURE_THRESHOLD, read_progress=None, progress=None,
               align_progress=None, keypoint_progress=None, thorough: bool = False,
               word_progress=None) -> tuple[dict[str, np.ndarray], ImageSignatures | None]:
    """``find_pairs`` on the features and, when ``images_root`` still holds the files, on the files
    too (read once: hashes, thumbnails); without the files, exact copies come from the stored
    ``sha256``. Returns the pairs and the files' signatures (None without the files)."""
    pixels = read_images(images_root, paths, progress=read_progress) if images_reachable(images_root, paths) else None
    pairs = find_pairs(features, pixels, feature_threshold, progress=progress, align_progress=align_progress,
                       keypoint_progress=keypoint_progress, thorough=thorough, word_progress=word_progress)
    if pixels is None:
        pairs["exact"] = exact_pairs(list(sha256))
    return pairs, pixels


def pair_groups(n: int, pairs: dict[str, np.ndarray]) -> list[list[int]]:
    """Connected groups (lists of rows, 2+ each) of every kind of pair."""
    every = [p[:, :3] for p in pairs.values() if len(p)]
    return connected_groups(n, np.concatenate(every) if every else np.zeros((0, 3)))


def copy_groups(features: np.ndarray, paths: list[str], sha256: list[str | None],
                images_root: str | Path | None) -> list[list[int]]:
    """The rows of each group of copies the audit reports (see ``copy_pairs``)."""
    return pair_groups(len(paths), copy_pairs(features, paths, sha256, images_root)[0])


def group_duplicates(pairs: dict[str, np.ndarray], splits: np.ndarray, labels: np.ndarray,
                     class_names: list[str]) -> list[DuplicateGroup]:
    """Connected groups with their evidence, splits and labels; leaks and conflicts first."""
    groups = pair_groups(len(splits), pairs)
    group_of = {row: k for k, rows in enumerate(groups) for row in rows}
    by_kind: list[dict[str, float]] = [{} for _ in groups]
    for kind, found in pairs.items():
        for i, _, similarity in found:
            seen = by_kind[group_of[int(i)]]
            seen[kind] = max(seen.get(kind, -1.0), 1.0 if kind == "exact" else float(similarity))
    order = SPLITS
    result = []
    for k, rows in enumerate(groups):
        present = set(splits[rows].tolist())
        result.append(DuplicateGroup(
            rows=rows, kinds=sorted(by_kind[k]), max_similarity=round(max(by_kind[k].values()), 4),
            similarity_by_kind={kind: round(by_kind[k][kind], 4) for kind in sorted(by_kind[k])},
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
