"""A generated corpus of bad and odd directory entries (nothing binary is committed).

``make_corpus(root)`` writes ``root/<colour>/...`` (class folders red/green/blue, so the same tree
serves ``extract`` and, as a watch folder, the edge runner's tiny colour model) and returns what
each entry must become:
- ``good``: relpath -> colour of a readable image (extract: a feature row; edge: a result line);
- ``bad``: relpath -> a fragment of the reason it is refused (extract: a failed row; edge: an
  error line) for regular files that are not usable images;
- ``special``: relpath -> reason fragment for entries that are not regular files (FIFO, device,
  socket, dangling link, link loop): extract records a failed row, the edge runner skips and logs
  them once;
- ``ignored``: entries neither side may report (non-image names, temporary names, folders).
Over 40 kinds; some depend on the platform (sockets, AVIF) and are left out where unavailable.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RGB = {"red": (230, 20, 10), "green": (15, 220, 30), "blue": (20, 10, 240)}
NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name, surrogate-escaped in Python
NON_UTF8_BAD = os.fsdecode(b"cass\xe9.png")


@dataclass
class Corpus:
    root: Path
    good: dict[str, str] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    special: dict[str, str] = field(default_factory=dict)
    ignored: set[str] = field(default_factory=set)

    def kinds(self) -> int:
        return len(self.good) + len(self.bad) + len(self.special) + len(self.ignored)


def image_bytes(colour: str | tuple, fmt: str = "PNG", size=(24, 20), mode: str = "RGB", **save) -> bytes:
    value = RGB[colour] if isinstance(colour, str) else colour
    img = Image.new("RGB", size, value)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def forged_jpeg(width: int = 9000, height: int = 9000) -> bytes:
    """A small valid JPEG whose frame header claims ``width x height`` (libjpeg fills it grey)."""
    data = bytearray(image_bytes("red", "JPEG", (16, 16)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_cut_data() -> bytes:
    """A PNG that ends properly (IEND) but holds a third of its pixel data."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    png = buf.getvalue()
    at = png.find(b"IDAT")
    length = struct.unpack(">I", png[at - 4:at])[0]
    return png[:at - 4] + _png_chunk(b"IDAT", png[at + 4:at + 4 + length // 3]) + png[png.find(b"IEND") - 4:]


def png_bomb_header() -> bytes:
    """A PNG header claiming 60000x60000 pixels (a decompression bomb), a few bytes long."""
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + _png_chunk(b"IEND", b"")


def _float_tiff(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32), "F").save(buf, "TIFF")
    return buf.getvalue()


def _exif_rotated_jpeg(colour: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes(colour, "JPEG", (30, 20), exif=exif.tobytes())


def _write(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _good(c: Corpus) -> None:
    """Readable images, several of them with names or formats that broke tools before."""
    entries = {
        "red/plain.png": image_bytes("red"),
        "red/photo.jpg": image_bytes("red", "JPEG"),
        "red/UPPER.JPG": image_bytes("red", "JPEG"),
        f"red/{NON_UTF8}": image_bytes("red", "JPEG"),
        "red/new\nline.png": image_bytes("red"),
        "red/\x1b[31mescape.png": image_bytes("red"),
        'red/forge".png': image_bytes("red"),
        "red/rtl\u202egnp.png": image_bytes("red"),
        "red/" + "l" * 240 + ".png": image_bytes("red"),
        "red/sp ace é 日本.png": image_bytes("red"),
        "red/png-named.jpg": image_bytes("red", "PNG"),
        "red/trailing-garbage.jpg": image_bytes("red", "JPEG") + b"\0garbage after EOI" * 20,
        "red/rotated.jpg": _exif_rotated_jpeg("red"),
        "red/cmyk.jpg": image_bytes("red", "JPEG", mode="CMYK"),
        "red/rgba.png": image_bytes("red", "PNG", mode="RGBA"),
        "red/nested/deeper/deep.png": image_bytes("red"),
        "green/plain.webp": image_bytes("green", "WEBP", lossless=True),
        "green/plain.bmp": image_bytes("green", "BMP"),
        "green/plain.tiff": image_bytes("green", "TIFF"),
        "green/palette.gif": image_bytes("green", "GIF"),
        "green/tiny.png": image_bytes("green", size=(1, 1)),
        "green/plain.ico": image_bytes("green", "ICO", size=(16, 16)),
        "green/plain.tga": image_bytes("green", "TGA"),
        "green/plain.ppm": image_bytes("green", "PPM"),
        "blue/plain.png": image_bytes("blue"),
        "blue/copy.png": image_bytes("blue"),  # byte-identical to plain.png
        "blue/float01.tif": _float_tiff(np.full((8, 8), 0.6)),  # float in 0..1: mid grey, not black
        "blue/sixteen.png": _sixteen_bit_png(),
        "blue/grey.png": image_bytes((90, 90, 90), mode="L"),
    }
    if ".avif" in _pillow_extensions():
        entries["green/plain.avif"] = image_bytes("green", "AVIF", quality=100)
    for rel, data in entries.items():
        _write(c.root, rel, data)
        c.good[rel] = rel.split("/")[0]
    os.link(c.root / "blue/plain.png", c.root / "blue/hardlink.png")
    c.good["blue/hardlink.png"] = "blue"
    (c.root / "blue/link-to-plain.png").symlink_to("plain.png")  # a link to a regular file inside
    c.good["blue/link-to-plain.png"] = "blue"


def _sixteen_bit_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def _pillow_extensions() -> set[str]:
    Image.init()
    return set(Image.registered_extensions())


def _bad(c: Corpus) -> None:
    """Regular files that are not usable images: each gets a failed row / error line."""
    jpeg = image_bytes("red", "JPEG", (64, 64))
    png = image_bytes("red", "PNG", (64, 64))
    entries = {
        "red/empty.jpg": (b"", "empty file"),
        "red/text.jpg": (b"this is not an image\n", "cannot decode"),
        "red/html.png": (b"<html><body>404</body></html>", "cannot decode"),
        "red/truncated.jpg": (jpeg[:200], "cannot decode"),
        "red/truncated.png": (png[: len(png) // 2], "cannot decode"),
        "red/header-only.jpg": (b"\xff\xd8\xff\xe0" + b"\0" * 40, "cannot decode"),
        "green/forged-9000.jpg": (forged_jpeg(), "too few for the 9000x9000 pixels"),
        "green/cut-idat.png": (png_with_cut_data(), "truncated"),
        "green/bomb.png": (png_bomb_header(), "decompression bomb"),
        "green/nan.tif": (_float_tiff(np.full((8, 8), np.nan)), "NaN"),
        "green/zip.jpg": (b"PK\x03\x04" + b"\0" * 100, "cannot decode"),
        "blue/truncated.gif": (image_bytes("blue", "GIF", (64, 64))[:60], "cannot decode"),
        "blue/truncated.bmp": (image_bytes("blue", "BMP", (64, 64))[:100], "cannot decode"),
        f"blue/{NON_UTF8_BAD}": (b"not an image either", "cannot decode"),
    }
    for rel, (data, reason) in entries.items():
        _write(c.root, rel, data)
        c.bad[rel] = reason
    with open(c.root / "blue/sparse-huge.png", "wb") as f:  # 600 MB on paper, nothing on disk
        f.truncate(600 * 1024 * 1024)
    c.bad["blue/sparse-huge.png"] = "over the"


def _special(c: Corpus) -> None:
    """Entries that are not regular files once links are followed."""
    red = c.root / "red"
    os.mkfifo(red / "fifo.jpg")
    (red / "zero.jpg").symlink_to("/dev/zero")
    (red / "null.png").symlink_to("/dev/null")
    (red / "dangling.jpg").symlink_to(c.root / "missing.jpg")
    (red / "loop.jpg").symlink_to("loop.jpg")
    (red / "ping.jpg").symlink_to("pong.jpg")
    (red / "pong.jpg").symlink_to("ping.jpg")
    (red / "to-fifo.png").symlink_to("fifo.jpg")
    c.special.update({
        "red/fifo.jpg": "a FIFO", "red/zero.jpg": "a character device", "red/null.png": "a character device",
        "red/dangling.jpg": "dangling symlink", "red/loop.jpg": "symlink loop", "red/ping.jpg": "symlink loop",
        "red/pong.jpg": "symlink loop", "red/to-fifo.png": "a FIFO",
    })
    try:
        os.mknod(red / "socket.png", stat.S_IFSOCK | 0o644)
        c.special["red/socket.png"] = "a socket"
    except OSError:  # not allowed here: leave that kind out
        pass


def _ignored(c: Corpus) -> None:
    for rel in ("red/notes.txt", "red/.hidden.jpg", "red/upload.jpg.part", "green/Thumbs.db", "blue/data.h5"):
        _write(c.root, rel, b"x")
        c.ignored.add(rel)
    (c.root / "green/folder.jpg").mkdir()  # a folder with an image name: nothing in it
    c.ignored.add("green/folder.jpg")


def make_corpus(root: Path) -> Corpus:
    corpus = Corpus(root)
    root.mkdir(parents=True, exist_ok=True)
    _good(corpus)
    _bad(corpus)
    _special(corpus)
    _ignored(corpus)
    return corpus
