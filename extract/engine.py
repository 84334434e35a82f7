"""Inference engines that turn uint8 image batches into features.

``keras``: the Keras model itself. ``onnx``: the same model converted once with tf2onnx, cached under
``cache_dir("engines")`` and run by onnxruntime, which is 1.5-3x faster than Keras on small CPUs.
The conversion is accepted only if its features match Keras on a probe batch within
``ONNX_TOLERANCE`` (max absolute difference relative to the largest feature magnitude).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from typing import TYPE_CHECKING

from extract.errors import TransferKitError
from extract.files import write_atomic
from extract.paths import cache_dir
from extract.record import BackboneRecord
from extract.weights import resolve_record_weights

if TYPE_CHECKING:  # importing extract.models loads TensorFlow; a cached ONNX engine does not need it
    from extract.models import BuiltBackbone

ONNX_TOLERANCE = 1e-3
ENGINES = ("auto", "onnx", "keras")


class KerasEngine:
    name = "keras"
    streams = 1  # TensorFlow spreads one batch over every core itself

    def __init__(self, built: BuiltBackbone):
        self.model = built.model

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(batch, training=False), dtype=np.float32)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def onnx_session(model_path: str | Path, threads: int | None = None, spinning: bool | None = None):
    """A CPU session; ``spinning`` None keeps onnxruntime's default (threads spin while waiting)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def keras_to_onnx(model, input_size: int, out_path: Path, opset: int = 17) -> Path:
    """Convert a uint8-NHWC-input Keras model with tf2onnx; writes atomically."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, input_size, input_size, 3), tf.uint8, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    write_atomic(out_path, proto.SerializeToString())
    return out_path


def parity_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    scale = max(float(np.abs(reference).max()), 1e-6)
    return float(np.abs(reference - candidate).max()) / scale


def onnx_engine_path(record: BackboneRecord) -> Path:
    """Where the converted engine for this backbone, weights and size is cached."""
    name, size = record.name, record.input_size
    key = hashlib.sha256(f"{name}|{record.weights.id}|{size}|v1".encode()).hexdigest()[:16]
    return cache_dir("engines") / f"{name}-{size}-{key}.onnx"


class OnnxEngine:
    name = "onnx"

    def __init__(self, built: BuiltBackbone | None, threads: int | None = None, path: Path | None = None,
                 streams: int = 1):
        """Convert ``built`` (once, cached), or open an already converted engine at ``path``.

        ``threads``: onnxruntime's intra-op threads per batch; ``streams``: how many batches the
        extraction loop may run at once on this session (``extract.streams``)."""
        if path is None:
            path = onnx_engine_path(built.record)
        if not path.exists():
            keras_to_onnx(built.model, built.input_size, path)
            self._check_parity(built, path)
        self.path, self.streams = path, streams
        self.session = onnx_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    @staticmethod
    def _check_parity(built: BuiltBackbone, path: Path) -> None:
        rng = np.random.default_rng(0)
        probe = rng.integers(0, 256, (2, built.input_size, built.input_size, 3), dtype=np.uint8)
        reference = KerasEngine(built)(probe)
        session = onnx_session(path)
        candidate = session.run(None, {session.get_inputs()[0].name: probe})[0]
        error = parity_error(reference, candidate)
        if error > ONNX_TOLERANCE:
            path.unlink(missing_ok=True)
            raise TransferKitError(
                f"the ONNX engine for {built.spec.name} differs from Keras by {error:.2e} (relative); "
                f"use --engine keras"
            )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)


def make_engine(built: BuiltBackbone, engine: str = "auto", threads: int | None = None, streams: int = 1):
    if engine not in ENGINES:
        raise TransferKitError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "keras":
        return KerasEngine(built)
    try:
        return OnnxEngine(built, threads, streams=streams)
    except TransferKitError:
        if engine == "onnx":
            raise
    except Exception as exc:  # tf2onnx can fail on exotic graphs: fall back, but say so
        if engine == "onnx":
            raise TransferKitError(f"cannot convert {built.spec.name} to ONNX: {exc}") from None
    return KerasEngine(built)


def open_engine(record: BackboneRecord, weights: str | None = None, engine: str = "auto",
                threads: int | None = None, who: str = "the record describes", streams: int = 1):
    """An engine computing ``record``'s features; a cached ONNX engine is opened without TensorFlow.
    ``threads`` and ``streams`` as in ``OnnxEngine`` (a Keras engine runs one batch at a time).

    ``weights`` is the user's choice (imagenet/none/PATH; None: the record's kind); weights that do
    not give the record's weights id are refused first, whether or not an engine is cached.
    """
    if engine not in ENGINES:
        raise TransferKitError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    resolve_record_weights(record, weights, who)
    cached = onnx_engine_path(record)
    if engine in ("auto", "onnx") and cached.exists():
        return OnnxEngine(None, threads, path=cached, streams=streams)
    from extract.models import build_from_record

    return make_engine(build_from_record(record, weights, who), engine, threads, streams)
