"""Heads over several backbones (``--backbone a+b``) and mirror-averaged features (``extract --tta flip``).

Generated images and tiny random-weight backbones at 32-40 px: MobileNetV2, and VGG16 where a model is
exported (its 512 features keep the export's unknown-score fit, an eigendecomposition of the features'
covariance, fast).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fake_record, make_image_folder

from classify.data import features_for_head
from classify.joined import JoinedEngine, read_features
from classify.persist import load_head
from classify.train import fit_heads
from cli import cli
from extract.job import run_extraction
from extract.record import RECORD_VERSION, BackboneRecord
from extract.store import BackboneRows, FeatureStore, empty_state, read_state, write_state
from extract.tta import mirror_averaged, mirrored

REPO = Path(__file__).resolve().parents[1]
A, B = "mobilenet_v2", "vgg16"  # registered names (the CLI checks them) for made-up 4- and 3-wide features
AB = f"{A}+{B}"


def _two_backbone_store(path: Path) -> tuple[Path, dict]:
    """Backbone ``A`` (4 wide) on every image, ``B`` (3 wide) on all but two, in another row order;
    one image's ``B`` row is for other content (another sha256). Returns the store and the rows by path."""
    rng = np.random.default_rng(0)
    state = empty_state(images_root="/nonexistent", seed=0, validation_split=0.2, test_split=0.2,
                        layout="class-folders")
    state.classes = ["cat", "dog"]
    rows = {}
    for label, name in enumerate(state.classes):
        for i in range(12):
            split = "test" if i >= 10 else "train"
            relpath = f"{name}/{i:02d}.jpg"
            for column, value in (("path", relpath), ("sha256", f"sha-{relpath}"), ("class_name", name),
                                  ("split", split), ("size", 1), ("mtime_ns", 0)):
                getattr(state.images, column).append(value)
            rows[relpath] = (rng.normal(label * 3, 1, 4), rng.normal(label * 3, 1, 3))
    paths = list(rows)
    b_paths = [p for p in reversed(paths) if p not in ("cat/00.jpg", "dog/05.jpg")]
    b_shas = [("stale" if p == "cat/01.jpg" else f"sha-{p}") for p in b_paths]
    state.backbones[A] = BackboneRows(fake_record(A, 4), paths, [f"sha-{p}" for p in paths],
                                        np.asarray([rows[p][0] for p in paths], np.float32))
    state.backbones[B] = BackboneRows(fake_record(B, 3, weights_seed=1), b_paths, b_shas,
                                        np.asarray([rows[p][1] for p in b_paths], np.float32))
    write_state(path, state)
    return path, rows


def test_joined_rows_are_the_images_every_backbone_has(tmp_path):
    store, rows = _two_backbone_store(tmp_path / "s.h5")
    features = read_features(store, AB)
    missing = {"cat/00.jpg", "dog/05.jpg", "cat/01.jpg"}  # no b row, no b row, b row of other content
    assert features.paths == [p for p in FeatureStore(store).read(A).paths if p not in missing]
    expected = np.asarray([np.concatenate(rows[p]) for p in features.paths], np.float32)
    np.testing.assert_array_equal(features.features, expected)
    assert [r.name for r in features.records] == [A, B]
    assert read_features(store, f"{B}+{A}").features[:, :3].tolist() == features.features[:, 4:].tolist()


def test_joined_head_records_every_backbone_and_predicts_on_the_join(tmp_path):
    store, _ = _two_backbone_store(tmp_path / "s.h5")
    (row,) = fit_heads(store, kind="softmax", backbone=AB, out=tmp_path / "head", folds=2)
    assert row["backbone"] == AB and row["n_train"] == 17  # 20 train images, 3 lack a b row of their content
    config = json.loads((tmp_path / "head" / "head.json").read_text())
    assert [r["name"] for r in config["backbones"]] == [A, B] and config["backbone"]["name"] == A
    assert config["n_features"] == 7 and config["format_version"] == 2
    trained = load_head(tmp_path / "head")
    assert [r.name for r in trained.records] == [A, B]
    features = features_for_head(trained, store)
    np.testing.assert_array_equal(features.features, read_features(store, AB).features)
    report = CliRunner().invoke(cli, ["evaluate", "--store", str(store), "--head", str(tmp_path / "head"),
                                      "--report-dir", str(tmp_path / "report"), "--json"])
    assert report.exit_code == 0, report.output
    metrics = json.loads(report.output.strip().splitlines()[-1])
    assert metrics["n"] == 4 and metrics["backbone"] == AB and metrics["same_store_as_training"]


def test_single_backbone_head_files_keep_format_1(tmp_path):
    store, _ = _two_backbone_store(tmp_path / "s.h5")
    fit_heads(store, kind="softmax", backbone=A, out=tmp_path / "head", folds=2)
    config = json.loads((tmp_path / "head" / "head.json").read_text())
    assert config["format_version"] == 1 and "backbones" not in config


@pytest.mark.parametrize("backbone, message", [
    (f"{A}+xception", "has no features for xception"),
    (f"{A}+{A}", "names a backbone twice"),
])
def test_fit_head_refuses_a_missing_or_repeated_backbone_in_one_line(tmp_path, backbone, message):
    store, _ = _two_backbone_store(tmp_path / "s.h5")
    result = CliRunner().invoke(cli, ["fit-head", "--store", str(store), "--kind", "softmax",
                                      "--backbone", backbone, "--out", str(tmp_path / "head")])
    assert result.exit_code == 1
    assert result.output.count("Error:") == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "head").exists()


def test_backbone_option_takes_joined_and_suffixed_names(tmp_path):
    store, _ = _two_backbone_store(tmp_path / "s.h5")
    ok = CliRunner().invoke(cli, ["fit-head", "--store", str(store), "--kind", "svm", "--out", "h",
                                  "--backbone", "efficientnet_lite0@flip+efficientnet_lite1"])
    assert ok.exit_code == 1 and "has no features for efficientnet_lite0@flip, efficientnet_lite1" in ok.output
    bad = CliRunner().invoke(cli, ["fit-head", "--store", str(store), "--kind", "svm", "--out", "h",
                                   "--backbone", f"{A}+nonsense"])
    assert bad.exit_code == 1 and bad.output.count("Error:") == 1 and "has no features for nonsense" in bad.output


def test_store_lacking_one_of_the_heads_backbones_is_refused(tmp_path):
    store, _ = _two_backbone_store(tmp_path / "s.h5")
    fit_heads(store, kind="softmax", backbone=AB, out=tmp_path / "head", folds=2)
    only_a = read_state(store)
    del only_a.backbones[B]
    write_state(tmp_path / "only-a.h5", only_a)
    only_a = tmp_path / "only-a.h5"
    result = CliRunner().invoke(cli, ["evaluate", "--store", str(only_a), "--head", str(tmp_path / "head"),
                                      "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == 1 and result.output.count("Error:") == 1
    assert f"trained on {AB} features" in result.output


# ------------------------------------------------------------ mirror-averaged features (extract --tta flip)


@pytest.fixture(scope="module")
def flip_store(tmp_path_factory):
    """Generated images; a store with MobileNetV2 (random, 40 px) plain and mirror-averaged, and VGG16
    (random) plain at 32 px and mirror-averaged at 40 px."""
    root = tmp_path_factory.mktemp("flip")
    images = make_image_folder(root / "images", per_class=8, size=48)
    store = root / "features.h5"
    common = dict(weights="none", input_size=40, seed=1, validation_split=0.2, test_split=0.2, engine="keras",
                  progress=False)
    run_extraction(images, store, backbone="mobilenet_v2", **common)
    run_extraction(images, store, backbone="mobilenet_v2", tta="flip", **common)
    run_extraction(images, store, backbone="vgg16", tta="flip", **common)
    run_extraction(images, store, backbone="vgg16", **{**common, "input_size": 32})
    return root, images, store


def test_flip_features_have_their_own_name_and_record(flip_store):
    _, images, store = flip_store
    reader = FeatureStore(store)
    assert set(reader.backbones) == {"mobilenet_v2", "mobilenet_v2@flip", "vgg16", "vgg16@flip"}
    plain, flip = reader.read("mobilenet_v2"), reader.read("mobilenet_v2@flip")
    assert flip.backbone.tta == "flip" and plain.backbone.tta is None
    assert reader.root.backbones["mobilenet_v2@flip"].record["record_version"] == RECORD_VERSION
    assert reader.root.backbones["mobilenet_v2"].record["record_version"] == 2  # older readers still read plain
    assert not plain.backbone.same_features(flip.backbone)
    scale = np.abs(plain.features).max()
    assert plain.paths == flip.paths and np.abs(plain.features - flip.features).max() > 1e-3 * scale


def test_flip_rows_are_the_mean_of_the_image_and_its_mirror(flip_store):
    """The stored row = the engine's features of the image and of its mirror image, averaged."""
    from edge.imageio import load_image
    from extract.engine import open_engine

    _, images, store = flip_store
    features = FeatureStore(store).read("mobilenet_v2@flip")
    engine = open_engine(features.backbone, "none", engine="keras")
    batch = np.stack([load_image(images / p, (40, 40)) for p in features.paths[:6]])
    expected = (engine(batch) + engine(mirrored(batch))) / 2
    scale = np.abs(expected).max()
    np.testing.assert_allclose(features.features[:6] / scale, expected / scale, atol=1e-5)
    np.testing.assert_allclose(mirror_averaged(engine, batch), expected, rtol=1e-5, atol=1e-6 * scale)


def test_flip_and_plain_rows_never_mix(flip_store, tmp_path):
    """Re-running plain extraction leaves the flip rows alone, and a store made plain cannot take a
    head trained on flip features."""
    root, images, store = flip_store
    again = run_extraction(images, store, backbone="mobilenet_v2", weights="none", engine="keras", progress=False)
    assert again.backbone == "mobilenet_v2" and again.extracted == 0
    fit_heads(store, kind="softmax", backbone="mobilenet_v2@flip", out=tmp_path / "head", folds=2)
    plain_only = tmp_path / "plain.h5"
    run_extraction(images, plain_only, backbone="mobilenet_v2", weights="none", input_size=40, seed=1,
                   validation_split=0.2, test_split=0.2, engine="keras", progress=False)
    result = CliRunner().invoke(cli, ["evaluate", "--store", str(plain_only), "--head", str(tmp_path / "head"),
                                      "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == 1 and "trained on mobilenet_v2@flip features" in result.output


def test_record_with_unknown_tta_is_refused():
    from extract.record import RecordError

    data = fake_record(A, 4).to_dict()
    with pytest.raises(RecordError, match="unknown tta"):
        BackboneRecord.from_dict({**data, "tta": "rotate"})
    assert BackboneRecord.from_dict({**data, "tta": "flip"}).record_version == RECORD_VERSION


# ------------------------------------------------------------ the composed export


@pytest.fixture(scope="module")
def composed_export(flip_store):
    root, images, store = flip_store
    head = root / "head-joined"
    fit_heads(store, kind="softmax", backbone="vgg16+vgg16@flip", out=head, folds=2)
    out = root / "model.onnx"
    result = CliRunner().invoke(cli, ["export-onnx", "--store", str(store), "--head", str(head), "--out", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    return head, out, result.output


def _blocks_match_the_store(got: np.ndarray, stored: np.ndarray) -> None:
    """Columns 512.. (vgg16@flip at 40 px, the input size) equal the stored features; columns ..512
    (vgg16 at 32 px, resized from the 40 px image) are close to the stored ones, which were decoded
    straight to 32 px from the 48 px files: another path to the same size."""
    scale = np.abs(stored).max(axis=0) + 1e-30
    np.testing.assert_allclose(got[:, 512:] / scale[512:], stored[:, 512:] / scale[512:], atol=1e-4)
    relative = np.linalg.norm(got[:, :512] - stored[:, :512], axis=1) / np.linalg.norm(stored[:, :512], axis=1)
    assert relative.max() < 0.15


def test_composed_export_is_one_graph_that_matches_the_stored_features(composed_export, flip_store):
    """One uint8 input at the largest size; both backbones (one mirror-averaged in the graph, one resized
    in the graph) and the head; ONNX = the composed Keras model (export's parity check), whose features
    are the stored ones."""
    import onnx

    from edge.model import load_model
    from export.composite import build_feature_model
    from export.data import load_batch
    from export.metadata import read_metadata

    _, _, store = flip_store
    head, out, output = composed_export
    assert "top-1 agreement 100.0%" in output
    model = onnx.load(str(out))
    assert len(model.graph.input) == 1 and {"Resize", "Concat"} <= {node.op_type for node in model.graph.node}
    meta = read_metadata(out)
    assert [b["name"] for b in meta["backbones"]] == ["vgg16", "vgg16"] and meta["backbone"]["name"] == "vgg16"
    assert [b.get("tta") for b in meta["backbones"]] == [None, "flip"] and meta["input_size"] == [40, 40]
    trained = load_head(head)
    features = features_for_head(trained, store)
    batch, kept = load_batch([Path(features.store_attrs["images_root"]) / p for p in features.paths], 40)
    assert len(kept) == len(features.paths)
    composed = np.asarray(build_feature_model(trained.records)(batch, training=False))
    _blocks_match_the_store(composed, features.features)
    probabilities = load_model(out, threads=1).predict(batch)
    np.testing.assert_allclose(probabilities, trained.predict_proba(composed), atol=1e-4)


def test_edge_runner_runs_the_composed_model(composed_export, flip_store, tmp_path):
    _, images, _ = flip_store
    _, out, _ = composed_export
    watch = tmp_path / "watch"
    watch.mkdir()
    for name in ["red", "green", "blue"]:
        (watch / f"{name}.jpg").write_bytes((images / name / "img_0.jpg").read_bytes())
    results = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, "-m", "edge", "--model", str(out), "--watch", str(watch), "--results",
                           str(results), "--done", str(tmp_path / "done"), "--once"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == 3 and all("label" in line and line["probability"] > 0 for line in lines)


def test_predict_with_a_joined_head_runs_every_backbone_at_its_size(composed_export, flip_store):
    """``predict --head``: the decoded image goes to each backbone at its own size, mirror-averaged as
    its record says, concatenated in the head's order."""
    _, images, store = flip_store
    head, _, _ = composed_export
    trained = load_head(head)
    engine = trained.open_engine(engine="keras")
    assert isinstance(engine, JoinedEngine) and trained.input_size == 40
    features = features_for_head(trained, store)
    from edge.imageio import load_image

    batch = np.stack([load_image(Path(features.store_attrs["images_root"]) / p, (40, 40))
                      for p in features.paths[:4]])
    _blocks_match_the_store(engine(batch), features.features[:4])
    result = CliRunner().invoke(cli, ["predict", "--head", str(head), str(images / "red" / "img_0.jpg"),
                                      "--engine", "keras", "--quiet"])
    assert result.exit_code == 0, result.output


def test_fine_tune_refuses_a_head_no_single_backbone_computes(tmp_path):
    from classify.errors import HeadMismatch

    store, _ = _two_backbone_store(tmp_path / "s.h5")
    fit_heads(store, kind="softmax", backbone=AB, out=tmp_path / "head", folds=2)
    with pytest.raises(HeadMismatch, match=re.escape(f"takes {AB} features, which no single backbone computes")):
        load_head(tmp_path / "head").build_backbone()
