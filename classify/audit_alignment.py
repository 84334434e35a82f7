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
full-size step. Cost: 12-15 ms per candidate pair and 25-30 ms per image prepared, measured on a
loaded 2-core machine.

    >>> aligned = AlignedImages(root, paths)
    >>> aligned.score(i, j)          # 0.9 for a rotated copy, about 0.2 for another photo
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

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


@dataclass
class _View:
    """One image (or its mirror) ready for alignment."""

    coarse: np.ndarray  # COARSE_PX band-passed picture
    coarse_mask: np.ndarray
    spectrum: np.ndarray  # FFT of the log-polar magnitude spectrum
    fine: np.ndarray  # FINE_PX picture, fill replaced by the picture's mean
    fine_mask: np.ndarray  # picture, not fill, and away from the outline (outline_free)
    detail: np.ndarray  # local_detail(fine)


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
        self.coords = np.array([half + radius[None, :] * np.sin(theta[:, None]),
                                half + radius[None, :] * np.cos(theta[:, None])])
        hann = np.hanning(size)
        self.window = np.outer(hann, hann).astype(np.float32)
        yy, xx = np.mgrid[-half:size - half, -half:size - half]
        self.high_pass = 1 - np.cos(np.pi * np.clip(np.hypot(yy, xx) / half, 0, 1))

    def spectrum(self, picture: np.ndarray) -> np.ndarray:
        magnitude = np.abs(np.fft.fftshift(np.fft.fft2((picture - picture.mean()) * self.window))) * self.high_pass
        polar = np.log1p(ndimage.map_coordinates(magnitude, self.coords, order=1))
        return np.fft.fft2(polar - polar.mean()).astype(np.complex64)


def phase_shifts(spectrum_a: np.ndarray, spectrum_b: np.ndarray, peaks: int = 1) -> list[tuple[int, int]]:
    """The (rows, columns) shifts that move b onto a, best first, from two FFTs of the same shape:
    the highest ``peaks`` peaks of the phase correlation (each peak's 5x5 neighbourhood skipped)."""
    cross = spectrum_a * np.conj(spectrum_b)
    surface = np.real(np.fft.ifft2(cross / (np.abs(cross) + 1e-9)))
    shifts = []
    for _ in range(peaks):
        peak = np.unravel_index(int(np.argmax(surface)), surface.shape)
        shifts.append(tuple(int(p if p <= n // 2 else p - n) for p, n in zip(peak, surface.shape)))
        rows, cols = ((np.arange(-2, 3) + p) % n for p, n in zip(peak, surface.shape))
        surface[np.ix_(rows, cols)] = -np.inf
    return shifts


def rotate_scale(picture: np.ndarray, degrees: float, scale: float) -> np.ndarray:
    """``picture`` rotated by ``degrees`` and zoomed by ``scale`` about its centre (0 outside)."""
    t = np.deg2rad(degrees)
    (r_r, r_c), (c_r, c_c) = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) / scale
    centre_r, centre_c = picture.shape[0] / 2.0, picture.shape[1] / 2.0
    offset_r = centre_r - r_r * centre_r - r_c * centre_c
    offset_c = centre_c - c_r * centre_r - c_c * centre_c
    image = Image.fromarray(np.asarray(picture, np.float32))  # mode F; Pillow's C resampler: ~10x scipy's
    warped = image.transform(image.size, Image.Transform.AFFINE, (c_c, c_r, offset_c, r_c, r_r, offset_r),
                             resample=Image.Resampling.BILINEAR)
    return np.asarray(warped, np.float32)


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of a and b over ``mask`` (-1 when they share too little)."""
    if mask.sum() < MIN_OVERLAP * mask.size:
        return -1.0
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else -1.0


def _views(grey: np.ndarray, polar: _LogPolar) -> tuple[_View, _View]:
    """The picture and its mirror, each prepared once for every pair it is in (the mirror's arrays are views)."""
    shown = picture_mask(grey)
    fine = _filled(grey, shown)
    coarse = fine.reshape(COARSE_PX, 2, COARSE_PX, 2).mean(axis=(1, 3))
    coarse_mask = shown.reshape(COARSE_PX, 2, COARSE_PX, 2).all(axis=(1, 3))
    band = coarse - ndimage.gaussian_filter(coarse, 4.0)
    fine_mask = ndimage.minimum_filter(shown, size=7) & outline_free(fine)
    view = _View(band, coarse_mask, polar.spectrum(coarse), fine, fine_mask, local_detail(fine))
    mirror = _View(band[:, ::-1], coarse_mask[:, ::-1], polar.spectrum(coarse[:, ::-1]),
                   fine[:, ::-1], fine_mask[:, ::-1], view.detail[:, ::-1])
    return view, mirror


def _warp(view_picture: np.ndarray, mask: np.ndarray, degrees: float, scale: float, shift=(0, 0)):
    picture = np.roll(rotate_scale(view_picture, degrees, scale), shift, (0, 1))
    shown = np.roll(rotate_scale(mask.astype(np.float32), degrees, scale) > 0.5, shift, (0, 1))
    return picture, shown


def coarse_alignment(a: _View, b_views: tuple[_View, _View], log_step: float) -> tuple[float, int, float, float]:
    """``(correlation, mirrored, degrees, scale)`` that best lays b (or its mirror) on a."""
    best = (-2.0, 0, 0.0, 1.0)
    reference = np.fft.fft2(a.coarse)
    for mirrored, b in enumerate(b_views):
        for (angle_bins, log_radius), half_turn in product(phase_shifts(a.spectrum, b.spectrum, POLAR_PEAKS), (0, 180)):
            degrees, scale = angle_bins * 180.0 / ANGLE_STEPS + half_turn, float(np.exp(-log_radius * log_step))
            picture, shown = _warp(b.coarse, b.coarse_mask, degrees, scale)
            shift = phase_shifts(reference, np.fft.fft2(picture))[0]
            score = correlation(a.coarse, np.roll(picture, shift, (0, 1)),
                                a.coarse_mask & np.roll(shown, shift, (0, 1)))
            best = max(best, (score, mirrored, degrees, scale))
    return best


def fine_score(a: _View, b: _View, degrees: float, scale: float) -> float:
    """Correlation of the aligned pictures' local detail (the shift found again at full size, +-1 px)."""
    picture, shown = _warp(b.fine, b.fine_mask, degrees, scale)
    detail_b = local_detail(picture)
    dy, dx = phase_shifts(np.fft.fft2(a.detail), np.fft.fft2(detail_b))[0]
    return max(correlation(a.detail, np.roll(detail_b, (dy + y, dx + x), (0, 1)),
                           a.fine_mask & np.roll(shown, (dy + y, dx + x), (0, 1)))
               for y in (-1, 0, 1) for x in (-1, 0, 1))


class AlignedImages:
    """Aligns pairs of images from ``root/paths``; each image is read and prepared when needed and
    the last ``cached`` kept (about 300 KB each)."""

    def __init__(self, root: str | Path, paths: list[str], cached: int = 256):
        self.root, self.paths = Path(root), paths
        self.polar = _LogPolar(COARSE_PX)
        self.views = lru_cache(maxsize=cached)(self._prepare)

    def _prepare(self, row: int) -> tuple[_View, _View] | None:
        try:
            rgb = load_image(self.root / self.paths[row], (FINE_PX, FINE_PX)).astype(np.float32)
        except (OSError, ImageDecodeError):
            return None
        return _views(rgb @ np.array([0.299, 0.587, 0.114], np.float32), self.polar)

    def score(self, i: int, j: int) -> float:
        """How well j (or its mirror), rotated, scaled and shifted, reproduces i's detail (-1..1)."""
        a, b = self.views(i), self.views(j)
        if a is None or b is None:
            return -1.0
        coarse, mirrored, degrees, scale = coarse_alignment(a[0], b, self.polar.log_step)
        if coarse < COARSE_FLOOR:  # not even the outlines match: not worth the full-size comparison
            return coarse
        return fine_score(a[0], b[mirrored], degrees, scale)


def aligned_pairs(root: str | Path, paths: list[str], candidates: np.ndarray, threshold: float = ALIGNED_THRESHOLD,
                  progress=None) -> np.ndarray:
    """The candidate pairs ``(i, j, ...)`` whose alignment score reaches ``threshold``, as ``(i, j, score)``."""
    aligned = AlignedImages(root, paths)
    found = []
    pairs = candidates[:, :2].astype(np.int64)
    for i, j in pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]:  # by first image: its views stay cached
        score = aligned.score(int(i), int(j))
        if score >= threshold:
            found.append((i, j, score))
        if progress:
            progress(1)
    return np.asarray(found, dtype=np.float64).reshape(-1, 3)
