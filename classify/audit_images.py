"""What the audit reads from the image files themselves: content hashes and pixel signatures.

Each file is read once: its bytes are hashed (exact copies) and decoded from the same bytes into a
``SIGNATURE_SIZE`` x ``SIGNATURE_SIZE`` greyscale thumbnail (near-exact copies: resized,
re-encoded, slightly cropped), whose 7 other dihedral variants are kept too (copies mirrored,
turned by 90 or 180 degrees, or transposed). Signatures are centred and unit-length, so comparing
two is one dot product.

    >>> pixels = read_images(root, paths)
    >>> pixels.signatures.shape, pixels.variants.shape   # (n, 256), (7, n, 256)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.imageio import ImageDecodeError, decode_image, read_image_file

SIGNATURE_SIZE = 16


@dataclass
class ImageSignatures:
    root: Path
    paths: list[str]
    sha256: list[str | None]  # None where the file could not be read
    signatures: np.ndarray  # (n, SIGNATURE_SIZE**2) float32, zero rows for unreadable files
    variants: np.ndarray  # (7, n, SIGNATURE_SIZE**2): the mirror, the 3 turns, the transposes
    unreadable: list[str]


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = vector - vector.mean()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-6 else np.zeros_like(vector)


def dihedral_variants(square: np.ndarray) -> list[np.ndarray]:
    """The 7 other images of the square's dihedral group: mirrored, turned by 90/180/270, transposed."""
    mirror = square[:, ::-1]
    return [mirror, *(np.rot90(square, k) for k in (1, 2, 3)), *(np.rot90(mirror, k) for k in (1, 2, 3))]


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601 weights) of an (..., 3) RGB array, as float32: the grey every audit rule compares."""
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _one(path: Path) -> tuple[str, np.ndarray, list[np.ndarray]] | None:
    try:
        content = read_image_file(path)
        rgb = decode_image(content.data, (SIGNATURE_SIZE, SIGNATURE_SIZE))
    except (OSError, ImageDecodeError):
        return None
    grey = to_grey(rgb)
    return content.sha256, _unit(grey.ravel()), [_unit(v.ravel()) for v in dihedral_variants(grey)]


def read_images(root: str | Path, paths: list[str], workers: int = 4, progress=None) -> ImageSignatures:
    """Hash and sign every ``root/path``; ``progress(k)`` is called as files are done."""
    root = Path(root)
    dim = SIGNATURE_SIZE * SIGNATURE_SIZE
    signatures = np.zeros((len(paths), dim), np.float32)
    variants = np.zeros((7, len(paths), dim), np.float32)
    hashes: list[str | None] = [None] * len(paths)
    unreadable = []
    with ThreadPoolExecutor(workers) as pool:
        for i, result in enumerate(pool.map(_one, (root / p for p in paths))):
            if result is None:
                unreadable.append(paths[i])
            else:
                hashes[i], signatures[i], variants[:, i] = result
            if progress:
                progress(1)
    return ImageSignatures(root, list(paths), hashes, signatures, variants, unreadable)


def images_reachable(root: str | Path | None, paths: list[str]) -> bool:
    """True when the folder the store was extracted from is still there (its first image is)."""
    return bool(root) and bool(paths) and (Path(root) / paths[0]).is_file()
