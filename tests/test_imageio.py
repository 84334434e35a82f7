"""Image decoding: every mode becomes RGB, EXIF orientation applied, bad files give a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edge import imageio
from edge.imageio import ImageDecodeError, load_image


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
