"""Generate the embedded demo data set: photos-like pictures of three everyday objects, no network.

Each class is drawn procedurally with Pillow (random position, size, colour, background and
noise), so the folder is reproducible from a seed and the repository ships no image files.
Class folder names use accents on purpose (``bâtonnet``) to exercise unicode handling.

Example:
    python scripts/demo_images.py demo-output/images --per-class 40
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 224


def _background(rng: random.Random) -> Image.Image:
    top = np.array([rng.randint(90, 255) for _ in range(3)], dtype=np.float32)
    bottom = np.array([rng.randint(0, 160) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0, 1, SIZE, dtype=np.float32)[:, None, None]
    grad = np.broadcast_to(top * (1 - t) + bottom * t, (SIZE, SIZE, 3))
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 8, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(grad + noise, 0, 255).astype(np.uint8))


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))


def draw_ball(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    r = rng.randint(35, 80)
    cx, cy = rng.randint(r, SIZE - r), rng.randint(r, SIZE - r)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_colour(rng), outline=(20, 20, 20), width=3)
    draw.arc((cx - r // 2, cy - r // 2, cx + r // 2, cy + r // 2), 200, 300, fill=(255, 255, 255), width=4)


def draw_stick(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    length, width = rng.randint(120, 200), rng.randint(10, 22)
    angle = rng.uniform(0, math.pi)
    cx, cy = SIZE / 2 + rng.uniform(-20, 20), SIZE / 2 + rng.uniform(-20, 20)
    dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
    draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=_colour(rng), width=width)


def draw_box(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    w, h = rng.randint(70, 150), rng.randint(70, 150)
    x, y = rng.randint(0, SIZE - w), rng.randint(0, SIZE - h)
    colour = _colour(rng)
    draw.rectangle((x, y, x + w, y + h), fill=colour, outline=(20, 20, 20), width=3)
    d = min(w, h) // 4
    draw.polygon([(x, y), (x + d, y - d), (x + w + d, y - d), (x + w, y)],
                 fill=tuple(min(255, c + 40) for c in colour), outline=(20, 20, 20))


CLASSES = {"balle": draw_ball, "bâtonnet": draw_stick, "boîte": draw_box}


def make_demo_images(out: str | Path, per_class: int = 40, seed: int = 0) -> Path:
    out = Path(out)
    rng = random.Random(seed)
    for name, draw_fn in CLASSES.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = _background(rng)
            draw_fn(ImageDraw.Draw(img), rng)
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
            img.save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to create (DIR/<class>/<image>.jpg)")
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_demo_images(args.out, args.per_class, args.seed)
    print(f"wrote {args.per_class * len(CLASSES)} images in {len(CLASSES)} classes to {out}")


if __name__ == "__main__":
    main()
