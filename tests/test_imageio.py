"""Image decoding: every mode becomes RGB, EXIF orientation applied, bad files give a reason."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edge import imageio
from edge.imageio import (
    IMAGE_EXTENSIONS,
    FileChangedError,
    ImageDecodeError,
    decode_image,
    is_image_name,
    load_image,
    printable,
    read_image_file,
    strict_json,
)


def _save(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("L", 128, (128, 128, 128)),
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("I", 1000, (4, 4, 4)),  # 32-bit int holding 16-bit data (how Pillow opens 16-bit PNGs)
    ],
)
def test_modes_become_rgb(tmp_path, mode, value, expected):
    path = _save(tmp_path, Image.new(mode, (8, 8), value), f"img_{mode.replace(';', '')}.tiff")
    arr = load_image(path, (4, 6))
    assert arr.shape == (4, 6, 3) and arr.dtype == np.uint8
    assert tuple(int(v) for v in arr[2, 2]) == expected


def test_palette_and_transparency_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    arr = load_image(_save(tmp_path, rgba, "t.png"), (8, 8))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    half = Image.new("LA", (8, 8), (0, 128))
    assert 120 <= load_image(_save(tmp_path, half, "la.png"), (8, 8))[0, 0, 0] <= 135
    pal = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
    assert tuple(load_image(_save(tmp_path, pal, "p.gif"), (8, 8))[0, 0]) == (0, 0, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    arr = load_image(path, (40, 20))  # displayed as 20 wide x 40 high
    assert arr.shape == (40, 20, 3)
    top, bottom = arr[:20].mean(), arr[20:].mean()
    assert top > 200 and bottom < 50  # the white half is on top after rotation


@pytest.mark.parametrize(
    "content,reason",
    [(b"", "empty file"), (b"this is not an image", "cannot decode"), (None, "cannot decode")],
)
def test_bad_files_raise_with_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is None:  # a truncated JPEG
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
        content = buf.getvalue()[:200]
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason):
        load_image(path, (8, 8))


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "MAX_PIXELS", 100)
    path = _save(tmp_path, Image.new("RGB", (20, 20)), "big.png")
    with pytest.raises(ImageDecodeError, match="over the 100 limit"):
        load_image(path, (8, 8))


def test_jpeg_draft_decoding_matches_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((128, 128, 1))).astype(np.uint8)  # 1024 px
    path = _save(tmp_path, Image.fromarray(base), "large.jpg", quality=95)
    fast = load_image(path, (64, 64)).astype(int)
    full = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.BILINEAR)).astype(int)
    assert np.abs(fast - full).mean() < 3


# --- reading once, safely ------------------------------------------------------------------------


def _special_entries(tmp_path):
    """name -> the reason fragment read_image_file must give for it."""
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "dir.jpg").mkdir()
    return {"fifo.jpg": "not a regular file (a FIFO)", "zero.jpg": "not a regular file (a character device)",
            "dangling.jpg": "dangling symlink", "loop.jpg": "symlink loop", "dir.jpg": "(a directory)"}


def test_only_regular_files_are_read_and_nothing_blocks(tmp_path):
    for name, reason in _special_entries(tmp_path).items():
        with pytest.raises(ImageDecodeError, match=re.escape(reason)):
            read_image_file(tmp_path / name)  # a FIFO would block here forever if opened for reading
        with pytest.raises(ImageDecodeError, match=re.escape(reason)):
            load_image(tmp_path / name, (8, 8))


def test_permission_denied_is_a_reason(tmp_path, monkeypatch):
    path = _save(tmp_path, Image.new("RGB", (8, 8)), "locked.png")

    def refuse(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(imageio.os, "open", refuse)  # root ignores chmod, so simulate the refusal
    with pytest.raises(ImageDecodeError, match="permission denied"):
        read_image_file(path)


def test_read_once_gives_the_bytes_their_hash_and_stat(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (8, 8), (1, 2, 3)), "a.png")
    got = read_image_file(path)
    assert got.data == path.read_bytes()
    assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (got.size, got.mtime_ns) == (path.stat().st_size, path.stat().st_mtime_ns)
    assert tuple(decode_image(got.data, (2, 2))[0, 0]) == (1, 2, 3)


def test_a_file_growing_while_read_is_refused(tmp_path, monkeypatch):
    path = _save(tmp_path, Image.new("RGB", (8, 8)), "grow.png")
    real_read = imageio.os.read

    def read_then_append(fd, n):
        data = real_read(fd, n)
        with open(path, "ab") as f:  # the writer appends between our reads
            f.write(b"x")
        return data

    monkeypatch.setattr(imageio.os, "read", read_then_append)
    with pytest.raises(FileChangedError, match="changed while it was being read"):
        read_image_file(path)


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "MAX_FILE_BYTES", 10)
    path = _save(tmp_path, Image.new("RGB", (8, 8)), "big.png")
    with pytest.raises(ImageDecodeError, match="over the 10 limit"):
        read_image_file(path)


# --- decode validation ----------------------------------------------------------------------------


def test_jpeg_with_forged_huge_header_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 50, 50)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 9000, 9000)  # height, width
    with pytest.raises(ImageDecodeError, match="too few for the 9000x9000 pixels"):
        decode_image(bytes(data), (8, 8))
    honest = Image.new("RGB", (512, 512), (128, 50, 50))  # a real, highly compressible large JPEG decodes
    buf = io.BytesIO()
    honest.save(buf, "JPEG")
    assert tuple(decode_image(buf.getvalue(), (4, 4))[0, 0]) == pytest.approx((128, 50, 50), abs=3)


def test_png_with_cut_pixel_data_is_refused():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    at = png.find(b"IDAT")
    length = struct.unpack(">I", png[at - 4:at])[0]
    cut = png[at + 4:at + 4 + length // 3]
    chunk = struct.pack(">I", len(cut)) + b"IDAT" + cut + struct.pack(">I", zlib.crc32(b"IDAT" + cut))
    forged = png[:at - 4] + chunk + png[png.find(b"IEND") - 4:]  # a complete-looking file, a third of the data
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(forged, (8, 8))


@pytest.mark.parametrize("values,expected", [((0.0, 0.5, 1.0), 128), ((0.0, 128.0, 255.0), 128),
                                             ((0.0, 30000.0, 65535.0), 117), ((-1.0, 0.0, 1.0), 128)])
def test_float_images_are_scaled_by_their_range(tmp_path, values, expected):
    arr = np.array([values] * 3, dtype=np.float32)
    path = _save(tmp_path, Image.fromarray(arr, "F"), "f.tif")
    assert load_image(path, (3, 3))[1, 1, 0] == expected


def test_float_image_with_nan_is_refused(tmp_path):
    arr = np.full((4, 4), np.nan, dtype=np.float32)
    with pytest.raises(ImageDecodeError, match="NaN"):
        load_image(_save(tmp_path, Image.fromarray(arr, "F"), "nan.tif"), (2, 2))


# --- one list of formats, safe text ---------------------------------------------------------------


def test_every_format_pillow_decodes_is_accepted_and_stubs_are_not():
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".bmp", ".gif"} <= IMAGE_EXTENSIONS
    assert is_image_name("x.AVIF") == (".avif" in Image.registered_extensions())
    assert not is_image_name("features.h5") and not is_image_name("notes.txt") and not is_image_name("a.mpg")


def test_printable_escapes_line_breaks_controls_and_undecodable_bytes():
    assert printable("ok name é.jpg") == "ok name é.jpg"
    assert printable("a\nb\rc\x1b[0m\u2028\u202e") == "a\\x0ab\\x0dc\\x1b[0m\\u2028\\u202e"
    name = os.fsdecode(b"caf\xe9.jpg")
    assert printable(name) == "caf\\xe9.jpg"
    assert "\n" not in printable("x" + "\n" * 3)


def test_strict_json_is_valid_utf8_lossless_and_refuses_nan():
    name = os.fsdecode(b"caf\xe9\n.jpg")
    text = strict_json({"path": name})
    text.encode("utf-8")  # would raise on a lone surrogate
    assert json.loads(text)["path"] == name and os.fsencode(json.loads(text)["path"]) == b"caf\xe9\n.jpg"
    with pytest.raises(ValueError):
        strict_json({"p": float("nan")})
