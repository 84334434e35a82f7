"""The unknown score of an int8 export: its nodes stay float, and its threshold (the int8 scores'
quantile at the float threshold's rank on the calibration images) flags about the share of
validation images the float model flags.

The float threshold is calibrated on float distances (``classify/ood.py``); int8 features carry
quantization noise that adds to every distance: with the float threshold the int8 model of this
tiny workspace model (random-init MobileNetV2 at 32 px) flagged 60 % of the validation images where
the float model flagged none (5 % at the recalibrated threshold; run with -s to see the figures). The model is exported and quantized as ``export-onnx --quantize int8``
does it (``quantize_checked``, calibrated on the train images); the validation images take no part
in the int8 calibration.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.data import from_feature_set, load_batch
from export.onnx_export import from_head, write_checked
from export.metadata import read_metadata
from export.quantize import quantize_checked
from extract.engine import onnx_session


def _scores(path, batch: np.ndarray) -> np.ndarray:
    session = onnx_session(path, 1)
    return session.run(["ood_score"], {"image": batch})[0]


@pytest.fixture(scope="module")
def models(workspace, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8-ood")
    conversion = from_head(workspace.store, workspace.head, images_dir=None, weights=None, opset=17)
    metadata, _ = write_checked(conversion, folder / "model.onnx", parity_images=8, threads=1)
    images = conversion.images
    report = quantize_checked(folder / "model.onnx", folder / "model.int8.onnx", metadata, images.subset("train"),
                              images.subset("test"), 32, tolerance=100, threads=1)
    assert report.accepted
    return folder / "model.onnx", folder / "model.int8.onnx", metadata, images


def test_the_unknown_score_nodes_stay_float(models):
    _, int8, _, _ = models
    graph = onnx.load(str(int8)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    ood = [node for node in graph.node if "ood/" in node.name]
    assert {node.op_type for node in ood} >= {"MatMul", "Sub", "Mul", "ReduceSum", "ReduceMin"}
    matmul = next(node for node in ood if node.op_type == "MatMul")
    assert matmul.input[1] not in dequantized  # the D x k basis is the float initializer
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)  # the rest is quantized


def test_the_int8_threshold_flags_about_the_calibrated_share(models):
    float_model, int8, metadata, images = models
    threshold, ood = metadata["ood"]["threshold"], read_metadata(int8)["ood"]
    assert ood["float_threshold"] == threshold and "train images" in ood["int8_calibrated_on"]
    in_class = images.take(np.flatnonzero(images.split == "validation"))
    batch, _ = load_batch(in_class.paths, 32)
    float_scores, int8_scores = _scores(float_model, batch), _scores(int8, batch)
    float_share = np.mean(float_scores > threshold)
    unshifted, shifted = np.mean(int8_scores > threshold), np.mean(int8_scores > ood["threshold"])
    print(f"in-class flagged: float {float_share:.3f}; int8 at the float threshold {unshifted:.3f}, "
          f"at its own {shifted:.3f}")
    assert abs(shifted - float_share) <= 0.1
    assert abs(shifted - float_share) < abs(unshifted - float_share)
