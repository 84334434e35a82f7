"""Copies rotated or shifted with black fill, confirmed by keypoints that agree on one rotation, zoom and shift.

Where the fruits set's missed copies were lost (EfficientNet-Lite0, candidate pairs 0.60-0.90
that the other rules left apart, looked at as the two pictures and the second warped onto the
first): 87 pairs had 10+ agreeing matches; 36 of them had a features cosine from 0.75, so the
log-polar alignment (``classify/audit_alignment.py``) had tried them and failed (its score is
under 0.3 for most of the 87: black corners, a crop or a 30-degree turn change the spectrum it
reads the rotation from), and 51 scored 0.60-0.75, under its candidate cosine.

Each candidate pair (features cosine from ``KEYPOINT_COSINE``, among the ``CANDIDATES_PER_IMAGE``
most similar of either image, not already linked by other evidence):

1. SIFT keypoints (OpenCV) of each picture at ``KEYPOINT_PX`` px, away from black fill (the
   corners of a rotated copy's fill are strong keypoints that any two rotated pictures share);
2. matched with Lowe's ratio test (nearest descriptor clearly nearer than the second), to the
   second picture and to its mirror: a mirror reverses the rows and the orientation bins of a
   SIFT descriptor, so the mirror's keypoints cost no second detection;
3. a rotation + zoom + shift fitted by RANSAC; ``KEYPOINT_INLIERS`` matches must agree on it
   within ``RANSAC_PX`` px, the zoom within ``MAX_ZOOM``;
4. the pair is a copy when one picture shows black fill (``MIN_FILL`` of it or more: the mark of
   a rotated or shifted copy) or when the match is ``distinctive``: neither picture matches more
   than ``MAX_PARTNERS`` candidate pairs so. A printed design that many pictures carry (one box
   print on many of TrashNet's cardboard boxes) matches every picture that shows it; an object
   photographed two or three times matches its own other photos.

Looked at by eye (pictures side by side), fruits: 40 of the 69 pairs with black fill (28 from
samples of 12 pairs each with 10-14, 15-19 and 20+ agreeing matches, 12 more at random): 39 were
the same photo (2 of them with a leaf added or removed), 1 the same bananas rearranged; all 11
pairs without fill that are distinctive: the same photo. TrashNet (no black fill): of the 132
candidate pairs with 10+ matches, 100 are cardboard; the partner rule keeps 64 (51 bottles,
cans, flyers and boxes of other classes, 13 cardboard), all looked at: 62 the same object
photographed again (a bottle turned, a flyer refolded, a box by its tape or label), 2 probably
(a box print, another part of the box); it leaves 68 cardboard pairs whose pictures share a
print with 3 to 10 others (an earlier look at 30 such pairs: 14 the same box, the rest different
boxes with the same print): what this rule cannot tell apart.

What it misses: copies without black fill whose picture matches more than ``MAX_PARTNERS``
others (zoomed in, mirrored or turned only: the pixel, features and alignment rules catch most
of those), pictures with too little texture for 10 keypoints at 160 px (smooth yellow bananas,
plain plastic), copies zoomed more than ``MAX_ZOOM``, and pairs under ``KEYPOINT_COSINE`` in the
features (recoloured or heavily cropped copies).

Cost: every candidate image is decoded once at 160 px and its keypoints found (about 5-6 ms, in
threads); a pair costs two descriptor matchings. Pairs are visited in the alignment's locality
order and an image's keypoints dropped after its last pair, so memory follows that order's
bandwidth, not the number of images (``docs/bench/keypoint-memory.md``: about a quarter of the
images on the shared sets, about 120 images at 10,000 and at 100,000 clustered synthetic rows).
The whole command's CPU seconds are in ``docs/bench/audit.md``.

    >>> keypoints = ImageKeypoints(root, paths)
    >>> keypoints.inliers(i, j)      # 40+ for a rotated copy, under 5 for another photo
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from classify.audit_alignment import locality_order, picture_mask
from classify.audit_images import to_grey
from edge.imageio import ImageDecodeError, decode_image, read_image_file

KEYPOINT_COSINE = 0.60  # centred features; copies looked at scored down to 0.61
KEYPOINT_PX = 160  # longer side; SIFT doubles it internally
KEYPOINTS = 300  # strongest keypoints kept per picture
RATIO = 0.8  # Lowe's ratio test
RANSAC_PX = KEYPOINT_PX / 64  # 2.5 px
KEYPOINT_INLIERS = 10  # fruits pairs looked at with 10-14 matches and black fill: 7 of 7 copies
MAX_ZOOM = 2.0
MIN_FILL = 0.01  # share of the picture that is black fill: a rotated or shifted copy
FILL_MARGIN = 3  # px of picture next to black fill left without keypoints
MAX_PARTNERS = 2  # pictures without fill: more pairs than this and the matches are a shared print
PAIRS_AT_ONCE = 256  # pairs matched between two evictions of keypoints no longer needed
_MIRRORED_BINS = (-np.arange(8)) % 8


@dataclass
class Keypoints:
    points: np.ndarray  # (k, 2) float32 (x, y)
    descriptors: np.ndarray  # (k, 128) float32
    width: int

    def mirrored(self) -> Keypoints:
        """The keypoints of the mirror image, computed from these (rows and orientation bins reversed)."""
        points = self.points.copy()
        points[:, 0] = self.width - 1 - points[:, 0]
        cells = self.descriptors.reshape(-1, 4, 4, 8)[:, ::-1][:, :, :, _MIRRORED_BINS]
        return Keypoints(points, np.ascontiguousarray(cells.reshape(-1, 128)), self.width)


def _grey(path: Path) -> np.ndarray:
    """The picture at ``KEYPOINT_PX`` px on its longer side, its aspect kept, as uint8 grey."""
    data = read_image_file(path).data
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF turns it a quarter: decode_image applies that
            width, height = height, width
    scale = KEYPOINT_PX / max(width, height)
    size = (max(8, round(height * scale)), max(8, round(width * scale)))
    return np.clip(to_grey(decode_image(data, size)), 0, 255).astype(np.uint8)


def detect(grey: np.ndarray) -> Keypoints:
    """SIFT keypoints of a uint8 grey picture, none on black fill or within ``FILL_MARGIN`` px of it."""
    shown = ndimage.binary_erosion(picture_mask(grey.astype(np.float32)), iterations=FILL_MARGIN)
    found, descriptors = cv2.SIFT_create(nfeatures=KEYPOINTS).detectAndCompute(grey, shown.astype(np.uint8) * 255)
    points = np.float32([k.pt for k in found]).reshape(-1, 2)
    descriptors = np.zeros((0, 128), np.float32) if descriptors is None else descriptors
    return Keypoints(points, descriptors, grey.shape[1])


def agreeing_matches(a: Keypoints, b: Keypoints) -> int:
    """How many ratio-test matches of b's keypoints to a's agree on one rotation + zoom + shift."""
    if len(a.descriptors) < 2 or len(b.descriptors) < 2:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a.descriptors, b.descriptors, k=2)
    good = [m for m, second in (p for p in pairs if len(p) == 2) if m.distance < RATIO * second.distance]
    if len(good) < 3:
        return 0
    source = b.points[[m.trainIdx for m in good]]
    target = a.points[[m.queryIdx for m in good]]
    transform, inliers = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC,
                                                     ransacReprojThreshold=RANSAC_PX, maxIters=2000)
    if transform is None:
        return 0
    zoom = float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))
    return int(inliers.sum()) if 1 / MAX_ZOOM <= zoom <= MAX_ZOOM else 0


class ImageKeypoints:
    """Keypoints of ``root/paths``, detected once per image (``forget`` drops them); ``filled[row]``:
    the picture shows black fill (``MIN_FILL`` of it or more), the mark of a copy that was rotated
    or shifted."""

    def __init__(self, root: str | Path, paths: list[str], workers: int = 4):
        self.root, self.paths, self.workers = Path(root), paths, workers
        self.found: dict[int, Keypoints | None] = {}
        self.filled: dict[int, bool] = {}

    def _look(self, row: int) -> tuple[bool, Keypoints | None]:
        try:
            grey = _grey(self.root / self.paths[row])
        except (OSError, ImageDecodeError):
            return False, None
        return 1 - picture_mask(grey.astype(np.float32)).mean() >= MIN_FILL, detect(grey)

    def prepare(self, rows) -> None:
        """Look at ``rows`` not looked at yet (fill and keypoints), in threads."""
        todo = [int(r) for r in rows if int(r) not in self.found]
        if not todo:
            return
        cv2.setNumThreads(1)  # one image per thread instead
        with ThreadPoolExecutor(self.workers) as pool:  # OpenCV and Pillow release the GIL
            for row, (filled, keypoints) in zip(todo, pool.map(self._look, todo)):
                self.filled[row], self.found[row] = filled, keypoints

    def forget(self, rows) -> None:
        for row in rows:
            self.found.pop(int(row), None)

    def inliers(self, i: int, j: int) -> int:
        """Matches of j, or of its mirror, to i that agree on one rotation + zoom + shift."""
        self.prepare([i, j])
        a, b = self.found[i], self.found[j]
        if a is None or b is None:
            return 0
        return max(agreeing_matches(a, b), agreeing_matches(a, b.mirrored()))

    def share(self, i: int, j: int, inliers: int) -> float:
        """``inliers`` over the keypoints of the picture with fewer (0-1)."""
        return inliers / max(1, min(len(self.found[i].points), len(self.found[j].points)))


def visiting_plan(pairs: np.ndarray, n: int) -> list[tuple[np.ndarray, list[int]]]:
    """How ``_matched`` visits ``pairs`` (rows ``i, j`` of ``n`` images): chunks of ``PAIRS_AT_ONCE``
    pair indices in ``locality_order``, each with the images whose last pair is in it (their
    keypoints are dropped after it)."""
    order = locality_order(pairs, n)
    last_chunk = {row: k // PAIRS_AT_ONCE for k, pair in enumerate(pairs[order].tolist()) for row in pair}
    starts = range(0, len(order), PAIRS_AT_ONCE)
    dropped: list[list[int]] = [[] for _ in starts]
    for row, chunk in last_chunk.items():
        dropped[chunk].append(row)
    return [(order[start:start + PAIRS_AT_ONCE], dropped[k]) for k, start in enumerate(starts)]


def held_at_once(pairs: np.ndarray, n: int) -> int:
    """The most images whose keypoints ``_matched`` holds at one time: its memory, in images."""
    held: set[int] = set()
    peak = 0
    for chunk, dropped in visiting_plan(pairs, n):
        held.update(pairs[chunk].ravel().tolist())
        peak = max(peak, len(held))
        held.difference_update(dropped)
    return peak


def _matched(keypoints: ImageKeypoints, pairs: np.ndarray, progress=None) -> np.ndarray:
    """``(inliers, share)`` of each pair, in rows of ``pairs``, visited by ``visiting_plan`` (images
    detected and pairs matched in threads): each image is detected once and memory follows the
    order's bandwidth (``held_at_once``), not the number of images."""
    result = np.zeros((len(pairs), 2))
    seen: set[int] = set()
    for chunk, dropped in visiting_plan(pairs, len(keypoints.paths)):
        rows = np.unique(pairs[chunk])
        keypoints.prepare(rows)
        if progress:
            progress(len(set(rows.tolist()) - seen))
            seen.update(rows.tolist())
        with ThreadPoolExecutor(keypoints.workers) as pool:
            counts = list(pool.map(lambda pair: keypoints.inliers(*pair), pairs[chunk].tolist()))
        for row, (i, j), count in zip(chunk, pairs[chunk].tolist(), counts):
            result[row] = count, keypoints.share(i, j, count) if count else 0.0
        keypoints.forget(dropped)
    return result


def distinctive(pairs: np.ndarray, max_partners: int = MAX_PARTNERS) -> np.ndarray:
    """Which ``pairs`` (rows ``i, j``) join two images that each have at most ``max_partners`` pairs:
    a printed design that many pictures carry (the same box print) links them all."""
    rows, counts = np.unique(pairs, return_counts=True)
    partners = dict(zip(rows.tolist(), counts.tolist()))
    return np.array([partners[i] <= max_partners and partners[j] <= max_partners for i, j in pairs.tolist()],
                    dtype=bool).reshape(-1)


def keypoint_pairs(root: str | Path, paths: list[str], candidates: np.ndarray, threshold: int = KEYPOINT_INLIERS,
                   progress=None, keypoints: ImageKeypoints | None = None, own: np.ndarray | None = None) -> np.ndarray:
    """The candidate pairs ``(i, j, ...)`` with ``threshold`` agreeing matches or more in which one
    picture shows black fill or that are ``distinctive`` among those pairs, as ``(i, j, share)``:
    share, the agreeing matches over the keypoints of the picture with fewer (0-1).
    ``progress(k)`` counts the images looked at; ``keypoints``: one that already holds some;
    ``own``: a flag per candidate, the pairs a narrower search would have had: they are also
    judged among themselves, so that more candidates never unlink one of them."""
    keypoints = keypoints or ImageKeypoints(root, paths)
    pairs = candidates[:, :2].astype(np.int64).reshape(-1, 2)
    matched = _matched(keypoints, pairs, progress) if len(pairs) else np.zeros((0, 2))
    strong = matched[:, 0] >= threshold
    filled = np.array([keypoints.filled[i] or keypoints.filled[j] for i, j in pairs[strong].tolist()], dtype=bool)
    keep = filled | distinctive(pairs[strong])
    if own is not None:
        narrower = own[strong]
        keep[narrower] |= distinctive(pairs[strong][narrower])
    return np.column_stack([pairs[strong][keep], matched[strong][keep, 1]]).astype(np.float64).reshape(-1, 3)
