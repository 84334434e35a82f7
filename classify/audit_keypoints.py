"""Copies rotated or shifted with black fill, confirmed by keypoints that agree on one rotation, zoom and shift.

Where the fruits set's missed copies were lost (EfficientNet-Lite0, candidate pairs 0.60-0.90
that the other rules left apart, looked at as the two pictures and the second warped onto the
first): 87 pairs had 10+ agreeing matches; 36 of them had a features cosine from 0.75, so the
log-polar alignment (``classify/audit_alignment.py``) had tried them and failed (its score is
under 0.3 for most of the 87: black corners, a crop or a 30-degree turn change the spectrum it
reads the rotation from), and 51 scored 0.60-0.75, under its candidate cosine.

Each candidate pair (features cosine from ``KEYPOINT_COSINE``, among the ``CANDIDATES_PER_IMAGE``
most similar of either image, not already linked by other evidence) in which one picture shows
black fill (``MIN_FILL`` of it or more: the mark of a rotated or shifted copy):

1. SIFT keypoints (OpenCV) of each picture at ``KEYPOINT_PX`` px, away from black fill (the
   corners of a rotated copy's fill are strong keypoints that any two rotated pictures share);
2. matched with Lowe's ratio test (nearest descriptor clearly nearer than the second), to the
   second picture and to its mirror: a mirror reverses the rows and the orientation bins of a
   SIFT descriptor, so the mirror's keypoints cost no second detection;
3. a rotation + zoom + shift fitted by RANSAC; the pair is a copy when ``KEYPOINT_INLIERS``
   matches agree on it within ``RANSAC_PX`` px and the zoom is within ``MAX_ZOOM``.

Looked at by eye, 40 of the 69 fruits pairs this rule links (28 from samples of 12 pairs each with
10-14, 15-19 and 20+ agreeing matches, 12 more at random): 39 were the same photo (2 of them with
a leaf added or removed), 1 the same bananas rearranged. Why the black fill: without it the rule
also links different photos that share a printed surface. In TrashNet (no black fill: the rule
adds nothing there), 30 pairs with 10+ matches were looked at: 14 were the same object
photographed again, most of the rest different cardboard boxes with the same print.

What it misses: copies without black fill (zoomed in, mirrored or turned only: the pixel,
features and alignment rules catch most of those), pictures with too little texture for 10
keypoints at 160 px (smooth yellow bananas, plain plastic), copies zoomed more than
``MAX_ZOOM``, and pairs under ``KEYPOINT_COSINE`` in the features (recoloured or heavily cropped
copies).

Cost: each candidate image is decoded once at 160 px to see whether it shows fill; SIFT runs on
the images of the pairs that do (about 5 ms each), in threads; a pair costs two descriptor
matchings. The whole command's CPU seconds are in ``docs/bench/audit.md``.

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

from classify.audit_alignment import picture_mask
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
    """Keypoints of ``root/paths``, detected once per image; ``filled[row]``: the picture shows black
    fill (``MIN_FILL`` of it or more), the mark of a copy that was rotated or shifted."""

    def __init__(self, root: str | Path, paths: list[str], workers: int = 4):
        self.root, self.paths, self.workers = Path(root), paths, workers
        self.found: dict[int, Keypoints | None] = {}
        self.filled: dict[int, bool] = {}

    def _look(self, row: int, detect_always: bool) -> tuple[bool, Keypoints | None]:
        try:
            grey = _grey(self.root / self.paths[row])
        except (OSError, ImageDecodeError):
            return False, None
        filled = 1 - picture_mask(grey.astype(np.float32)).mean() >= MIN_FILL
        return filled, detect(grey) if filled or detect_always else None

    def prepare(self, rows, detect_all: bool = True, progress=None) -> None:
        """Look at ``rows`` (fill, and keypoints where ``detect_all`` or the picture shows fill)."""
        todo = [int(r) for r in rows if int(r) not in self.found and (detect_all or int(r) not in self.filled)]
        cv2.setNumThreads(1)  # one image per thread instead
        with ThreadPoolExecutor(self.workers) as pool:  # OpenCV and Pillow release the GIL
            for row, (filled, keypoints) in zip(todo, pool.map(lambda r: self._look(r, detect_all), todo)):
                self.filled[row] = filled
                if keypoints is not None or detect_all:
                    self.found[row] = keypoints
                if progress:
                    progress(1)

    def inliers(self, i: int, j: int) -> int:
        """Matches of j, or of its mirror, to i that agree on one rotation + zoom + shift."""
        self.prepare([i, j])
        a, b = self.found[i], self.found[j]
        if a is None or b is None:
            return 0
        return max(agreeing_matches(a, b), agreeing_matches(a, b.mirrored()))


def keypoint_pairs(root: str | Path, paths: list[str], candidates: np.ndarray, threshold: int = KEYPOINT_INLIERS,
                   progress=None) -> np.ndarray:
    """The candidate pairs ``(i, j, ...)`` in which one picture shows black fill and ``threshold``
    matches or more agree, as ``(i, j, share)``: share, the agreeing matches over the keypoints of
    the picture with fewer (0-1). ``progress(k)`` counts the images looked at."""
    keypoints = ImageKeypoints(root, paths)
    pairs = candidates[:, :2].astype(np.int64)
    keypoints.prepare(np.unique(pairs), detect_all=False, progress=progress)
    pairs = pairs[[keypoints.filled[i] or keypoints.filled[j] for i, j in pairs.tolist()]]
    keypoints.prepare(np.unique(pairs))
    found = []
    for i, j in pairs.tolist():
        inliers = keypoints.inliers(i, j)
        if inliers >= threshold:
            fewer = min(len(keypoints.found[i].points), len(keypoints.found[j].points))
            found.append((i, j, inliers / fewer))
    return np.asarray(found, dtype=np.float64).reshape(-1, 3)
