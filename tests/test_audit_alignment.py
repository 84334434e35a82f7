"""Copies rotated, turned, mirrored, zoomed or cropped are found by aligning the pictures; other
pictures that share colours and outline are not (classify/audit_alignment.py, classify/duplicates.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from classify.audit import run_audit
from classify.audit_alignment import ALIGNED_THRESHOLD, AlignedImages, picture_mask
from classify.audit_images import read_images
from classify.duplicates import find_pairs
from extract.neighbours import normalise, similar_and_nearest
from test_audit import jpeg_bytes, write_toy_store

SIZE = 160
PALETTES = {"pomme": ((90, 10, 10), (250, 120, 90)), "citron": ((120, 100, 0), (255, 250, 150))}


def fruit_photo(palette, seed: int, texture_weights=(0.6, 0.25, 0.15)) -> Image.Image:
    """An elliptic 'fruit' on a white background, filled with a random texture (5, 12 and 40
    cells across, weighted by ``texture_weights``) in ``palette``: every picture of one palette
    has the same outline and colours, not the same texture."""
    rng = np.random.default_rng(seed)
    texture = sum(weight * np.asarray(Image.fromarray(rng.integers(0, 256, (cells, cells), dtype=np.uint8)).resize(
        (SIZE, SIZE), Image.BICUBIC), np.float32) for weight, cells in zip(texture_weights, (5, 12, 40))) / 255.0
    dark, light = (np.array(c, np.float32) for c in palette)
    rgb = dark + (light - dark) * texture[..., None]
    yy, xx = np.mgrid[:SIZE, :SIZE]
    inside = ((yy - 81) / 72.0) ** 2 + ((xx - 78) / 66.0) ** 2 <= 1
    return Image.fromarray(np.where(inside[..., None], rgb, 255).astype(np.uint8))


def _crop(img: Image.Image, keep: float) -> Image.Image:
    cut = int(img.width * (1 - keep) / 2)
    return img.crop((cut, cut, img.width - cut, img.height - cut))


COPIES = {  # how a copy is made; all keep the file's square shape
    "rotated30_black_corners": lambda img: _crop(img.rotate(30), 0.9),
    "mirrored": ImageOps.mirror,
    "turned90": lambda img: img.rotate(90),
    "cropped80": lambda img: _crop(img, 0.8).resize((SIZE, SIZE)),
    "mirrored_rotated12_zoomed": lambda img: _crop(ImageOps.mirror(img).rotate(-12), 0.85),
}


COPY_OF = {kind: f"photo{k}" for k, kind in enumerate(COPIES)}


def _save(root, relpath: str, img: Image.Image) -> str:
    (root / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / relpath).write_bytes(jpeg_bytes(img.convert("RGB"), 90))
    return relpath


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An original, one copy per kind and two other pictures with its colours and outline."""
    root = tmp_path_factory.mktemp("align")
    original = fruit_photo(PALETTES["pomme"], seed=1)
    paths = [_save(root, "pomme/original.jpg", original)]
    paths += [_save(root, f"pomme/{kind}.jpg", make(original)) for kind, make in COPIES.items()]
    paths += [_save(root, f"pomme/other{k}.jpg", fruit_photo(PALETTES["pomme"], seed=10 + k)) for k in range(2)]
    return root, paths


@pytest.mark.parametrize("kind", list(COPIES))
def test_each_kind_of_copy_aligns_with_its_original(photos, kind):
    root, paths = photos
    aligned = AlignedImages(root, paths)
    assert aligned.score(0, paths.index(f"pomme/{kind}.jpg")) >= ALIGNED_THRESHOLD
    assert aligned.score(paths.index(f"pomme/{kind}.jpg"), 0) >= ALIGNED_THRESHOLD


def test_a_nearly_symmetric_picture_aligns_from_the_second_rotation_peak(tmp_path):
    """This elliptic picture's log-polar correlation peaks highest at a wrong quarter turn."""
    original = fruit_photo(PALETTES["pomme"], seed=2)
    paths = [_save(tmp_path, "a/0.jpg", original), _save(tmp_path, "a/1.jpg", COPIES["cropped80"](original))]
    assert AlignedImages(tmp_path, paths).score(0, 1) >= ALIGNED_THRESHOLD


def test_pictures_that_share_colours_and_outline_do_not_align(photos):
    """The outline and the colours are the same; only the texture inside differs."""
    root, paths = photos
    aligned = AlignedImages(root, paths)
    others = [paths.index("pomme/other0.jpg"), paths.index("pomme/other1.jpg")]
    for row in others:
        assert aligned.score(0, row) < ALIGNED_THRESHOLD / 2
    assert aligned.score(*others) < ALIGNED_THRESHOLD / 2


def test_the_outline_alone_does_not_make_a_copy(tmp_path):
    """Smooth pictures (bananas, green apples): identical outlines, faint texture inside."""
    faint = (0.0, 0.25, 0.1)  # without outline_free the look-alike scores about 0.76 here
    paths = [_save(tmp_path, f"a/{k}.jpg", fruit_photo(PALETTES["citron"], seed=k, texture_weights=faint))
             for k in range(2)]
    paths.append(_save(tmp_path, "a/copy.jpg", COPIES["rotated30_black_corners"](Image.open(tmp_path / paths[0]))))
    aligned = AlignedImages(tmp_path, paths)
    assert aligned.score(0, 1) < ALIGNED_THRESHOLD
    assert aligned.score(0, 2) >= ALIGNED_THRESHOLD


def test_black_fill_is_not_picture_but_dark_picture_is():
    grey = np.full((32, 32), 200.0)
    grey[:, :5] = 0  # fill along the border (from a shift or a rotation)
    grey[12:20, 12:20] = 5  # a dark spot inside the picture
    mask = picture_mask(grey)
    assert not mask[:, :5].any() and mask[12:20, 12:20].all() and mask[:, 5:].all()


def test_thumbnails_match_a_copy_turned_by_90_degrees_or_transposed(photos, tmp_path):
    """The pixel rule on its own (features far apart, so no alignment candidate)."""
    root, _ = photos
    original = Image.open(root / "pomme/original.jpg")
    paths = [_save(tmp_path, "a/0.jpg", original), _save(tmp_path, "a/1.jpg", original.rotate(90)),
             _save(tmp_path, "a/2.jpg", original.transpose(Image.Transpose.TRANSPOSE)),
             _save(tmp_path, "a/3.jpg", fruit_photo(PALETTES["citron"], seed=3))]
    pixels = read_images(tmp_path, paths)
    found = find_pairs(np.eye(4, 8) * 10, pixels)
    assert {(int(i), int(j)) for i, j, _ in found["pixels"]} == {(0, 1), (0, 2), (1, 2)}
    assert len(found["features"]) == len(found["aligned"]) == 0


def test_candidates_are_each_rows_strongest_pairs_in_the_band():
    """A pair is a candidate when it is among the 2 most similar pairs of either of its rows, with
    0.2 <= cosine < 0.5, whatever the block size."""
    unit = normalise(np.random.default_rng(1).normal(size=(40, 6)))
    full = unit @ unit.T
    np.fill_diagonal(full, -np.inf)
    inside = np.where((full >= 0.2) & (full < 0.5), full, -np.inf)
    best = {(min(i, j), max(i, j)) for i in range(40) for j in np.argsort(-inside[i])[:2] if inside[i, j] > -np.inf}
    for block in (3, 40):
        _, _, candidates = similar_and_nearest(unit, 0.9, block_rows=block, per_row=2, band=(0.2, 0.5))
        assert {(int(i), int(j)) for i, j, _ in candidates} == best
        assert np.allclose(candidates[:, 2], [full[int(i), int(j)] for i, j, _ in candidates])
        assert (np.diff(candidates[:, 2]) <= 0).all()  # most similar first


class LookAlikeFeatures:
    """A stand-in backbone that, like the real one, puts a rotated copy a little closer to its
    original than a look-alike photo of the same class, yet below the features rule: centred
    cosine about 0.85 for a copy, 0.75 for a look-alike (copies are named after their original)."""

    def __init__(self):
        self.rng, self.own = np.random.default_rng(0), {}

    def __call__(self, path) -> np.ndarray:
        noise = self.rng.normal(size=256)
        original = COPY_OF.get(path.stem)
        if original:
            noise = 0.35 * self.own[original] + np.sqrt(1 - 0.35**2) * noise
        self.own[path.stem] = noise
        centre = np.full(256, 2.5) * (1 if path.parent.name == "pomme" else -1)
        return (centre + 1.3 * noise).astype(np.float32)


def test_rotated_mirrored_and_cropped_copies_across_splits_are_leaks(tmp_path):
    root, rows = tmp_path / "images", []
    for name, palette in PALETTES.items():
        for k in range(4):
            original = fruit_photo(palette, seed=100 * len(name) + k)
            rows.append((_save(root, f"{name}/photo{k}.jpg", original), name, "train"))
            if name == "pomme":  # each red original gets one copy, in the test split
                kind = list(COPIES)[k]
                rows.append((_save(root, f"{name}/{kind}.jpg", COPIES[kind](original)), name, "test"))
        rows += [(_save(root, f"{name}/other{k}.jpg", fruit_photo(palette, seed=7 + k)), name, "validation")
                 for k in range(3 if name == "pomme" else 7)]  # classes of equal size: 11 images
    features = LookAlikeFeatures()  # reads the rows in order: each original before its copy
    write_toy_store(root, tmp_path / "f.h5", rows, features_of=features, classes=PALETTES)
    report = run_audit(tmp_path / "f.h5", report_dir=tmp_path / "r", progress=False)
    groups = {frozenset(i["path"] for i in g["images"]): g for g in report["duplicate_groups"]}
    expected = {frozenset({f"pomme/photo{k}.jpg", f"pomme/{kind}.jpg"}) for k, kind in enumerate(list(COPIES)[:4])}
    assert set(groups) == expected  # the look-alikes (same colours and outline) are in no group
    assert all(groups[g]["leak"] and groups[g]["splits"] == ["train", "test"] for g in expected)
    assert report["summary"]["test_images_with_train_copy"] == 4
    rotated = frozenset({"pomme/photo0.jpg", "pomme/rotated30_black_corners.jpg"})
    assert "aligned" in groups[rotated]["evidence"] and "pixels" not in groups[rotated]["evidence"]
    assert report["summary"]["pairs"]["aligned"] >= 3


def test_mutual_nearest_neighbours_above_the_cosine_are_pairs():
    """0-1: each other's nearest at 0.85, a pair. 2's nearest is 3 (0.82) but 3's is 4 (0.87): 3-4
    is a pair, 2-3 is not. 5-6: each other's nearest at 0.70, under MUTUAL_COSINE: not a pair."""
    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(size=4000)
    mix = lambda a, c: c * a + np.sqrt(1 - c * c) * noise()  # a row with correlation c to a
    a, b, c = noise(), noise(), noise()
    rows = [a, mix(a, 0.85), mix(b, 0.82), b, mix(b, 0.87), c, mix(c, 0.70)]
    filler = rng.normal(size=(300, 4000))  # unrelated rows: the mean is near zero, centring changes little
    found = find_pairs(np.vstack([rows, filler]), None)
    assert {(int(i), int(j)) for i, j, _ in found["mutual"]} == {(0, 1), (3, 4)}
    assert len(found["features"]) == 0


def test_pairs_are_visited_so_that_each_image_is_prepared_once():
    """A chain of 40 images in shuffled numbering: visited in locality order, an LRU cache of 3
    images misses each image once; in the numbering's order it would miss most pairs."""
    from functools import lru_cache

    from classify.audit_alignment import locality_order

    numbering = np.random.default_rng(0).permutation(40)
    pairs = np.array([sorted((numbering[k], numbering[k + 1])) for k in range(39)], dtype=np.float64)
    pairs = np.column_stack([pairs, np.ones(len(pairs))])

    def misses(order) -> int:
        cache = lru_cache(maxsize=3)(lambda row: row)
        for i, j in pairs[order, :2].astype(int):
            cache(i), cache(j)
        return cache.cache_info().misses

    assert misses(locality_order(pairs, 40)) == 40
    assert misses(np.lexsort((pairs[:, 1], pairs[:, 0]))) > 50


def test_a_mirrors_spectrum_is_the_spectrum_of_the_mirrored_picture():
    from classify.audit_alignment import COARSE_PX, _LogPolar, _View

    polar = _LogPolar(COARSE_PX)
    picture = np.asarray(fruit_photo(PALETTES["pomme"], seed=3).convert("L").resize((COARSE_PX, COARSE_PX)),
                         np.float32)
    view = _View(picture, polar.spectrum(picture), picture, picture > 0, picture)
    assert np.allclose(view.mirrored().spectrum, polar.spectrum(picture[:, ::-1]), atol=1e-3 * np.abs(view.spectrum).max())
