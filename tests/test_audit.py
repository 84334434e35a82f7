"""The audit on generated images: planted copies across splits, swapped labels, the report files."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
import base64

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from classify.audit import run_audit
from extract.neighbours import connected_groups, nearest_other, normalise, similar_and_nearest, similar_pairs
from cli import cli
from edge.imageio import load_image
from extract.files import file_sha256
from conftest import fake_record
from extract.store import BackboneRows, empty_state, write_state

CLASSES = {"rouge": (200, 40, 40), "vert": (40, 180, 60), "bleu": (40, 60, 200)}
PER_CLASS = 24


def smooth_image(colour, seed: int, size: int = 64) -> Image.Image:
    """A distinct low-frequency picture: a random 6x6 colour field around ``colour``, upscaled."""
    rng = np.random.default_rng(seed)
    cells = np.clip(np.array(colour) + rng.integers(-90, 90, (6, 6, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(cells).resize((size, size), Image.BICUBIC)


def toy_features(path: Path) -> np.ndarray:
    """A stand-in backbone: the image's 12x12 colour thumbnail (separates the classes by colour)."""
    return load_image(path, (12, 12)).astype(np.float32).ravel() / 255.0


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buffer = BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


PLANTED = {  # copy name -> how it is made from the original
    "resized": lambda img: img.resize((40, 40)),
    "requality": lambda img: Image.open(BytesIO(jpeg_bytes(img, 35))),
    "cropped": lambda img: img.crop((2, 2, 62, 62)),
    "flipped": ImageOps.mirror,
}
SWAPS = {"rouge/img_5.jpg": "vert", "vert/img_7.jpg": "bleu", "bleu/img_9.jpg": "rouge"}


def build_dataset(root: Path, store: Path) -> dict:
    """Images (with planted copies in test and swapped labels) and a store of their toy features.

    Returns the planted copies ``{copy path: original path}``.
    """
    rows: list[tuple[str, str, str]] = []  # path, class, split
    planted = {}
    for c, (name, colour) in enumerate(CLASSES.items()):
        for i in range(PER_CLASS):
            img = smooth_image(colour, seed=100 * c + i)
            relpath = f"{name}/img_{i}.jpg"
            label = SWAPS.get(relpath, name)
            relpath = f"{label}/from_{name}_{i}.jpg" if relpath in SWAPS else relpath
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / relpath).write_bytes(jpeg_bytes(img, 92))
            rows.append((relpath, label, "train" if i < 16 else ("validation" if i < 20 else "test")))
            if c == 0 and i < len(PLANTED):  # copies of the first red training images, into the test split
                kind = list(PLANTED)[i]
                copy = f"{name}/{kind}_copy_{i}.jpg"
                (root / copy).write_bytes(jpeg_bytes(PLANTED[kind](img).convert("RGB"), 92))
                rows.append((copy, name, "test"))
                planted[copy] = relpath
    write_toy_store(root, store, rows)
    return planted


def write_toy_store(root: Path, store: Path, rows: list[tuple[str, str, str]], features_of=toy_features,
                    classes=CLASSES) -> None:
    """A store of ``rows`` (path, class, split) whose features are ``features_of(image path)``."""
    state = empty_state(images_root=str(root), seed=0, validation_split=0.1, test_split=0.1, layout="class-folders")
    state.classes = sorted(classes)
    for relpath, label, split in rows:
        for column, value in (("path", relpath), ("sha256", file_sha256(root / relpath)), ("class_name", label),
                              ("split", split), ("size", 1), ("mtime_ns", 0)):
            getattr(state.images, column).append(value)
    features = np.stack([features_of(root / p) for p, _, _ in rows])
    record = fake_record("toy", features.shape[1], input_size=12, dtype=str(features.dtype), preprocessing="raw")
    state.backbones["toy"] = BackboneRows(record, list(state.images.path), list(state.images.sha256), features)
    write_state(store, state)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    base = tmp_path_factory.mktemp("audit")
    planted = build_dataset(base / "images", base / "features.h5")
    report = run_audit(base / "features.h5", report_dir=base / "report", progress=False)
    return base, planted, report


def _group_of(report: dict, path: str) -> dict | None:
    return next((g for g in report["duplicate_groups"] if path in {i["path"] for i in g["images"]}), None)


def test_planted_copies_across_splits_are_found_as_leaks(audited):
    _, planted, report = audited
    for copy, original in planted.items():
        group = _group_of(report, copy)
        assert group is not None, f"{copy} not found"
        assert original in {i["path"] for i in group["images"]}
        assert group["leak"] and group["splits"] == ["train", "test"]
    assert report["summary"]["test_images_with_train_copy"] == len(planted)
    assert report["leak_effect"]["leaked_test_images"] == len(planted)


def test_unrelated_images_are_not_grouped(audited):
    _, planted, report = audited
    grouped = {i["path"] for g in report["duplicate_groups"] for i in g["images"]}
    assert grouped == set(planted) | set(planted.values())


def test_swapped_labels_rank_at_the_top(audited):
    _, _, report = audited
    top = report["mislabel_suspects"][:len(SWAPS)]
    assert {row["path"].split("/")[1] for row in top} == {f"from_{p.split('/')[0]}_{p.split('_')[1][:-4]}.jpg"
                                                          for p in SWAPS}
    for row in top:  # the suggestion is the class the picture was drawn from
        assert row["suggested"] == row["path"].split("/")[1].split("_")[1]


def test_identical_files_with_other_labels_are_a_conflict(tmp_path):
    root = tmp_path / "images"
    rows = []
    for c, (name, colour) in enumerate(CLASSES.items()):
        for i in range(10):
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / f"{i}.jpg").write_bytes(jpeg_bytes(smooth_image(colour, 100 * c + i), 90))
            rows.append((f"{name}/{i}.jpg", name, "train" if i < 8 else "test"))
    (root / "vert" / "same_as_rouge_0.jpg").write_bytes((root / "rouge" / "0.jpg").read_bytes())
    rows.append(("vert/same_as_rouge_0.jpg", "vert", "train"))
    write_toy_store(root, tmp_path / "f.h5", rows)
    report = run_audit(tmp_path / "f.h5", report_dir=tmp_path / "r", progress=False)
    conflicts = [g for g in report["duplicate_groups"] if g["label_conflict"]]
    assert len(conflicts) == 1 and "exact" in conflicts[0]["evidence"]
    assert conflicts[0]["labels"] == ["rouge", "vert"] and not conflicts[0]["leak"]


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.open = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
        elif tag not in ("br", "meta"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open.pop() == tag, f"unbalanced </{tag}>"


def test_html_parses_and_every_image_it_shows_is_embedded(audited):
    base, planted, report = audited
    collector = _Collector()
    collector.feed((base / "report" / "audit.html").read_text(encoding="utf-8"))
    assert collector.open == []
    shown = sum(len(g["images"]) for g in report["duplicate_groups"]) + len(report["mislabel_suspects"]) \
        + len(report["outliers"]["images"])
    assert len(collector.sources) == shown > 0
    for src in collector.sources:
        assert src.startswith("data:image/jpeg;base64,")
        Image.open(BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert json.loads((base / "report" / "audit.json").read_text())["summary"] == report["summary"]


def test_each_kind_of_evidence_keeps_its_own_best_number():
    """A cosine of 0.93 and a keypoint share of 0.40 are not on one scale: each kind's best pair is kept."""
    from classify.duplicates import group_duplicates

    pairs = {"features": np.array([[0, 1, 0.93]]), "keypoints": np.array([[1, 2, 0.25], [2, 3, 0.40]]),
             "exact": np.array([[4, 5, 1.0]]), "aligned": np.zeros((0, 3))}
    groups = group_duplicates(pairs, np.array(["train"] * 4 + ["train", "test"]), np.zeros(6, int), ["a"])
    by_rows = {tuple(g.rows): g for g in groups}
    assert by_rows[(0, 1, 2, 3)].similarity_by_kind == {"features": 0.93, "keypoints": 0.4}
    assert by_rows[(0, 1, 2, 3)].kinds == ["features", "keypoints"] and by_rows[(0, 1, 2, 3)].max_similarity == 0.93
    assert by_rows[(4, 5)].similarity_by_kind == {"exact": 1.0}


def test_the_page_names_each_groups_evidence_with_its_number_and_explains_the_kinds_used(audited):
    from html import escape

    from classify.duplicates import EVIDENCE

    base, _, report = audited
    page = (base / "report" / "audit.html").read_text(encoding="utf-8")
    for group in report["duplicate_groups"]:
        line = ", ".join(f"{kind} {value}" for kind, value in group["similarity_by_evidence"].items())
        assert f"evidence: {line}<br>" in page
    used = {kind for group in report["duplicate_groups"] for kind in group["evidence"]}
    assert used and all(escape(EVIDENCE[kind]) in page for kind in used)
    assert not any(escape(EVIDENCE[kind]) in page for kind in set(EVIDENCE) - used)


def test_cli_audit_without_the_image_files(audited, tmp_path):
    base, _, _ = audited
    moved = tmp_path / "elsewhere"
    result = CliRunner().invoke(cli, ["audit", "--store", str(base / "features.h5"), "--report-dir", str(tmp_path / "r"),
                                      "--images", str(tmp_path), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.splitlines()[0])
    assert not report["image_files_read"] and set(report["summary"]["pairs"]) == {"features", "mutual", "exact"}
    assert "<img" not in (tmp_path / "r" / "audit.html").read_text()
    bad = CliRunner().invoke(cli, ["audit", "--store", str(base / "features.h5"), "--backbone", "nope",
                                   "--report-dir", str(moved)])
    assert bad.exit_code == 1 and bad.output.startswith("Error:") and "toy" in bad.output


def test_blockwise_pairs_match_the_full_matrix():
    rng = np.random.default_rng(0)
    unit = normalise(rng.normal(size=(103, 8)))
    full = unit @ unit.T
    expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(full, 1) >= 0.6))}
    for block in (1, 7, 103):
        for pairs in (similar_pairs(unit, 0.6, block_rows=block), similar_and_nearest(unit, 0.6, block_rows=block)[0]):
            assert {(int(i), int(j)) for i, j, _ in pairs} == expected
            assert np.allclose(pairs[:, 2], [full[int(i), int(j)] for i, j, _ in pairs])
    index, best = nearest_other(unit, block_rows=10)
    np.fill_diagonal(full, -np.inf)
    assert (index == full.argmax(axis=1)).all() and np.allclose(best, full.max(axis=1))
    _, (fused_index, fused_best, second), _ = similar_and_nearest(unit, 0.6, block_rows=7)
    assert (fused_index == index).all() and np.allclose(fused_best, best)
    assert np.allclose(second, np.sort(full, axis=1)[:, -2])
    assert connected_groups(5, [(0, 3, 1), (3, 4, 1)]) == [[0, 3, 4]]


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium is not installed")
def test_html_renders_in_headless_chromium(audited, tmp_path):
    base, _, _ = audited
    shot = tmp_path / "audit.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,1400",
                    f"--screenshot={shot}", (base / "report" / "audit.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1400, 1000)
    # thumbnails are drawn: the red pictures of the planted group show as strongly red pixels
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 120) & (pixels[..., 2] < 120)
    assert red.sum() > 2000


def test_an_image_far_from_every_class_is_the_outlier():
    from classify.label_checks import nearest_class_similarity, outliers

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32)) * 4
    labels = np.repeat(np.arange(3), 30)
    features = centres[labels] + rng.normal(size=(90, 32))
    features[17] = rng.normal(size=32) * 4  # labelled 0, like no class at all
    rows, cut = outliers(nearest_class_similarity(features, labels, 3))
    assert rows.tolist() == [17]
    assert nearest_class_similarity(features, labels, 3)[17] < cut
