"""Reading and decoding image files, shared by extraction, prediction and the edge runner.

One module turns any image file into the uint8 RGB array a model expects, so the training side
and the edge side cannot disagree on how a photo is read or which files are images. It only
needs Pillow and numpy: the edge runner imports it without TensorFlow (and imports nothing else).

Building blocks (use these, do not re-implement them):
- ``read_image_file(path) -> FileBytes``: opens only regular files (after following symlinks),
  never blocks on a FIFO or reads a device, reads the bytes once; hash (``.sha256``) and decode
  (``decode_image(data, size)``) those same bytes. Anything unreadable raises ``ImageDecodeError``
  with a short reason; a file that changed while it was read raises ``FileChangedError``.
- ``load_image(path, size)``: the two above in one call, for callers that do not need the hash.
- ``IMAGE_EXTENSIONS`` / ``is_image_name``: the one list of accepted formats (whatever this Pillow
  decodes), for training and serving alike.
- ``printable(text)``: control characters and undecodable file-name bytes escaped, for every
  human-readable line (a newline in a name or a model id cannot forge a log line).
- ``strict_json(obj)``: JSON that strict parsers accept (no NaN/Infinity) and that encodes to valid
  UTF-8 even for surrogate-escaped file names (they become ``\\udcXX`` escapes that read back to the
  same Python string).

Decoding decisions, made once:
- EXIF orientation is applied (phone photos are otherwise rotated).
- Every mode becomes RGB: transparency is composited over a white background; 16-bit greyscale
  is scaled from 0..65535; float greyscale is scaled by the range its values fit in (0..1,
  0..255, 0..65535, else its own min..max) and refused if it holds NaN or infinity;
  CMYK/YCbCr/palette go through Pillow's converters.
- An image whose file is too short for the size its header promises (a forged or truncated
  header the decoder would fill with grey) is refused, never classified.
- JPEGs are decoded with ``draft`` at the smallest libjpeg scale that is still >= the target size.
- The resize is a plain bilinear resize to (height, width), without cropping, like Keras
  ``image_dataset_from_directory``.
- Images over ``MAX_PIXELS`` pixels or files over ``MAX_FILE_BYTES`` bytes are refused.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import stat
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

MAX_PIXELS = 89_478_485  # Pillow's default bomb threshold, made explicit and enforced as an error
MAX_FILE_BYTES = 512 * 1024 * 1024  # read whole into memory: refuse anything larger up front
TRANSPARENCY_BACKGROUND = (255, 255, 255)
COLOR = "RGB"  # channel order of every decoded array
RESIZE = "bilinear"  # the resize policy, named in backbone records and ONNX metadata

ImageFile.LOAD_TRUNCATED_IMAGES = False


# ------------------------------------------------------------------------------ accepted formats

# Pillow registers these but cannot decode pixels from them here (stubs needing an external
# handler, a video format it only identifies, PostScript needing Ghostscript).
_NOT_DECODABLE = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS"})


def _decodable_extensions() -> frozenset[str]:
    Image.init()
    return frozenset(
        ext.lower() for ext, fmt in Image.registered_extensions().items()
        if fmt in Image.OPEN and fmt not in _NOT_DECODABLE
    )


IMAGE_EXTENSIONS = _decodable_extensions()  # .jpg .png .webp .avif .tif .bmp .gif .heic (with a plugin) ...


def is_image_name(name: str) -> bool:
    """True when the name ends with an extension of a format this Pillow decodes."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


# ------------------------------------------------------------------------------ errors and text


class ImageDecodeError(Exception):
    """The file is not an image that can be read and decoded completely; the message says why."""


class FileChangedError(ImageDecodeError):
    """The file changed while it was being read: its bytes are not one version of it."""


_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` safe for one human-readable line: control characters (newline, tab, escape...),
    line/paragraph separators and bidi overrides become ``\\xNN``/``\\uNNNN``, and an undecodable
    byte of a non-UTF-8 file name (a lone surrogate from ``os.fsdecode``) becomes ``\\xNN``."""
    return _UNSAFE.sub(_escape, str(text))


_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_surrogates(text: str) -> str:
    """Each lone surrogate (an undecodable byte of a non-UTF-8 name, from ``os.fsdecode``) as the six
    characters ``\\udcXX``, the JSON escape ``json.loads`` reads back to it: the text encodes to UTF-8."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes NaN/Infinity (ValueError instead) and whose text encodes to
    valid UTF-8: lone surrogates (non-UTF-8 file names) become ``\\udcXX`` escapes, which Python's
    ``json.loads`` reads back to the same surrogate-escaped string (so ``os.fsencode`` gives the
    original bytes)."""
    return escape_surrogates(json.dumps(obj, ensure_ascii=False, allow_nan=False, **kwargs))


# ------------------------------------------------------------------------------ reading files once


@dataclass(frozen=True)
class FileBytes:
    """The whole content of a file as read once, with the identity it had while read (``same_file``
    tells whether a path still holds exactly this version)."""

    data: bytes
    size: int
    mtime_ns: int
    device: int = 0
    inode: int = 0

    def same_file(self, path: str | Path) -> bool:
        """True when ``path`` (not followed if a symlink) is still this inode with this size and mtime."""
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (self.device, self.inode, self.size,
                                                                       self.mtime_ns)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink, not followed"))


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    return f"not a regular file ({kind})"


def _open_failure(path: str | Path, exc: OSError, dir_fd: int | None = None) -> str:
    if exc.errno == errno.ENOENT:
        linked = dir_fd is None and os.path.islink(path)
        return "dangling symlink (its target does not exist)" if linked else "file not found"
    if exc.errno == errno.ELOOP:
        return "symlink loop" if dir_fd is None else _not_regular(stat.S_IFLNK)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EISDIR:
        return _not_regular(stat.S_IFDIR)
    return f"cannot open file: {exc.strerror or exc}"


def stat_regular_file(path: str | Path, dir_fd: int | None = None) -> os.stat_result:
    """``os.stat`` (links followed; with ``dir_fd``, of the name ``path`` in that folder, not followed)
    of a regular file, else ImageDecodeError with the reason.

    Cheap (reads nothing): callers that may reuse a hash computed earlier check size and mtime
    with it, and call ``read_image_file`` only when they need the bytes."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=dir_fd is None)
    except OSError as exc:
        raise ImageDecodeError(_open_failure(path, exc, dir_fd)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(_not_regular(st.st_mode))
    return st


def _read_all(fd: int, expected: int) -> bytes:
    """Up to ``expected + 1`` bytes: one byte more than expected means the file grew meanwhile."""
    chunks, total = [], 0
    while total <= expected:
        chunk = os.read(fd, min(expected + 1 - total, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_image_file(path: str | Path, dir_fd: int | None = None) -> FileBytes:
    """Read a regular file whole, once, without ever blocking or reading a device.

    Symlinks are followed; a FIFO, device, socket, directory, dangling link, link loop, unreadable
    or oversized file raises ImageDecodeError with a short reason. The file is opened
    non-blocking (a FIFO swapped in after the check cannot hang the open) and checked again on the
    open descriptor. A file whose size or mtime changed while it was read raises FileChangedError.
    With ``dir_fd`` (the edge runner, see ``edge/files.folder_inside``), ``path`` is a name in that
    folder and a symlink there is refused, not followed (O_NOFOLLOW), even one swapped in after a check.
    """
    stat_regular_file(path, dir_fd)  # refuse devices and FIFOs before opening them at all
    no_follow = 0 if dir_fd is None else os.O_NOFOLLOW
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | no_follow, dir_fd=dir_fd)
    except OSError as exc:
        raise ImageDecodeError(_open_failure(path, exc, dir_fd)) from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise ImageDecodeError(_not_regular(before.st_mode))
        if before.st_size > MAX_FILE_BYTES:
            raise ImageDecodeError(f"file is {before.st_size} bytes, over the {MAX_FILE_BYTES} limit")
        try:
            data = _read_all(fd, before.st_size)
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if len(data) != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise FileChangedError("file changed while it was being read")
    return FileBytes(data, before.st_size, before.st_mtime_ns, before.st_dev, before.st_ino)


# ------------------------------------------------------------------------------ decoding


def _float_to_l(arr: np.ndarray) -> Image.Image:
    """Float greyscale -> 8 bits, scaled by the range the values fit in (see module docstring)."""
    if not np.isfinite(arr).all():
        raise ImageDecodeError("image has NaN or infinite pixel values")
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo >= 0:
        top = next((t for t in (1.0, 255.0, 65535.0) if hi <= t), hi)
        scaled = arr / top
    else:
        scaled = (arr - lo) / (hi - lo)
    return Image.fromarray(np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB deliberately (see module docstring)."""
    if img.mode == "RGB":
        return img
    if img.mode == "F":
        return _float_to_l(np.asarray(img, dtype=np.float64)).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
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


_ARITHMETIC_SOF = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_ANY_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The SOF marker code of a JPEG (walking the header segments up to the first scan)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _ANY_SOF:
            return marker
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _check_complete(img: Image.Image, data: bytes) -> None:
    """Refuse a JPEG too short for its header's size: libjpeg fills the missing blocks with grey
    and reports success. A Huffman-coded JPEG spends at least 1 bit per 8x8 block of its
    full-resolution component, so fewer than blocks/8 bytes cannot be a complete image."""
    if img.format != "JPEG" or _jpeg_frame_marker(data) in _ARITHMETIC_SOF:
        return
    blocks = -(-img.width // 8) * -(-img.height // 8)
    if len(data) < blocks / 8:
        raise ImageDecodeError(
            f"file has {len(data)} bytes, too few for the {img.width}x{img.height} pixels its header "
            f"promises (truncated or forged header)"
        )


def _decode(data: bytes, height: int, width: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageDecodeError(f"image is {img.width}x{img.height} pixels, over the {MAX_PIXELS} limit")
            _check_complete(img, data)
            if img.format == "JPEG":
                img.draft("RGB", (width, height))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            img = to_rgb(img)
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling[RESIZE.upper()])
            return np.asarray(img, dtype=np.uint8).copy()


def decode_image(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Decode image bytes into a ``(height, width, 3)`` uint8 RGB array.

    Raises ImageDecodeError with a short reason for anything that is not a complete, sane image.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        return _decode(data, int(size[0]), int(size[1]))
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:  # its message holds the repr of a BytesIO: say it plainly
        raise ImageDecodeError("cannot decode image: not a format this Pillow can read") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...)
        reason = str(exc).strip() or type(exc).__name__
        raise ImageDecodeError(f"cannot decode image: {reason}") from None


def load_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """``decode_image(read_image_file(path).data, size)``: read safely once, then decode."""
    return decode_image(read_image_file(path).data, size)
