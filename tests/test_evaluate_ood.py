"""``evaluate --ood DIR``: AUROC of the unknown score and the shares flagged, for a model and for a head.

Two generated problems each: unknowns far from every class (AUROC near 1, nearly all flagged) and
"unknowns" drawn from the very distribution of the classes (AUROC near 0.5, flagged about as often
as the in-class images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_edge import COLOURS
from test_edge_ood import build_ood_model

from classify.ood_report import ood_summary
from cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def colour_images(folder: Path, per_class: int, seed: int, classes=COLOURS) -> Path:
    """Solid images of each class colour shifted by N(0, 4) per channel (the tiny model's training spread)."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        for i in range(per_class):
            pixel = np.clip(np.asarray(colour) + rng.normal(0, 4, 3), 0, 255).round().astype(np.uint8)
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), tuple(int(v) for v in pixel)).save(folder / name / f"{i}.png")
    return folder


def test_ood_summary_counts_strictly_above_the_threshold():
    summary = ood_summary(np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 5.0]), threshold=3.0)
    assert summary["in_class_flagged"] == 0.25 and summary["unknown_flagged"] == 0.5
    assert summary["auroc"] == pytest.approx(6.5 / 8)  # 3 beats 1 and 2, ties 3 (a half); 5 beats all four
    assert (summary["in_class_images"], summary["unknown_images"]) == (4, 2)


@pytest.fixture
def model_and_photos(tmp_path: Path) -> tuple[Path, Path]:
    model, _ = build_ood_model(tmp_path / "ood.onnx")
    return model, colour_images(tmp_path / "photos" / "test", per_class=30, seed=1).parent


def test_model_far_unknowns_score_near_one(model_and_photos, tmp_path: Path):
    model, photos = model_and_photos
    far = tmp_path / "far"
    for i, grey in enumerate(range(60, 200, 10)):  # greys: no dominant colour, far from red, green and blue
        far.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), (grey, grey, grey + i % 3)).save(far / f"g{i}.png")
    (far / "notes.txt").write_text("not an image")
    result = invoke("evaluate", "--model", model, "--images", photos, "--ood", far, "--report-dir",
                    tmp_path / "r", "--quiet")
    assert result.exit_code == 0, result.output
    assert "unknown images (" in result.output and "AUROC 1.000; 100.0% of 14 flagged" in result.output
    ood = json.loads((tmp_path / "r" / "metrics.json").read_text())["ood"]
    assert ood["auroc"] == 1.0 and ood["unknown_flagged"] == 1.0 and ood["unknown_images"] == 14
    assert ood["in_class_images"] == 90 and ood["in_class_flagged"] <= 0.15
    assert ood["calibration"]["method"].startswith("mahalanobis")


def test_model_same_distribution_scores_near_a_half(model_and_photos, tmp_path: Path):
    model, photos = model_and_photos
    same = colour_images(tmp_path / "same", per_class=30, seed=2)
    result = invoke("evaluate", "--model", model, "--images", photos, "--ood", same, "--report-dir",
                    tmp_path / "r", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    ood = json.loads(result.stdout)["ood"]
    assert 0.35 < ood["auroc"] < 0.65
    assert abs(ood["unknown_flagged"] - ood["in_class_flagged"]) < 0.12


def test_model_without_an_unknown_score_is_one_error_line(tmp_path: Path):
    from test_edge import build_model

    photos = colour_images(tmp_path / "photos" / "test", per_class=2, seed=1).parent
    result = invoke("evaluate", "--model", build_model(tmp_path / "plain.onnx"), "--images", photos, "--ood", photos,
                    "--report-dir", tmp_path / "r")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "has no unknown score" in result.output
    assert len(result.output.splitlines()) == 1


def test_ood_folder_without_images_is_one_error_line(model_and_photos, tmp_path: Path):
    model, photos = model_and_photos
    (tmp_path / "empty").mkdir()
    result = invoke("evaluate", "--model", model, "--images", photos, "--ood", tmp_path / "empty", "--report-dir",
                    tmp_path / "r", "--quiet")
    assert result.exit_code == 1 and result.output.startswith("Error: --ood ")
    assert "no image there could be read" in result.output


def test_head_scores_with_the_scorer_its_export_would_carry(workspace, tmp_path: Path):
    """A head on the real (random-init MobileNetV2) store: far images are near-certainly flagged, new
    images of the same colours are not told apart from the test split."""
    from conftest import make_image_folder

    far = tmp_path / "far"
    rng = np.random.default_rng(0)
    for i in range(12):  # black-and-white noise: nothing like a noisy solid colour
        pixels = (rng.random((40, 40, 1)) > 0.5).repeat(3, axis=2).astype(np.uint8) * 255
        far.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(far / f"noise{i}.png")
    same = make_image_folder(tmp_path / "same", per_class=12, size=40, start=100)
    rows = {}
    for name, folder in (("far", far), ("same", same)):
        result = invoke("evaluate", "--store", workspace.store, "--head", workspace.head, "--ood", folder,
                        "--report-dir", tmp_path / name, "--json", "--quiet")
        assert result.exit_code == 0, result.output
        rows[name] = json.loads(result.stdout)["ood"]
    assert rows["far"]["auroc"] > 0.95 and rows["far"]["unknown_flagged"] > 0.8
    assert 0.25 < rows["same"]["auroc"] < 0.75
    assert rows["far"]["in_class_flagged"] == rows["same"]["in_class_flagged"]  # same test split, same scorer
