"""Shared test fixtures: small generated image folders (the suite never needs ../shared)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHARED = Path(os.environ.get("TRANSFERKIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def write_image(path: Path, colour, size=24, seed=0, fmt=None) -> Path:
    """A noisy solid-colour RGB image."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-25, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_image_folder(root: Path, per_class: int = 6, classes=None, size: int = 24, start: int = 0) -> Path:
    """``root/<class>/img_<i>.jpg`` (or png for every third), colours from COLOURS."""
    classes = classes or COLOURS
    for c_index, (name, colour) in enumerate(classes.items()):
        for i in range(start, start + per_class):
            ext = "png" if i % 3 == 2 else "jpg"
            write_image(root / name / f"img_{i}.{ext}", colour, size=size, seed=c_index * 1000 + i)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Converted engines and weights go to a per-session temp cache, never ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "transferkit-cache"
    monkeypatch.setenv("TRANSFERKIT_CACHE", os.environ.get("TRANSFERKIT_TEST_CACHE", str(cache)))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")
