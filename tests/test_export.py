"""ONNX export: from store + head and from a fine-tuned model, parity, metadata, int8, refusals.

Tiny models throughout: MobileNetV2 with random weights at 32 px on generated coloured squares.
The store, the heads and the fine-tuned model are session fixtures of ``conftest.py`` (``workspace``,
``fine_tuned``), shared with ``test_finetune.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import STORE_SEED

from cli import cli
from export.data import from_feature_set
from export.keras_models import load_fine_tuned, save_fine_tuned, sidecar_path
from export.metadata import REQUIRED_KEYS, graph_model_id, read_metadata
from export.onnx_export import Conversion, export_onnx, from_head, write_checked
from export.parity import ParityError, compare
from extract.errors import TransferKitError
from extract.version import __version__


@pytest.fixture(scope="session")
def head_conversion(workspace) -> Conversion:
    return from_head(workspace.store, workspace.head, images_dir=None, weights=None, opset=17)


@pytest.fixture(scope="session")
def head_export(head_conversion, tmp_path_factory):
    """The float export of store + head (export_onnx itself runs in the CLI tests)."""
    out = tmp_path_factory.mktemp("head-export") / "model.onnx"
    return out, write_checked(head_conversion, out, parity_images=64, threads=None)


def test_head_export_parity_and_graph(head_export):
    out, (_, parity) = head_export
    assert parity.ok and parity.images == 60
    assert parity.max_abs_diff <= 1e-4 and parity.top1_agreement == 1.0
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (outp, ood) = model.graph.input, model.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim] == ["N", 32, 32, 3]
    assert outp.name == "probabilities" and outp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert ood.name == "ood_score" and [d.dim_param for d in ood.type.tensor_type.shape.dim] == ["N"]
    assert not list(out.parent.glob("*tmp*"))


def test_head_export_predicts_like_the_head_on_store_features(head_export, workspace):
    """The edge runner's view of the file: same classes and probabilities as the head on the stored features."""
    from classify.persist import load_head
    from edge.model import load_model
    from export.data import load_batch

    out, _ = head_export
    edge = load_model(out, threads=1)
    features = workspace.features()
    trained = load_head(workspace.head)
    assert edge.class_names == trained.class_names == features.class_names
    images = from_feature_set(features)
    batch, kept = load_batch(images.paths, 32)
    assert len(kept) == len(images)
    np.testing.assert_allclose(edge.predict(batch), trained.predict_proba(features.features), atol=1e-4)


def test_unknown_score_is_in_the_graph_and_calibrated_without_test(head_export, workspace):
    """The second output is the scorer fitted on the store's train + validation rows; the metadata
    carries its threshold; the graph computes what the scorer computes on the stored features."""
    import onnxruntime as ort

    from classify.ood import MahalanobisScorer
    from export.data import load_batch

    out, (metadata, _) = head_export
    features = workspace.features()
    rows = features.splits != "test"
    scorer = MahalanobisScorer().fit(features.features[rows], features.labels[rows])
    assert metadata["ood"] == read_metadata(out)["ood"] == scorer.calibration_
    assert metadata["ood"]["calibrated_on"] == f"5-fold out-of-fold scores of {rows.sum()} in-class images"
    batch, kept = load_batch(from_feature_set(features).paths, 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    _, scores = session.run(None, {"image": batch})
    np.testing.assert_allclose(scores, scorer.score_samples(features.features), rtol=2e-3, atol=1e-2)


def test_unknown_off_neither_fits_nor_computes_the_score(workspace, tmp_path, monkeypatch):
    from classify.ood import MahalanobisScorer

    def refuse(*args, **kwargs):
        raise AssertionError("the unknown score was fitted with --unknown off")

    monkeypatch.setattr(MahalanobisScorer, "fit", refuse)
    out = tmp_path / "plain.onnx"
    done = CliRunner().invoke(cli, ["export-onnx", "--store", str(workspace.store), "--head", str(workspace.head),
                                    "--out", str(out), "--unknown", "off", "--parity-images", "4", "--quiet"])
    assert done.exit_code == 0, done.output
    graph = onnx.load(str(out)).graph
    assert [o.name for o in graph.output] == ["probabilities"]
    assert not [node for node in graph.node if "ood/" in node.name] and "ood" not in read_metadata(out)


def test_drift_reference_is_the_heads_view_of_the_held_out_test_split(head_export, workspace):
    """The edge's drift gauges compare with this: the head's predicted class mix and mean top
    probability on the test rows (the validation rows trained the head)."""
    from classify.persist import load_head
    from edge.model import load_model

    out, (metadata, _) = head_export
    features = workspace.features()
    rows = np.asarray(features.splits) == "test"
    probabilities = load_head(workspace.head).predict_proba(features.features[rows])
    reference = read_metadata(out)["drift_reference"]
    assert reference == metadata["drift_reference"] and (reference["split"], reference["rows"]) == ("test", rows.sum())
    shares = np.bincount(probabilities.argmax(axis=1), minlength=3) / rows.sum()
    assert [reference["class_share"][name] for name in features.class_names] == pytest.approx(shares, abs=1e-6)
    assert reference["mean_confidence"] == pytest.approx(probabilities.max(axis=1).mean(), abs=1e-6)
    assert load_model(out, threads=1).drift_reference == reference  # the edge accepts it


def test_metadata_round_trip(head_export, workspace):
    out, (metadata, _) = head_export
    meta = read_metadata(out)
    assert set(REQUIRED_KEYS) <= set(meta)
    raw = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    for key in ("class_names", "input_size", "preprocessing", "backbone", "source"):
        assert json.loads(raw[key]) == meta[key]
    features = workspace.features()
    assert meta["class_names"] == features.class_names == ["blue", "green", "red"]
    assert meta["input_size"] == [32, 32]
    assert (meta["layout"], meta["input_dtype"]) == ("NHWC", "uint8")
    assert meta["preprocessing"] == {"mode": "tf", "in_graph": True, "color": "RGB", "resize": "bilinear"}
    assert meta["backbone"]["name"] == "mobilenet_v2"
    assert meta["backbone"]["weights"]["id"] == f"random-init:seed={STORE_SEED}"
    source = meta["source"]
    assert source["kind"] == "head" and source["head_kind"] == "softmax"
    assert Path(source["store"]) == workspace.store.resolve() and Path(source["head"]) == workspace.head.resolve()
    assert re.fullmatch(r"[0-9a-f]{64}", source["store_sha256"]) and re.fullmatch(r"[0-9a-f]{64}", source["head_fingerprint"])
    assert re.fullmatch(r"mobilenet_v2-head-[0-9a-f]{12}", meta["model_id"])
    assert meta["model_id"] == graph_model_id(onnx.load(str(out)), "mobilenet_v2", "head")
    assert meta["transferkit_version"] == __version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["created"])
    assert "quantization" not in meta and metadata == meta


def test_backbone_record_is_carried_unchanged(head_export, workspace):
    """The record written at extraction is the one in the head file, the ONNX metadata and the edge
    runner's view: equal dicts, extraction-only fields (engine, dtype, created) included."""
    import h5py

    from edge.model import load_model

    out, _ = head_export
    with h5py.File(workspace.store, "r") as f:
        in_store = json.loads(f["backbones/mobilenet_v2"].attrs["record"])
    in_head = json.loads((workspace.head / "head.json").read_text())["backbone"]
    in_onnx = read_metadata(out)["backbone"]
    at_edge = load_model(out, threads=1).backbone
    assert in_store == in_head == in_onnx == at_edge == workspace.features().backbone.to_dict()
    assert in_store["record_version"] == 2 and in_store["engine"] == "keras" and in_store["dtype"] == "float32"
    assert in_store["weights"] == {"kind": "none", "id": f"random-init:seed={STORE_SEED}", "sha256": None,
                                   "file": None, "seed": STORE_SEED}
    assert in_onnx["preprocessing"] == {k: v for k, v in read_metadata(out)["preprocessing"].items() if k != "in_graph"}


def test_int8_accepted_then_refused_via_cli(workspace, head_export, tmp_path):
    out = tmp_path / "model.onnx"
    runner = CliRunner()
    accepted = runner.invoke(cli, ["export-onnx", "--store", str(workspace.store), "--head", str(workspace.head),
                                   "--out", str(out), "--quantize", "int8", "--tolerance", "100"])
    assert accepted.exit_code == 0, accepted.output
    assert "float" in accepted.output and "int8" in accepted.output and "images/s" in accepted.output
    # every long step says what it does on stderr, calibration and scoring with a bar over the images
    for said in ("export-onnx: loading the model and converting it to ONNX (tf2onnx)...",
                 "export-onnx: quantizing to int8 (calibrating on up to 300 train images)...",
                 "int8 calibration: ", "export-onnx: measuring float and int8 on ", "scoring float and int8: "):
        assert said in accepted.stderr and said not in accepted.stdout, said
    int8 = tmp_path / "model.int8.onnx"
    meta, float_meta = read_metadata(int8), read_metadata(out)
    assert meta["quantization"]["format"] == "QDQ" and meta["quantization"]["calibration_images"] > 0
    assert meta["quantization"]["float_model_id"] == float_meta["model_id"] != meta["model_id"]
    assert meta["class_names"] == float_meta["class_names"] and meta["source"] == float_meta["source"]
    assert meta["backbone"] == float_meta["backbone"]
    assert 0 <= meta["quantization"]["test_accuracy_int8"] <= 1  # a fraction, like every accuracy
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)

    refused = runner.invoke(cli, ["export-onnx", "--store", str(workspace.store), "--head", str(workspace.head),
                                  "--out", str(out), "--quantize", "int8", "--tolerance", "-1", "--quiet"])
    assert refused.exit_code == 1 and "export-onnx:" not in refused.stderr and "calibration" not in refused.stderr
    assert "int8 refused" in refused.output and "kept the float model" in refused.output
    assert out.is_file() and not int8.exists()  # the earlier int8 file belonged to another export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    # three conversions of the same store + head (tf2onnx names differ each time): one model_id
    assert read_metadata(out)["model_id"] == float_meta["model_id"] == head_export[1][0]["model_id"]


def test_export_from_fine_tuned_model(fine_tuned, workspace, tmp_path):
    model_path, _ = fine_tuned
    out = tmp_path / "fine.onnx"
    result = CliRunner().invoke(cli, ["export-onnx", "--model", str(model_path), "--out", str(out),
                                      "--parity-images", "20"])
    assert result.exit_code == 0, result.output
    assert "parity on 20 images" in result.output
    meta = read_metadata(out)
    info = json.loads(sidecar_path(model_path).read_text())
    assert meta["class_names"] == info["class_names"]
    assert meta["source"]["kind"] == "fine-tuned" and meta["source"]["model_sha256"] == info["model_sha256"]
    assert meta["source"]["head"]["kind"] == "softmax"
    assert meta["backbone"] == info["backbone"] == workspace.features().backbone.to_dict()  # the store's, carried
    assert meta["model_id"].startswith("mobilenet_v2-fine-tuned-")
    model, _ = load_fine_tuned(model_path)
    from edge.model import load_model
    from export.data import load_batch

    images = from_feature_set(workspace.features())
    batch, _ = load_batch(images.paths[:8], 32)
    np.testing.assert_allclose(load_model(out, 1).predict(batch), np.asarray(model(batch, training=False)), atol=1e-4)


def test_parity_failure_leaves_no_file(head_conversion, tmp_path):
    c = head_conversion
    off = replace(c, reference=lambda batch: c.reference(batch) + 1e-3)
    out = tmp_path / "model.onnx"
    with pytest.raises(ParityError, match=r"export refused.*tolerance 1e-04"):
        write_checked(off, out, parity_images=4, threads=1)
    assert list(tmp_path.iterdir()) == []


def test_compare_needs_small_differences_and_the_same_top1():
    reference = np.array([[0.5, 0.4, 0.1], [0.9, 0.1, 0.0]], np.float32)
    assert compare(reference, reference + np.float32(5e-5)).ok
    assert not compare(reference, reference + np.float32(2e-4)).ok
    candidate = reference.copy()
    candidate[0] = reference[0, [1, 0, 2]]
    flipped = compare(reference, candidate, atol=1.0)
    assert not flipped.ok and flipped.top1_agreement == 0.5


def test_refuses_head_trained_on_other_weights(workspace, tmp_path):
    config = json.loads((workspace.head / "head.json").read_text())
    config["backbone"]["weights"]["id"] = "random-init:seed=99"
    other = tmp_path / "head"
    other.mkdir()
    (other / "weights.npz").write_bytes((workspace.head / "weights.npz").read_bytes())
    (other / "head.json").write_text(json.dumps(config))
    with pytest.raises(TransferKitError, match="random-init:seed=99"):
        export_onnx(tmp_path / "m.onnx", store=workspace.store, head=other)
    assert not (tmp_path / "m.onnx").exists()


def test_refuses_weights_other_than_the_heads(workspace, tmp_path):
    weights_file = tmp_path / "other.weights.h5"
    weights_file.write_bytes(b"\x89HDF\r\n\x1a\n" + b"not the weights the head was trained with")  # passes the format check
    with pytest.raises(TransferKitError, match=r"random-init:seed=3.*other\.weights\.h5"):
        export_onnx(tmp_path / "m.onnx", store=workspace.store, head=workspace.head, weights=str(weights_file))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--out", "m.onnx"], "give either --model"),
    (["--out", "m.onnx", "--store", "STORE"], "--store and --head go together"),
    (["--out", "m.txt", "--store", "STORE", "--head", "HEAD"], "must end in .onnx"),
    (["--out", "m.onnx", "--model", "missing.keras"], "does not exist"),
])
def test_cli_refusals(workspace, tmp_path, args, message):
    args = [str(workspace.store) if a == "STORE" else str(workspace.head) if a == "HEAD" else a for a in args]
    result = CliRunner().invoke(cli, ["export-onnx", *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_model_without_or_with_stale_sidecar_is_refused(fine_tuned, tmp_path):
    model_path, _ = fine_tuned
    copy = tmp_path / "copy.keras"
    copy.write_bytes(model_path.read_bytes())
    with pytest.raises(TransferKitError, match="no copy.keras.json"):
        export_onnx(tmp_path / "m.onnx", model=copy)
    sidecar_path(copy).write_text(sidecar_path(model_path).read_text())
    copy.write_bytes(model_path.read_bytes() + b"\0")
    with pytest.raises(TransferKitError, match="describes another model file"):
        load_fine_tuned(copy)


def test_keras_files_load_in_safe_mode_only(tmp_path):
    import keras

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    path = tmp_path / "lambda.keras"
    save_fine_tuned(keras.Model(inputs, outputs), path, {"class_names": ["a", "b"]})
    with pytest.raises(TransferKitError, match="cannot load .* safely"):
        load_fine_tuned(path)
