"""Static int8 quantization of an ONNX model: the one setting used for extraction engines and exports.

Setting (the one reported to keep ResNet-50 within about a point): onnxruntime ``quant_pre_process``,
then ``quantize_static`` in QDQ format with per-channel int8 weights and int8 activations, MinMax
ranges calibrated on a few hundred real images. Weights use a 7-bit range (``reduce_range``): on x86
CPUs without VNNI (AVX2, most small edge boxes) onnxruntime multiplies int8 pairs with VPMADDUBSW,
whose 16-bit sums saturate with full-range weights, which costs accuracy (seen with
EfficientNet-Lite0 on the fruits set).

Example::

    batches = (load(paths[i:i + 16]) for i in range(0, len(paths), 16))  # uint8 NHWC batches
    images = quantize_int8(Path("model.onnx"), Path("model.int8.onnx"), batches)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from extract.errors import TransferKitError

# What the quantized files are, as recorded in their metadata, engine records and cache keys.
SETTINGS = {"method": "onnxruntime quantize_static", "format": "QDQ", "weights": "int8 per-channel, 7-bit range",
            "activations": "int8", "calibration": "MinMax"}


def settings(activations: str = "int8") -> dict:
    """``SETTINGS`` for activations of type ``activations`` (int8 or uint8)."""
    if activations not in ("int8", "uint8"):
        raise ValueError(f"activations must be int8 or uint8, got {activations!r}")
    return {**SETTINGS, "activations": activations}


def _reader(batches: Iterable[np.ndarray], input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class BatchReader(CalibrationDataReader):
        """Feeds uint8 image batches (the model's real input) to the calibrator and counts them."""

        def __init__(self):
            self.images = 0
            self._batches = iter(batches)

        def get_next(self) -> dict | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            self.images += len(batch)
            return {input_name: batch}

    return BatchReader()


def quantize_int8(float_path: Path, out_path: Path, batches: Iterable[np.ndarray],
                  keep_float: tuple[str, ...] = ("Softmax",), activations: str = "int8",
                  float_nodes: Iterable[str] = ()) -> int:
    """Write the int8 model of ``float_path`` to ``out_path``, calibrated on ``batches`` (uint8 NHWC).

    Nodes whose op type is in ``keep_float`` stay float (a final Softmax keeps its resolution), and
    so do the nodes named in ``float_nodes``.
    ``activations`` uint8 (weights stay int8) runs onnxruntime's U8S8 kernels, which were 2.7x
    faster than S8S8 for ResNet50 on one thread of this AVX-512 VNNI CPU (fp32 12.0, int8
    activations 14.4, uint8 39.2 images per CPU-second); int8 is what exports have always used.
    Returns the number of calibration images; raises when there were none.
    """
    settings(activations)
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(float_path))
    reader = _reader(batches, model.graph.input[0].name)
    excluded = [n.name for n in model.graph.node if n.op_type in keep_float] + list(float_nodes)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference and graph optimisation; the symbolic pass (for dynamic shapes in
        # transformers) needs sympy, which is not a dependency and adds nothing for CNNs.
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=True, weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
        )
    if not reader.images:
        raise TransferKitError("no image could be decoded to calibrate the int8 model")
    return reader.images
