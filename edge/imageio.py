"""Image decoding shared by extraction, prediction and the edge runner.

One function turns any image file into the uint8 RGB array a model expects, so the training side
and the edge side cannot disagree on how a photo is read. It only needs Pillow and numpy: the edge
runner imports it without TensorFlow.

Decisions, made once:
- EXIF orientation is applied (phone photos are otherwise rotated).
- Every mode becomes RGB: transparency is composited over a white background, 16-bit and float
  greyscale are scaled to 8 bits, CMYK/YCbCr/palette go through Pillow's converters.
- JPEGs are decoded with ``draft`` at the smallest libjpeg scale that is still >= the target size.
- The resize is a plain bilinear resize to (height, width), without cropping, like Keras
  ``image_dataset_from_directory``.
- Images over ``MAX_PIXELS`` are refused (decompression bombs).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

MAX_PIXELS = 89_478_485  # Pillow's default bomb threshold, made explicit and enforced as an error
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
TRANSPARENCY_BACKGROUND = (255, 255, 255)
COLOR = "RGB"  # channel order of every decoded array
RESIZE = "bilinear"  # the resize policy, named in backbone records and ONNX metadata

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(Exception):
    """The file is not an image Pillow can decode completely; the message says why."""


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB deliberately (see module docstring)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENCY_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Decode ``path`` into a ``(height, width, 3)`` uint8 RGB array.

    Raises ImageDecodeError with a short reason for anything that is not a complete, sane image.
    """
    height, width = int(size[0]), int(size[1])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageDecodeError(
                        f"image is {img.width}x{img.height} pixels, over the {MAX_PIXELS} limit"
                    )
                if img.format == "JPEG":
                    img.draft("RGB", (width, height))
                img.load()
                img = ImageOps.exif_transpose(img) or img
                img = to_rgb(img)
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling[RESIZE.upper()])
                return np.asarray(img, dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...)
        if Path(path).exists() and Path(path).stat().st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)") from None
        reason = str(exc).strip() or type(exc).__name__
        raise ImageDecodeError(f"cannot decode image: {reason}") from None
