"""Unknown images and the review folder at the edge, and in ``predict``, with a tiny model.

The tiny model of ``test_edge`` (channel means -> 3 colour classes) gets the unknown score that
export-onnx adds (``classify.ood_graph.add_ood_output``) on its channel-mean "features", fitted on
solid red, green and blue: a grey image has no dominant colour, is far from every class and must
be "unknown", while the solid colours are in-class.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from PIL import Image
from test_edge import COLOURS, build_model, read_results, run_edge, solid

from classify.ood import Geometry, MahalanobisScorer
from classify.ood_graph import add_ood_output
from edge import files as edge_files
from edge.files import link_or_copy
from edge.runner import review_folder_name

GREY = (128, 128, 128)


def colour_features(per_class: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Channel means of slightly varied solid colours: the tiny model's training features."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for index, colour in enumerate(COLOURS.values()):
        rows.append(np.asarray(colour, float) + rng.normal(0, 4, (per_class, 3)))
        labels += [index] * per_class
    return np.concatenate(rows), np.asarray(labels)


def build_ood_model(path: Path, scorer=None, metadata: bool = True, batch: int | str = "N") -> tuple[Path, float]:
    """The tiny model plus the ``ood_score`` output (and, unless ``metadata=False``, its ``ood`` key)."""
    build_model(path, batch=batch)
    if scorer is None:
        scorer = MahalanobisScorer().fit(*colour_features())
    model = onnx.load(str(path))
    add_ood_output(model, scorer, features="mean")
    calibration = getattr(scorer, "calibration_", {"method": "test", "threshold": 1.0})
    if metadata:
        model.metadata_props.add(key="ood", value=json.dumps(calibration))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path, calibration["threshold"]


def _geometry(scales=np.ones(3)) -> Geometry:
    """A hand-made score over the tiny model's 3 features: squared distance to 3 class means at 0."""
    return Geometry(mean=np.zeros(3), basis=np.eye(3), scales=scales, residual_scale=0.0, class_means=np.zeros((3, 3)))


def grey(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), GREY).save(path)
    return path


@pytest.fixture()
def inbox(tmp_path: Path) -> Path:
    watch = tmp_path / "in"
    solid(watch / "red.png", "red")
    solid(watch / "sub" / "green.png", "green")
    grey(watch / "grey.png")
    return watch


def by_path(results: Path) -> dict[str, dict]:
    return {line["path"]: line for line in read_results(results)}


def test_far_off_images_are_unknown_and_keep_their_best_class(tmp_path: Path, inbox: Path):
    model, threshold = build_ood_model(tmp_path / "ood.onnx")
    done = run_edge("--model", model, "--watch", inbox, "--results", tmp_path / "r.jsonl", "--once")
    assert done.returncode == 0, done.stderr
    assert f"ood_score > {threshold:g}" in done.stderr
    lines = by_path(tmp_path / "r.jsonl")
    assert set(lines) == {"red.png", "sub/green.png", "grey.png"}
    for path, colour in (("red.png", "red"), ("sub/green.png", "green")):
        assert lines[path]["label"] == colour and lines[path]["unknown"] is False
        assert 0 <= lines[path]["ood_score"] <= threshold
    assert lines["grey.png"]["unknown"] is True and lines["grey.png"]["label"] == "unknown"
    assert lines["grey.png"]["ood_score"] > threshold
    assert lines["grey.png"]["top"][0]["label"] == "red"  # equal probabilities: the first class stays first
    assert lines["grey.png"]["probability"] == lines["grey.png"]["top"][0]["probability"]


def test_unknown_off_gives_the_lines_of_a_model_without_the_score(tmp_path: Path, inbox: Path):
    model, _ = build_ood_model(tmp_path / "ood.onnx")
    off = run_edge("--model", model, "--watch", inbox, "--results", tmp_path / "off.jsonl", "--once",
                   "--unknown", "off")
    plain = run_edge("--model", build_model(tmp_path / "plain.onnx"), "--watch", inbox,
                     "--results", tmp_path / "plain.jsonl", "--once")
    assert off.returncode == 0 and plain.returncode == 0, off.stderr + plain.stderr
    assert "unknown detection: off" in off.stderr
    assert "unknown detection: not available" in plain.stderr
    for lines in (by_path(tmp_path / "off.jsonl"), by_path(tmp_path / "plain.jsonl")):
        assert lines["grey.png"]["label"] == "red"
        assert all("unknown" not in line and "ood_score" not in line for line in lines.values())


def test_score_output_without_metadata_is_ignored(tmp_path: Path, inbox: Path):
    model, _ = build_ood_model(tmp_path / "nometa.onnx", metadata=False)
    done = run_edge("--model", model, "--watch", inbox, "--results", tmp_path / "r.jsonl", "--once")
    assert done.returncode == 0, done.stderr
    assert all("unknown" not in line for line in read_results(tmp_path / "r.jsonl"))


def test_non_finite_score_is_an_error_line(tmp_path: Path, inbox: Path):
    nan_scorer = SimpleNamespace(geometry_=_geometry(scales=np.full(3, np.nan)))
    model, _ = build_ood_model(tmp_path / "nan.onnx", scorer=nan_scorer)
    done = run_edge("--model", model, "--watch", inbox, "--results", tmp_path / "r.jsonl", "--once")
    assert done.returncode == 0, done.stderr
    raw = (tmp_path / "r.jsonl").read_text()
    assert "NaN" not in raw
    assert all(line["error"] == "model produced non-finite output" for line in read_results(tmp_path / "r.jsonl"))


def test_bad_ood_metadata_is_refused(tmp_path: Path, inbox: Path):
    model, _ = build_ood_model(tmp_path / "bad.onnx", scorer=SimpleNamespace(
        geometry_=_geometry(), calibration_={"threshold": "high"}))
    done = run_edge("--model", model, "--watch", inbox, "--results", tmp_path / "r.jsonl", "--once")
    assert done.returncode == 2
    assert "metadata 'ood' must be a JSON object with a finite number 'threshold'" in done.stderr
    assert not (tmp_path / "r.jsonl").exists() or read_results(tmp_path / "r.jsonl") == []


def test_review_copies_are_hard_links_made_once(tmp_path: Path, inbox: Path):
    model, _ = build_ood_model(tmp_path / "ood.onnx")
    solid(inbox / "blue.png", "blue")
    args = ["--model", model, "--watch", inbox, "--results", tmp_path / "r.jsonl", "--once",
            "--done", tmp_path / "done", "--review", tmp_path / "review"]
    first = run_edge(*args)
    assert first.returncode == 0, first.stderr
    lines = by_path(tmp_path / "r.jsonl")
    assert lines["grey.png"]["review_copy"] == "unknown/grey.png"
    assert all("review_copy" not in lines[p] for p in ("red.png", "sub/green.png", "blue.png"))
    copy, done = tmp_path / "review" / "unknown" / "grey.png", tmp_path / "done" / "grey.png"
    assert os.path.samefile(copy, done)  # a hard link, not a second copy of the bytes
    # A crash after the review link, before the move: the line is in flight again, the file back in place.
    (tmp_path / "r.jsonl.journal").unlink()
    shutil.move(done, inbox / "grey.png")
    again = run_edge(*args)
    assert again.returncode == 0, again.stderr
    assert "recovered 1 file" in again.stderr
    assert len(read_results(tmp_path / "r.jsonl")) == 4  # no second line
    assert sorted(p.name for p in (tmp_path / "review").rglob("*") if p.is_file()) == ["grey.png"]
    assert done.exists() and not (inbox / "grey.png").exists()
    # The same crash, restarted without --review: the line is still settled, not repeated.
    (tmp_path / "r.jsonl.journal").unlink()
    shutil.move(done, inbox / "grey.png")
    plain = run_edge(*args[:-2])
    assert plain.returncode == 0 and "recovered 1 file" in plain.stderr, plain.stderr
    assert len(read_results(tmp_path / "r.jsonl")) == 4 and done.exists()


def test_review_below_copies_low_confidence_images_under_their_label(tmp_path: Path, inbox: Path):
    results = tmp_path / "r.jsonl"
    args = ["--model", build_model(tmp_path / "plain.onnx"), "--watch", inbox, "--results", results, "--once",
            "--review", tmp_path / "review", "--review-below", "0.5"]
    first = run_edge(*args)
    assert first.returncode == 0, first.stderr
    lines = by_path(results)
    assert lines["grey.png"]["review_copy"] == "red/grey.png"  # probability 1/3 < 0.5
    assert "review_copy" not in lines["red.png"]
    assert (tmp_path / "review" / "red" / "grey.png").read_bytes() == (inbox / "grey.png").read_bytes()
    again = run_edge(*args)  # files stay in place (no --done): nothing is classified or copied twice
    assert again.returncode == 0 and len(read_results(results)) == 3
    assert [p.name for p in (tmp_path / "review").rglob("*") if p.is_file()] == ["grey.png"]


def test_review_below_needs_review(tmp_path: Path, inbox: Path):
    done = run_edge("--model", build_model(tmp_path / "m.onnx"), "--watch", inbox, "--results",
                    tmp_path / "r.jsonl", "--review-below", "0.5")
    assert done.returncode == 2 and "--review-below needs --review" in done.stderr


def test_link_or_copy_copies_when_links_are_impossible(tmp_path: Path, monkeypatch):
    src = tmp_path / "a.png"
    src.write_bytes(b"pixels")

    def no_links(*_args, **_kwargs):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(edge_files.os, "link", no_links)
    link_or_copy(str(tmp_path), "a.png", str(tmp_path), "b.png")
    assert (tmp_path / "b.png").read_bytes() == b"pixels" and not os.path.samefile(src, tmp_path / "b.png")
    link_or_copy(str(tmp_path), "a.png", str(tmp_path), "b.png")  # idempotent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    (tmp_path / "c.png").write_bytes(b"other")
    with pytest.raises(FileExistsError):
        link_or_copy(str(tmp_path), "a.png", str(tmp_path), "c.png")


def test_review_folder_names_stay_inside_the_review_folder():
    assert review_folder_name("cat") == "cat"
    assert review_folder_name("../../etc") == "_.._.._etc"
    assert review_folder_name("a/b") == "a_b"
    assert review_folder_name(".hidden") == "_.hidden"
    assert review_folder_name("") == "_"


def test_predict_reports_unknown_images_like_the_edge(tmp_path: Path, inbox: Path):
    from click.testing import CliRunner

    from cli import cli

    model, threshold = build_ood_model(tmp_path / "ood.onnx")

    def predict(*extra: str):
        result = CliRunner().invoke(cli, ["predict", "--model", str(model), str(inbox), *extra])
        assert result.exit_code == 0, result.output
        return result

    rows = {Path(r["image"]).name: r for r in map(json.loads, predict("--json", "--quiet").stdout.splitlines())}
    assert rows["grey.png"]["label"] == "unknown" and rows["grey.png"]["unknown"] is True
    assert rows["grey.png"]["ood_score"] > threshold and rows["grey.png"]["top"][0]["label"] == "red"
    assert rows["red.png"]["label"] == "red" and rows["red.png"]["unknown"] is False
    assert rows["red.png"]["ood_score"] <= threshold
    text = predict().output
    assert f"unknown when ood_score > {threshold:.4g}" in text
    assert f"{inbox / 'grey.png'}: unknown (best red 0.333, ood_score" in text
    off = [json.loads(line) for line in predict("--json", "--quiet", "--unknown", "off").stdout.splitlines()]
    assert all("unknown" not in r and "ood_score" not in r for r in off)
    assert {Path(r["image"]).name: r["label"] for r in off}["grey.png"] == "red"


def test_fixed_batch_models_score_every_image(tmp_path: Path):
    from edge.model import load_model

    scorer = MahalanobisScorer().fit(*colour_features())
    images = np.stack([np.full((16, 16, 3), c, np.uint8) for c in [*COLOURS.values(), GREY, GREY]])
    scores = {}
    for batch in ("N", 2):
        path, _ = build_ood_model(tmp_path / f"b{batch}.onnx", scorer, batch=batch)
        probs, scores[batch] = load_model(path, threads=1).predict_scores(images)
        assert probs.shape == (5, 3)
    assert scores[2].shape == (5,)
    np.testing.assert_allclose(scores[2], scores["N"], rtol=1e-5)
    np.testing.assert_allclose(scores["N"], scorer.score_samples(images.mean(axis=(1, 2))), rtol=1e-3)
    assert (scores["N"][3:] > scorer.threshold_).all() and (scores["N"][:3] <= scorer.threshold_).all()


def test_ood_cost_bench_compares_the_model_with_its_score_pruned(tmp_path: Path, inbox: Path):
    from bench.edge_ood_bench import compare, to_markdown, without_ood
    from edge.model import load_model

    model, _ = build_ood_model(tmp_path / "ood.onnx")
    pruned = load_model(without_ood(model, tmp_path / "plain.onnx"), threads=1)
    full = load_model(model, threads=1)
    assert pruned.ood is None and [o.name for o in pruned.session.get_outputs()] == ["probabilities"]
    assert pruned.model_id == full.model_id + "-without-ood"
    images = np.stack([np.full((16, 16, 3), c, np.uint8) for c in [*COLOURS.values(), GREY]])
    np.testing.assert_array_equal(pruned.predict(images), full.predict(images))  # only the score is gone
    with pytest.raises(ValueError, match="no ood_score output"):
        without_ood(tmp_path / "plain.onnx", tmp_path / "again.onnx")

    result = compare(model, "tiny", inbox, threads=1, batch=2, repeats=1, limit=8)
    assert result["runner_images"] == 3 and result["inference_images"] == 3
    assert result["model_ids"]["without"] == full.model_id + "-without-ood"
    for part in ("inference", "runner"):
        assert result[part]["with ood_score"]["cpu_ms_per_image"]["median"] > 0
    text = to_markdown(result)
    assert "| inference alone: CPU ms per image |" in text and "Load average" in text
