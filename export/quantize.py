"""Static int8 quantization of an exported model, kept only if it keeps its test accuracy.

Setting (the one reported to keep ResNet-50 within about a point): onnxruntime ``quant_pre_process``,
then ``quantize_static`` in QDQ format with per-channel int8 weights and int8 activations, MinMax
ranges calibrated on a few hundred real images of the train split. The final Softmax stays float so
probabilities keep their resolution. Weights use a 7-bit range (``reduce_range``): on x86 CPUs
without VNNI (AVX2, most small edge boxes) onnxruntime multiplies int8 pairs with VPMADDUBSW, whose
16-bit sums saturate with full-range weights, which costs accuracy (seen with EfficientNet-Lite0 on
the fruits set).

Example::

    report = quantize_checked(Path("model.onnx"), Path("model.int8.onnx"), metadata,
                              train_images, test_images, size=224, tolerance=1.0)
    print(report.table())
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from classify.scoring import scores
from export.data import LabelledImages, iter_batches
from export.metadata import graph_model_id, set_metadata
from extract.engine import onnx_session
from extract.errors import TransferKitError
from extract.files import atomic_write
from extract.steps import step

DEFAULT_CALIBRATION_IMAGES = 300
DEFAULT_TOLERANCE = 1.0  # accuracy points the int8 model may lose


def int8_path(float_path: Path) -> Path:
    """``MODEL.onnx`` -> ``MODEL.int8.onnx``."""
    return float_path.with_name(float_path.stem + ".int8" + float_path.suffix)


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds uint8 image batches (the model's real input) to the calibrator."""

    def __init__(self, images: LabelledImages, size: int, input_name: str, batch_size: int = 16,
                 progress: bool = False):
        from tqdm import tqdm

        self.images = 0
        self._input_name = input_name
        self._batches = iter_batches(images, size, batch_size)
        self._bar = tqdm(total=len(images), unit="img", desc="int8 calibration", disable=not progress,
                         leave=False)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        if batch is None:
            self._bar.close()
            return None
        self.images += len(batch[0])
        self._bar.update(len(batch[0]))
        return {self._input_name: batch[0]}


def quantize_int8(float_path: Path, out_path: Path, calibration: LabelledImages, size: int,
                  progress: bool = False) -> int:
    """Write the int8 model of ``float_path`` to ``out_path``; returns the number of calibration images."""
    model = onnx.load(str(float_path))
    input_name = model.graph.input[0].name
    keep_float = [n.name for n in model.graph.node if n.op_type == "Softmax"]
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference and graph optimisation; the symbolic pass (for dynamic shapes in
        # transformers) needs sympy, which is not a dependency and adds nothing for CNNs.
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        reader = ImageCalibrationReader(calibration, size, input_name, progress=progress)
        quantize_static(
            str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
        )
    if not reader.images:
        raise TransferKitError("no train image could be decoded to calibrate the int8 model")
    return reader.images


@dataclass
class Score:
    accuracy: float  # a fraction in [0, 1], like every accuracy in transferkit
    images_per_second: float
    images: int


def score_models(paths: dict[str, Path], images: LabelledImages, size: int, threads: int | None = None,
                 batch_size: int = 32, progress: bool = False) -> dict[str, Score]:
    """Test accuracy and throughput (batches of ``batch_size``, decode excluded) of ONNX files on the same images."""
    from tqdm import tqdm

    bar = tqdm(total=len(images), unit="img", desc=f"scoring {' and '.join(paths)}", disable=not progress,
               leave=False)
    sessions = {key: onnx_session(path, threads) for key, path in paths.items()}
    predicted: dict[str, list[np.ndarray]] = {key: [] for key in paths}
    seconds = dict.fromkeys(paths, 0.0)
    truth: list[np.ndarray] = []
    for batch, labels in iter_batches(images, size, batch_size):
        truth.append(labels)
        bar.update(len(labels))
        for key, session in sessions.items():
            started = time.perf_counter()
            probs = session.run(None, {session.get_inputs()[0].name: batch})[0]
            seconds[key] += time.perf_counter() - started
            predicted[key].append(probs.argmax(axis=1))
    bar.close()
    if not truth:
        raise TransferKitError("no test image could be decoded to measure accuracy")
    y, total = np.concatenate(truth), sum(len(t) for t in truth)
    return {key: Score(scores(y, np.concatenate(predicted[key]))["accuracy"], total / max(seconds[key], 1e-9), total)
            for key in paths}


@dataclass
class QuantizationReport:
    float_score: Score
    int8_score: Score
    tolerance: float
    accepted: bool
    path: str  # the int8 file (absent when refused)
    calibration_images: int

    @property
    def drop(self) -> float:
        """Accuracy points lost (percentage points, as ``tolerance``)."""
        return 100 * (self.float_score.accuracy - self.int8_score.accuracy)

    def table(self) -> str:
        f, q = self.float_score, self.int8_score
        return "\n".join([
            f"{'model':<8}{'test accuracy':>15}{'images/s':>11}   ({f.images} test images, batch 32)",
            f"{'float':<8}{100 * f.accuracy:>14.2f}%{f.images_per_second:>11.1f}",
            f"{'int8':<8}{100 * q.accuracy:>14.2f}%{q.images_per_second:>11.1f}",
        ])

    def to_dict(self) -> dict:
        return {**asdict(self), "drop": self.drop}


def quantize_checked(
    float_path: Path,
    out_path: Path,
    metadata: dict,
    train: LabelledImages,
    test: LabelledImages,
    size: int,
    tolerance: float = DEFAULT_TOLERANCE,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    threads: int | None = None,
    progress: bool = False,
) -> QuantizationReport:
    """Quantize, measure both models on ``test`` and keep the int8 file only if it loses at most ``tolerance`` points."""
    if not len(train):
        raise TransferKitError("int8 calibration needs train images; the folder has none in its train split")
    if not len(test):
        raise TransferKitError("checking the int8 model needs test images; the folder has none in its test split")
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        step(f"export-onnx: quantizing to int8 (calibrating on up to {calibration_images} train images)", progress)
        calibrated = quantize_int8(float_path, tmp, _spread(train, calibration_images), size, progress)
        step(f"export-onnx: measuring float and int8 on {len(test)} test images", progress)
        scores = score_models({"float": float_path, "int8": tmp}, test, size, threads, progress=progress)
        report = QuantizationReport(scores["float"], scores["int8"], tolerance, accepted=False, path="",
                                    calibration_images=calibrated)
        report.accepted = report.drop <= tolerance
        if report.accepted:
            model = onnx.load(str(tmp))
            quantization = {
                "method": "onnxruntime quantize_static", "format": "QDQ", "weights": "int8 per-channel, 7-bit range",
                "activations": "int8", "calibration": "MinMax", "calibration_images": calibrated,
                "float_model_id": metadata["model_id"], "test_accuracy_float": round(report.float_score.accuracy, 4),
                "test_accuracy_int8": round(report.int8_score.accuracy, 4), "test_images": report.int8_score.images,
            }
            kind = metadata["source"]["kind"]
            set_metadata(model, {**metadata, "quantization": quantization,
                                 "model_id": graph_model_id(model, metadata["backbone"]["name"], f"{kind}-int8")})
            with atomic_write(out_path) as final:
                onnx.save(model, str(final))
            report.path = str(out_path)
        return report
    finally:
        tmp.unlink(missing_ok=True)



def _spread(images: LabelledImages, count: int) -> LabelledImages:
    """Up to ``count`` images taken evenly over the (path-sorted, so class-grouped) list: every class calibrates."""
    if len(images) <= count:
        return images
    return images.take(np.linspace(0, len(images) - 1, count).round())
