"""Copies rotated with black corners, shifted and zoomed, whose features are too far apart for the
picture alignment to be tried, are confirmed by keypoints; different pictures of the same kind are
not (classify/audit_keypoints.py, classify/duplicates.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from classify.audit import run_audit
from classify.audit_alignment import CANDIDATE_COSINE
from classify import audit_keypoints
from classify.audit_keypoints import (KEYPOINT_COSINE, KEYPOINT_INLIERS, MAX_PARTNERS, ImageKeypoints, detect,
                                      distinctive, keypoint_pairs)
from test_audit import write_toy_store
from test_audit_alignment import PALETTES, SIZE, _save, fruit_photo


def rotated_shifted_zoomed(img: Image.Image, degrees: float = 30, shift: int = 14, zoom: float = 1.15) -> Image.Image:
    """Turned by ``degrees`` (black corners), zoomed in by ``zoom`` and shifted right and down by
    ``shift`` px (black bands along the top and left), at the original's size."""
    turned = img.rotate(degrees)
    cut = int(SIZE * (1 - 1 / zoom) / 2)
    zoomed = turned.crop((cut, cut, SIZE - cut, SIZE - cut)).resize((SIZE, SIZE), Image.BICUBIC)
    moved = Image.new("RGB", (SIZE, SIZE))
    moved.paste(zoomed, (shift, shift))
    return moved


class FeaturesAt:
    """A stand-in backbone: every picture one random direction, the named pairs at a set cosine
    (centred) between ``KEYPOINT_COSINE`` and the alignment's candidate cosine: only keypoints decide."""

    def __init__(self, pairs: dict[str, str], cosine: float):
        self.pairs, self.cosine = pairs, cosine
        self.rng, self.own = np.random.default_rng(0), {}

    def __call__(self, path) -> np.ndarray:
        noise = self.rng.normal(size=512)
        partner = self.pairs.get(path.stem)
        if partner:
            noise = self.cosine * self.own[partner] + np.sqrt(1 - self.cosine**2) * noise
        self.own[path.stem] = noise
        return noise.astype(np.float32)


COSINE = (KEYPOINT_COSINE + CANDIDATE_COSINE) / 2
SPECKLED = (0.2, 0.3, 0.5)  # textured like an orange's peel: a few hundred keypoints at 160 px


def speckled(seed: int, palette: str = "pomme", framing: int = 0) -> Image.Image:
    """A textured fruit; ``framing`` stretches it a little (each picture its own outline, so that
    the 16 px thumbnails of the pictures that are not copies differ: this test is about keypoints)."""
    photo = fruit_photo(PALETTES[palette], seed=seed, texture_weights=SPECKLED)
    return photo.crop((3 * framing, 0, SIZE, SIZE - 2 * framing)).resize((SIZE, SIZE), Image.BICUBIC)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """photo0 (train) has a rotated, shifted, zoomed copy in test; photo1 (train) has a different
    picture of the same kind, turned and shifted the same way, in test; 12 unrelated pictures."""
    base = tmp_path_factory.mktemp("keypoints")
    root, rows = base / "images", []
    photo0, photo1 = speckled(21), speckled(22, framing=1)
    rows.append((_save(root, "pomme/photo0.jpg", photo0), "pomme", "train"))
    rows.append((_save(root, "pomme/copy0.jpg", rotated_shifted_zoomed(photo0)), "pomme", "test"))
    rows.append((_save(root, "pomme/photo1.jpg", photo1), "pomme", "train"))
    look_alike = rotated_shifted_zoomed(speckled(23, framing=2))
    rows.append((_save(root, "pomme/lookalike1.jpg", look_alike), "pomme", "test"))
    rows += [(_save(root, f"{name}/other{k}.jpg", speckled(40 + 10 * c + k, name, framing=3 + 6 * c + k)), name,
              "validation") for c, name in enumerate(PALETTES) for k in range(6)]
    features = FeaturesAt({"copy0": "photo0", "lookalike1": "photo1"}, COSINE)
    write_toy_store(root, base / "f.h5", rows, features_of=features, classes=PALETTES)
    report = run_audit(base / "f.h5", report_dir=base / "r", progress=False)
    return root, [r[0] for r in rows], report


def test_a_rotated_shifted_zoomed_copy_across_splits_is_a_leak(audited):
    _, _, report = audited
    groups = {frozenset(i["path"] for i in g["images"]): g for g in report["duplicate_groups"]}
    copy = frozenset({"pomme/photo0.jpg", "pomme/copy0.jpg"})
    assert set(groups) == {copy}  # the look-alike, turned and shifted like the copy, is in no group
    assert groups[copy]["evidence"] == ["keypoints"] and groups[copy]["leak"]
    assert report["summary"]["test_images_with_train_copy"] == 1


def test_the_copy_has_many_agreeing_matches_the_look_alike_few(audited):
    root, paths, _ = audited
    keypoints = ImageKeypoints(root, paths)
    assert keypoints.inliers(0, 1) >= 3 * KEYPOINT_INLIERS
    assert keypoints.inliers(2, 3) < KEYPOINT_INLIERS / 2
    assert keypoints.filled[1] and keypoints.filled[3] and not keypoints.filled[0]


def test_a_mirrored_copy_matches_through_the_mirrored_descriptors(audited):
    root, paths, _ = audited
    grey = np.asarray(Image.open(root / paths[1]).convert("L"))
    mirrored, of_mirror = detect(grey).mirrored(), detect(np.ascontiguousarray(grey[:, ::-1]))
    distance = np.linalg.norm(mirrored.points[:, None] - of_mirror.points[None], axis=2)
    near = distance.argmin(axis=1)
    same_place = distance[np.arange(len(near)), near] < 1.0
    assert same_place.mean() > 0.8
    differences = np.linalg.norm(mirrored.descriptors[same_place] - of_mirror.descriptors[near[same_place]], axis=1)
    assert np.median(differences) < 0.1 * np.median(np.linalg.norm(of_mirror.descriptors, axis=1))


def test_a_copy_without_fill_is_linked_when_its_matches_are_its_own(tmp_path):
    """A copy zoomed in without fill: no black fill, but the only picture its keypoints match."""
    original = speckled(5, "citron")
    zoomed = original.crop((10, 10, SIZE - 10, SIZE - 10)).resize((SIZE, SIZE))
    paths = [_save(tmp_path, "a/0.jpg", original), _save(tmp_path, "a/1.jpg", zoomed),
             _save(tmp_path, "a/2.jpg", speckled(6, "citron", framing=1))]
    candidates = np.array([[0, 1, COSINE], [0, 2, COSINE], [1, 2, COSINE]])
    found = keypoint_pairs(tmp_path, paths, candidates)
    assert [tuple(p) for p in found[:, :2].astype(int)] == [(0, 1)]
    assert 0 < found[0, 2] <= 1


def with_label(background: Image.Image, label: Image.Image, at: tuple[int, int]) -> Image.Image:
    picture = background.copy()
    picture.paste(label, at)
    return picture


@pytest.mark.parametrize("carriers, linked", [(2, 1), (4, 0)])
def test_a_print_that_many_pictures_carry_links_none_of_them(tmp_path, carriers, linked):
    """Different pictures that carry one printed label (the same box print on different boxes):
    two of them are linked, like a photo taken twice; when 4 carry it, each matches 3 others and
    none is (``MAX_PARTNERS``)."""
    label = speckled(7, "pomme").crop((30, 30, 100, 100))
    paths = [_save(tmp_path, f"a/{k}.jpg", with_label(speckled(10 + k, "citron", framing=k), label, (10 + 20 * k, 40)))
             for k in range(carriers)]
    candidates = np.array([[i, j, COSINE] for i in range(carriers) for j in range(i + 1, carriers)])
    keypoints = ImageKeypoints(tmp_path, paths)
    assert min(keypoints.inliers(i, j) for i, j in candidates[:, :2].astype(int)) >= KEYPOINT_INLIERS
    assert carriers - 1 > MAX_PARTNERS or carriers == 2
    assert len(keypoint_pairs(tmp_path, paths, candidates)) == linked


def test_filled_copies_are_linked_however_many_partners_they_have(tmp_path):
    """Four rotated and shifted copies of one photo, each matching the 4 others: black fill decides."""
    original = speckled(8, "pomme")
    paths = [_save(tmp_path, "a/0.jpg", original)]
    paths += [_save(tmp_path, f"a/{k}.jpg", rotated_shifted_zoomed(original, degrees=10 * k, shift=4 * k, zoom=1.05))
              for k in range(1, 5)]
    candidates = np.array([[i, j, COSINE] for i in range(5) for j in range(i + 1, 5)])
    assert len(keypoint_pairs(tmp_path, paths, candidates)) == 10


def test_partners_are_counted_per_image():
    pairs = np.array([[0, 1], [2, 3], [2, 4], [2, 5], [6, 7], [6, 8]])
    assert distinctive(pairs).tolist() == [True, False, False, False, True, True]
    assert distinctive(pairs, max_partners=3).tolist() == [True] * 6


def test_each_image_is_detected_once_and_dropped_after_its_last_pair(tmp_path, monkeypatch):
    paths = [_save(tmp_path, f"a/{k}.jpg", speckled(30 + k, framing=k % 4)) for k in range(8)]
    pairs = np.array([[k, (k + step) % 8] for k in range(8) for step in (1, 2)])
    monkeypatch.setattr(audit_keypoints, "PAIRS_AT_ONCE", 3)
    keypoints, looked, held = ImageKeypoints(tmp_path, paths), [], []
    look, forget = keypoints._look, keypoints.forget
    monkeypatch.setattr(keypoints, "_look", lambda row: looked.append(row) or look(row))
    monkeypatch.setattr(keypoints, "forget", lambda rows: forget(rows) or held.append(len(keypoints.found)))
    matched = audit_keypoints._matched(keypoints, pairs)
    assert sorted(looked) == list(range(8)) and keypoints.found == {}
    assert max(held) < 8  # never every image's keypoints at once
    assert max(held) <= audit_keypoints.held_at_once(pairs, 8) < 8
    assert matched[:, 0].tolist() == [keypoints.inliers(i, j) for i, j in pairs.tolist()]


def test_the_memory_bench_reports_the_peak_of_the_visit(tmp_path):
    """bench/keypoint_memory.py on 2,000 synthetic rows: the audit's candidate pairs, and a peak
    that is the visiting plan's (a few clusters' images, not every image)."""
    import json

    from bench import keypoint_memory

    assert keypoint_memory.main(["--rows", "2000", "--dim", "32", "--out", str(tmp_path / "km.md")]) == 0
    result = json.loads((tmp_path / "km.json").read_text())["results"][0]
    assert result["rows"] == 2000 and result["pairs"] > 2000 and result["images"] > 1900
    assert 0 < result["held"] < result["images"] / 4
    assert "| synthetic, 32 dims | 2,000 |" in (tmp_path / "km.md").read_text()
