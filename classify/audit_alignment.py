"""Copies that were rotated, rescaled, shifted or mirrored, found by aligning the two images.

A copy rotated by 20-45 degrees (black corners), zoomed or cropped to 80 % scores 0.75-0.90 in
the backbone features against its original: as much as a different photo of the same kind of
fruit, so no cosine threshold separates them. Each candidate pair (features cosine >=
``CANDIDATE_COSINE``) is aligned instead, for the second image and for its mirror:

1. rotation and scale from the phase correlation of the log-polar magnitude spectra (the
   Fourier-Mellin method: a shift cannot change a magnitude spectrum, and a rotation or a zoom
   becomes a shift in log-polar coordinates), on ``COARSE_PX`` greyscale images;
2. the shift from the phase correlation of the images once rotated and scaled (the two highest
   peaks of step 1, each read as two angles 180 degrees apart, are tried, for the image and its
   mirror; the best coarse correlation wins);
3. the score: correlation of the aligned ``FINE_PX`` images' locally normalised detail (fine
   texture, spots, highlights; not the outline, which different apples on a white background
   share), over the pixels both images show (black fill from rotation or shifting is ignored).

Two images are copies when the score reaches ``ALIGNED_THRESHOLD`` (0.5). How each kind of copy
scores is measured in ``bench/audit_bench.py``; the threshold comes from looking at the fruits
candidate pairs: from 0.6 up, 16 of 16 sampled pairs were copies; between 0.3 and 0.6 the copies
were apples and oranges and the look-alikes smooth bananas (different photos of bananas scored up
to 0.65 before the outline was left out, up to 0.51 after); different photos mostly score under 0.2.
A pair whose coarse (64 px) alignment correlates under ``COARSE_FLOOR`` is rejected without the
full-size step. Candidates below ``CANDIDATE_COSINE`` were tried once on the unmodified sets (a
one-off run of ``aligned_pairs`` on the extra pairs, loaded machine): down to
0.65 (5 per image) they add 1,196 pairs to align in fruits and 875 in TrashNet (+9 and +8 CPU
seconds on a loaded machine) and link 4 and 1 more pairs, of which 3 and 0 looked like copies;
looking only around images with black fill (down to 0.55, 3 per image) added 1,849 fruits pairs
for 3 more links. Not worth it: the copies rotated by 30 degrees that the alignment misses often fail
it however similar their features (their aligned scores, median and 10th percentile, are in
``docs/bench/audit.md``); copies with black fill are checked by keypoints instead, from a features
cosine of 0.60 (``classify/audit_keypoints.py``).

Cost: each image is decoded and prepared once per run (its mirror is a view of it: a mirror only
reverses the angles of the log-polar spectrum), pairs are visited in reverse Cuthill-McKee order
so that an LRU cache of ``CACHED_VIEWS`` images holds both images of nearly every pair, and the
8 hypotheses of a pair are shifted and scored in one batch (before, the cache evicted most images
between their pairs, and each was prepared again for nearly every pair it was in). The whole
command's CPU seconds are in ``docs/bench/audit.md``.

    >>> aligned = AlignedImages(root, paths)
    >>> aligned.score(i, j)          # 0.9 for a rotated copy, about 0.2 for another photo
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from classify.audit_images import to_grey
from edge.imageio import ImageDecodeError, load_image

COARSE_PX = 64
FINE_PX = 128
ANGLE_STEPS = 180  # log-polar angle bins over 180 degrees: 1-degree resolution
POLAR_PEAKS = 2  # rotations tried per mirror: nearly symmetric objects give a second, true peak
CANDIDATE_COSINE = 0.75  # centred features; below this, copies are rare (bench/audit_bench.py)
ALIGNED_THRESHOLD = 0.5
BLACK_FILL = 20  # grey level under which border-connected pixels are fill, not picture
OUTLINE_SHARE = 0.3
COARSE_FLOOR = 0.3  # coarse correlation under which no copy was seen (bench/audit_bench.py)
MIN_OVERLAP = 0.2  # share of the image both aligned pictures must cover to be compared
CACHED_VIEWS = 1024  # prepared images kept (about 200 KB each)


@dataclass
class _View:
    """One image (or its mirror) ready for alignment; NaN marks what is not compared (fill, outline)."""

    coarse: np.ndarray  # COARSE_PX band-passed picture, NaN on fill
    spectrum: np.ndarray  # rfft2 of the log-polar magnitude spectrum
    fine: np.ndarray  # FINE_PX picture, fill replaced by the picture's mean
    fine_mask: np.ndarray  # picture, not fill, and away from the outline (outline_free)
    detail: np.ndarray  # local_detail(fine)

    def mirrored(self) -> _View:
        """The mirror image's view: a mirror reverses the log-polar angles (row -k of the spectrum's FFT)."""
        return _View(self.coarse[:, ::-1], self.spectrum[(-np.arange(ANGLE_STEPS)) % ANGLE_STEPS],
                     self.fine[:, ::-1], self.fine_mask[:, ::-1], self.detail[:, ::-1])


def picture_mask(grey: np.ndarray) -> np.ndarray:
    """True where the pixel is picture, False on black fill connected to the border."""
    labels, _ = ndimage.label(grey < BLACK_FILL)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ~np.isin(labels, border[border > 0])


def _filled(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, grey, grey[mask].mean() if mask.any() else 0.0).astype(np.float32)


def local_detail(picture: np.ndarray, fine: float = 1.0, coarse: float = 3.0) -> np.ndarray:
    """Band-pass detail divided by its local energy: texture counts as much as the outline."""
    band = ndimage.gaussian_filter(picture, fine) - ndimage.gaussian_filter(picture, coarse)
    return band / (np.sqrt(ndimage.gaussian_filter(band * band, 6.0)) + 2.0)


def outline_free(picture: np.ndarray, share: float = OUTLINE_SHARE, margin: int = 3) -> np.ndarray:
    """False within ``margin`` px of the picture's strongest edges (gradient over ``share`` of its maximum).

    Those are mostly the object's outline, which different photos of one kind of fruit share once
    aligned; copies are told apart by what lies inside it.
    """
    smooth = ndimage.gaussian_filter(picture, 2.0)
    gradient = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1))
    return ~ndimage.maximum_filter(gradient > share * gradient.max(), size=2 * margin + 1)


class _LogPolar:
    """Sampling grid of a log-polar magnitude spectrum (``size`` px images)."""

    def __init__(self, size: int, angles: int = ANGLE_STEPS):
        half = size // 2
        self.log_step = np.log((half - 1) / 2.0) / (size - 1)
        theta = np.linspace(0, np.pi, angles, endpoint=False)
        radius = 2.0 * np.exp(self.log_step * np.arange(size))
        coords = np.array([half + radius[None, :] * np.sin(theta[:, None]),
                           half + radius[None, :] * np.cos(theta[:, None])])
        corner = np.floor(coords).astype(np.int64)  # bilinear sampling as 4 gathers, computed once
        fraction = (coords - corner).astype(np.float32)
        tap = lambda axis, step: np.minimum(corner[axis] + step, size - 1)  # the outermost taps weigh 0
        self.taps = [(tap(0, dr) * size + tap(1, dc)).ravel() for dr in (0, 1) for dc in (0, 1)]
        self.weights = [((fraction[0] if dr else 1 - fraction[0]) * (fraction[1] if dc else 1 - fraction[1])).ravel()
                        for dr in (0, 1) for dc in (0, 1)]
        self.shape = (angles, size)
        hann = np.hanning(size)
        self.window = np.outer(hann, hann).astype(np.float32)
        yy, xx = np.mgrid[-half:size - half, -half:size - half]
        self.high_pass = 1 - np.cos(np.pi * np.clip(np.hypot(yy, xx) / half, 0, 1))

    def spectrum(self, picture: np.ndarray) -> np.ndarray:
        magnitude = np.abs(np.fft.fftshift(np.fft.fft2((picture - picture.mean()) * self.window))) * self.high_pass
        flat = magnitude.ravel()
        polar = np.log1p(sum(flat[taps] * weight for taps, weight in zip(self.taps, self.weights)).reshape(self.shape))
        return np.fft.rfft2(polar - polar.mean()).astype(np.complex64)


def phase_surfaces(spectrum_a: np.ndarray, spectra_b: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Phase correlation surfaces of a against each of ``spectra_b`` (rfft2s of ``shape`` arrays)."""
    cross = spectrum_a * np.conj(spectra_b)
    return np.fft.irfft2(cross / (np.abs(cross) + 1e-9), s=shape)


def _signed(index: np.ndarray, n: int) -> np.ndarray:
    return np.where(index <= n // 2, index, index - n)


def top_shifts(surfaces: np.ndarray, peaks: int = 1) -> np.ndarray:
    """``(k, peaks, 2)`` (rows, columns) shifts that move b onto a, best first, from ``(k, h, w)`` phase
    correlation surfaces: the highest ``peaks`` peaks of each (each peak's 5x5 neighbourhood skipped)."""
    surfaces = surfaces.copy() if peaks > 1 else surfaces
    k, h, w = surfaces.shape
    found = np.zeros((k, peaks, 2), np.int64)
    near = np.arange(-2, 3)
    for p in range(peaks):
        rows, cols = np.unravel_index(surfaces.reshape(k, -1).argmax(axis=1), (h, w))
        found[:, p] = np.column_stack([_signed(rows, h), _signed(cols, w)])
        if p + 1 < peaks:
            r = (rows[:, None, None] + near[None, :, None]) % h
            c = (cols[:, None, None] + near[None, None, :]) % w
            surfaces[np.arange(k)[:, None, None], r, c] = -np.inf
    return found


def rotate_scale(picture: np.ndarray, degrees: float, scale: float) -> np.ndarray:
    """``picture`` rotated by ``degrees`` and zoomed by ``scale`` about its centre (NaN outside; a
    NaN pixel spreads to its bilinear neighbours, so NaN-marked masks travel with the picture)."""
    t = np.deg2rad(degrees)
    (r_r, r_c), (c_r, c_c) = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) / scale
    centre_r, centre_c = picture.shape[0] / 2.0, picture.shape[1] / 2.0
    offset_r = centre_r - r_r * centre_r - r_c * centre_c
    offset_c = centre_c - c_r * centre_r - c_c * centre_c
    image = Image.fromarray(np.asarray(picture, np.float32))  # mode F; Pillow's C resampler: ~10x scipy's
    warped = image.transform(image.size, Image.Transform.AFFINE, (c_c, c_r, offset_c, r_c, r_r, offset_r),
                             resample=Image.Resampling.BILINEAR, fillcolor=float("nan"))
    return np.asarray(warped, np.float32)


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of a (``(h, w)``) with each of ``b`` (``(k, h, w)``) over the pixels where
    neither is NaN; -1 where they share under ``MIN_OVERLAP`` of the image or one is flat there.
    Every sum is one matrix-vector product over the k pictures."""
    shown_a = ~np.isnan(a).ravel()
    a0, shown_a = np.where(shown_a, a.ravel(), 0).astype(np.float32), shown_a.astype(np.float32)
    b = b.reshape(len(b), -1)
    shown_b = ~np.isnan(b)
    b0, shown_b = np.where(shown_b, b, 0).astype(np.float32), shown_b.astype(np.float32)
    n = (shown_b @ shown_a).astype(np.float64)
    sum_a, sum_b = (shown_b @ a0).astype(np.float64), (b0 @ shown_a).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cov = (b0 @ a0) - sum_a * sum_b / n
        var = ((shown_b @ (a0 * a0)) - sum_a**2 / n) * (((b0 * b0) @ shown_a) - sum_b**2 / n)
        score = cov / np.sqrt(var)
    return np.where((n >= MIN_OVERLAP * a.size) & (var > 0), score, -1.0)


def _rolled(pictures: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Each picture ``(k, h, w)`` rolled by its own ``(rows, columns)`` shift."""
    k, h, w = pictures.shape
    rows = (np.arange(h)[None, :] - shifts[:, :1]) % h
    cols = (np.arange(w)[None, :] - shifts[:, 1:]) % w
    return pictures[np.arange(k)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _zero_nan(pictures: np.ndarray) -> np.ndarray:
    return np.nan_to_num(pictures, nan=0.0)


def _prepare_view(grey: np.ndarray, polar: _LogPolar) -> _View:
    shown = picture_mask(grey)
    fine = _filled(grey, shown)
    coarse = fine.reshape(COARSE_PX, 2, COARSE_PX, 2).mean(axis=(1, 3))
    coarse_mask = shown.reshape(COARSE_PX, 2, COARSE_PX, 2).all(axis=(1, 3))
    band = coarse - ndimage.gaussian_filter(coarse, 4.0)
    fine_mask = ndimage.minimum_filter(shown, size=7) & outline_free(fine)
    return _View(np.where(coarse_mask, band, np.nan).astype(np.float32), polar.spectrum(coarse),
                 fine, fine_mask, local_detail(fine))


def _rotations(a: _View, b_views: tuple[_View, _View], log_step: float) -> list[tuple[int, float, float]]:
    """``(mirrored, degrees, scale)``: the ``POLAR_PEAKS`` best rotations and scales of b and of its mirror."""
    surfaces = phase_surfaces(a.spectrum, np.stack([b.spectrum for b in b_views]), (ANGLE_STEPS, COARSE_PX))
    peaks = top_shifts(surfaces, POLAR_PEAKS)
    return [(mirrored, angle_bins * 180.0 / ANGLE_STEPS, float(np.exp(-log_radius * log_step)))
            for mirrored in range(len(b_views)) for angle_bins, log_radius in peaks[mirrored].tolist()]


@dataclass
class Alignment:
    score: float  # coarse correlation
    mirrored: int
    degrees: float
    scale: float
    shift: tuple[int, int]  # (rows, columns) at COARSE_PX, after the rotation and zoom


def coarse_alignment(a: _View, b_views: tuple[_View, _View], log_step: float) -> Alignment:
    """The rotation, zoom, shift and mirror that best lay b on a. A magnitude spectrum cannot tell
    a rotation from the same plus a half turn: each rotation is tried both ways (the half turn is a
    flip of the warped picture), and every hypothesis is shifted and scored at once."""
    rotations = _rotations(a, b_views, log_step)
    warped = np.stack([rotate_scale(b_views[m].coarse, degrees, scale) for m, degrees, scale in rotations])
    warped = np.concatenate([warped, warped[:, ::-1, ::-1]])
    surfaces = phase_surfaces(np.fft.rfft2(_zero_nan(a.coarse)), np.fft.rfft2(_zero_nan(warped)), a.coarse.shape)
    shifts = top_shifts(surfaces)[:, 0]
    scores = correlations(a.coarse, _rolled(warped, shifts))
    best = int(np.argmax(scores))
    mirrored, degrees, scale = rotations[best % len(rotations)]
    return Alignment(float(scores[best]), mirrored, degrees + 180.0 * (best >= len(rotations)), scale,
                     tuple(shifts[best].tolist()))


def _nudged(picture: np.ndarray) -> np.ndarray:
    """``(9, h, w)``: the picture moved by each of -1, 0, +1 px in rows and columns (NaN enters)."""
    h, w = picture.shape
    padded = np.pad(picture, 1, constant_values=np.nan)
    return np.lib.stride_tricks.sliding_window_view(padded, (h, w)).reshape(9, h, w)


def fine_score(a: _View, b: _View, alignment: Alignment) -> float:
    """Correlation of the aligned pictures' local detail (the shift found again at full size, +-1 px)."""
    picture = rotate_scale(b.fine, alignment.degrees, alignment.scale)
    shown = rotate_scale(b.fine_mask, alignment.degrees, alignment.scale) > 0.5
    detail_b = local_detail(_zero_nan(picture))
    spectra = np.fft.rfft2(np.stack([a.detail, detail_b]))
    shift = tuple(top_shifts(phase_surfaces(spectra[0], spectra[1:], a.detail.shape))[0, 0].tolist())
    moved = np.roll(np.where(shown, detail_b, np.nan), shift, (0, 1))
    return float(correlations(np.where(a.fine_mask, a.detail, np.nan), _nudged(moved)).max())


class AlignedImages:
    """Aligns pairs of images from ``root/paths``; each image is read and prepared when needed and
    the last ``cached`` kept; ``prepared`` counts the preparations."""

    def __init__(self, root: str | Path, paths: list[str], cached: int = CACHED_VIEWS):
        self.root, self.paths = Path(root), paths
        self.polar = _LogPolar(COARSE_PX)
        self.prepared = 0
        self.views = lru_cache(maxsize=cached)(self._prepare)

    def _prepare(self, row: int) -> _View | None:
        self.prepared += 1
        try:
            rgb = load_image(self.root / self.paths[row], (FINE_PX, FINE_PX))
        except (OSError, ImageDecodeError):
            return None
        return _prepare_view(to_grey(rgb), self.polar)

    def score(self, i: int, j: int) -> float:
        """How well j (or its mirror), rotated, scaled and shifted, reproduces i's detail (-1..1)."""
        a, b = self.views(i), self.views(j)
        if a is None or b is None:
            return -1.0
        b_views = (b, b.mirrored())
        coarse = coarse_alignment(a, b_views, self.polar.log_step)
        if coarse.score < COARSE_FLOOR:  # not even the outlines match: not worth the full-size comparison
            return coarse.score
        return fine_score(a, b_views[coarse.mirrored], coarse)


def locality_order(pairs: np.ndarray, n: int) -> np.ndarray:
    """An order of ``pairs`` (rows ``i, j``) in which both images of a pair were mostly seen recently:
    images renumbered by reverse Cuthill-McKee (neighbours in the pair graph get nearby numbers),
    pairs sorted by their later image's number, so an LRU cache a little wider than the graph's
    bandwidth prepares each image about once."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    i, j = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)).tocsr()
    position = np.empty(n, np.int64)
    position[reverse_cuthill_mckee(graph, symmetric_mode=False)] = np.arange(n)
    return np.lexsort((np.minimum(position[i], position[j]), np.maximum(position[i], position[j])))


def aligned_pairs(root: str | Path, paths: list[str], candidates: np.ndarray, threshold: float = ALIGNED_THRESHOLD,
                  progress=None) -> np.ndarray:
    """The candidate pairs ``(i, j, ...)`` whose alignment score reaches ``threshold``, as ``(i, j, score)``."""
    aligned = AlignedImages(root, paths)
    found = []
    pairs = candidates[:, :2].astype(np.int64)
    for i, j in pairs[locality_order(pairs, len(paths))] if len(pairs) else []:
        score = aligned.score(int(i), int(j))
        if score >= threshold:
            found.append((i, j, score))
        if progress:
            progress(1)
    return np.asarray(found, dtype=np.float64).reshape(-1, 3)
