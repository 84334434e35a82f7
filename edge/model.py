"""Load an exported ONNX classifier and the metadata contract that travels with it.

The export step writes these ``metadata_props``:
  class_names  JSON list, in output order                     (required)
  input_size   JSON [H, W]                                   (required)
  layout       "NHWC" or "NCHW"                              (required)
  preprocessing JSON object whose "in_graph" must be true     (required: the runner feeds raw RGB 0..255)
  input_dtype  "uint8" or "float32"                          (optional; must match the graph input)
  model_id     string written into every result line         (optional; default: sha256 of the file)
  ood          JSON object with a finite "threshold"          (optional; used only with a graph output
               named ``ood_score``: an image whose score is above the threshold is "unknown")
  drift_reference JSON {"class_share": {class: share}, "mean_confidence": x, "split": "test", "rows": n}:
               the predicted class mix and mean top probability on a held-out split (optional; the
               runner's --metrics compares its last images with it)
  backbone     JSON backbone record, as in the feature store and head file (optional, informational;
               its shape is documented in extract/record.py, read here as plain JSON)
  source                                                     (informational)

The runner hands ``predict`` a uint8 NHWC batch of raw RGB pixels; this module transposes and casts
it to what the graph declares, and splits or pads it when the graph has a fixed batch size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

REQUIRED_KEYS = ("class_names", "input_size", "layout")
DRIFT_REFERENCE = "drift_reference"
OOD_OUTPUT = "ood_score"  # the second output export-onnx adds: higher = farther from every class
ONNX_INPUT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}


class ModelError(Exception):
    """The model cannot be used by the edge runner; the message is one line a user can act on."""


@dataclass
class EdgeModel:
    session: ort.InferenceSession
    input_name: str
    class_names: list[str]
    input_size: tuple[int, int]
    layout: str
    input_dtype: str
    model_id: str
    fixed_batch: int | None  # None when the batch axis is dynamic
    output_names: list[str] = field(default_factory=list)  # probabilities first, then ood_score if used
    ood: dict[str, Any] | None = None  # the metadata's calibration when the graph has ``ood_score``
    backbone: dict | None = None  # the backbone record from the metadata, unchanged
    drift_reference: dict[str, Any] | None = None  # the metadata's ``drift_reference``, checked
    file_identity: tuple[int, ...] | None = None  # (device, inode, size, mtime_ns) of the file loaded

    @property
    def ood_threshold(self) -> float | None:
        """An image whose ``ood_score`` is above this is unknown; None for a model without the score."""
        return None if self.ood is None else float(self.ood["threshold"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, C]`` for a uint8 ``[N, H, W, 3]`` batch of raw RGB images."""
        return self.predict_scores(images)[0]

    def predict_scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities ``[N, C]`` and the unknown score ``[N]`` (None for a model without one)."""
        x = images
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if self.fixed_batch is None:
            return self._run(x)
        size = self.fixed_batch
        parts = []
        for start in range(0, len(x), size):
            chunk = x[start : start + size]
            missing = size - len(chunk)
            if missing:  # pad the last chunk, then drop the padding's outputs
                chunk = np.concatenate([chunk, np.zeros((missing, *chunk.shape[1:]), chunk.dtype)])
            parts.append([out[: size - missing] if out is not None else None for out in self._run(chunk)])
        probs = np.concatenate([p for p, _ in parts])
        return probs, None if self.ood is None else np.concatenate([o for _, o in parts])

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session.run(self.output_names or None, {self.input_name: x})
        probs = np.asarray(outputs[0], dtype=np.float32)
        if probs.shape != (len(x), len(self.class_names)):
            raise ModelError(
                f"model output has shape {list(probs.shape)}, expected [{len(x)}, {len(self.class_names)}] "
                f"(one probability per class in class_names)"
            )
        if self.ood is None:
            return probs, None
        score = np.asarray(outputs[1], dtype=np.float32).reshape(-1)
        if score.shape != (len(x),):
            raise ModelError(f"model output {OOD_OUTPUT} has shape {list(np.shape(outputs[1]))}, expected [{len(x)}]")
        return probs, score


def session_options(threads: int) -> ort.SessionOptions:
    """Explicit, non-spinning threads: idle spinning burns the CPU of small edge boxes."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _json_field(meta: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except ValueError:
        raise ModelError(f"{path}: metadata '{key}' is not valid JSON: {meta[key][:80]!r}") from None


def _parse_metadata(meta: dict[str, str], path: Path) -> tuple[list[str], tuple[int, int], str]:
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ModelError(
            f"{path}: ONNX metadata lacks {', '.join(missing)}; export the model with "
            f"`cli.py export-onnx`, which records class names, input size and layout"
        )
    class_names = _json_field(meta, "class_names", path)
    if not (isinstance(class_names, list) and class_names and all(isinstance(c, str) for c in class_names)):
        raise ModelError(f"{path}: metadata 'class_names' must be a non-empty JSON list of strings")
    size = _json_field(meta, "input_size", path)
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ModelError(f"{path}: metadata 'input_size' must be a JSON list [height, width]")
    layout = meta["layout"]
    if layout not in ("NHWC", "NCHW"):
        raise ModelError(f"{path}: metadata 'layout' is {layout!r}; the edge runner supports NHWC and NCHW")
    if "preprocessing" not in meta:
        raise ModelError(f"{path}: metadata lacks 'preprocessing'; the runner needs preprocessing inside the graph")
    preprocessing = _json_field(meta, "preprocessing", path)
    if not (isinstance(preprocessing, dict) and preprocessing.get("in_graph") is True):
        raise ModelError(
            f"{path}: preprocessing is not inside the graph ({meta['preprocessing']}); "
            f"re-export with in-graph preprocessing so the runner can feed raw RGB pixels"
        )
    return class_names, (size[0], size[1]), layout


def _check_input(inp: Any, layout: str, size: tuple[int, int], declared_dtype: str | None, path: Path) -> str:
    """Check the graph input against the metadata; return its dtype."""
    dtype = ONNX_INPUT_TYPES.get(inp.type)
    if dtype is None:
        raise ModelError(f"{path}: input {inp.name!r} has type {inp.type}; the runner feeds uint8 or float32")
    if declared_dtype is not None and declared_dtype != dtype:
        raise ModelError(f"{path}: metadata says input_dtype {declared_dtype} but the graph input is {dtype}")
    shape = list(inp.shape)
    expected = [None, size[0], size[1], 3] if layout == "NHWC" else [None, 3, size[0], size[1]]
    if len(shape) != 4 or any(
        isinstance(got, int) and want is not None and got != want for got, want in zip(shape, expected)
    ):
        raise ModelError(
            f"{path}: input shape {shape} does not match layout {layout} and input_size {list(size)}"
        )
    return dtype


def _ood_calibration(session: ort.InferenceSession, meta: dict[str, str], path: Path) -> tuple[list[str], Any]:
    """Output names to run and the ``ood`` calibration, or ``([], None)`` for a model without both
    the ``ood_score`` output and the ``ood`` metadata (older and fine-tuned exports: no unknowns)."""
    names = [o.name for o in session.get_outputs()]
    if OOD_OUTPUT not in names or "ood" not in meta:
        return [], None
    calibration = _json_field(meta, "ood", path)
    threshold = calibration.get("threshold") if isinstance(calibration, dict) else None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
        raise ModelError(f"{path}: metadata 'ood' must be a JSON object with a finite number 'threshold'")
    probabilities = next(name for name in names if name != OOD_OUTPUT)
    return [probabilities, OOD_OUTPUT], calibration


def _drift_reference(meta: dict[str, str], class_names: list[str], path: Path) -> dict[str, Any] | None:
    """The checked ``drift_reference`` metadata, or None for a model without one."""
    if DRIFT_REFERENCE not in meta:
        return None
    reference = _json_field(meta, DRIFT_REFERENCE, path)
    problem = f"{path}: metadata '{DRIFT_REFERENCE}' must be a JSON object with 'class_share' (class name -> " \
              f"share between 0 and 1, summing to 1, only names of class_names) and 'mean_confidence' (0..1)"
    shares = reference.get("class_share") if isinstance(reference, dict) else None
    if not (isinstance(shares, dict) and set(shares) <= set(class_names)
            and all(_fraction(v) for v in [*shares.values(), reference.get("mean_confidence")])
            and abs(sum(shares.values()) - 1) <= 1e-3):
        raise ModelError(problem)
    return reference


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _read_model_file(path: Path) -> tuple[bytes, tuple[int, ...]]:
    """The file's bytes, read once, and the identity (device, inode, size, mtime) of what was read:
    hashing, loading and the hot-swap check all see the same version of a file being replaced."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ModelError(f"model file is not a regular file: {path}")
            data = f.read()
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    return data, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def load_model(path: str | Path, threads: int) -> EdgeModel:
    """Open ``path`` with onnxruntime on the CPU and check it against the metadata contract."""
    path = Path(path)
    data, identity = _read_model_file(path)
    try:
        session = ort.InferenceSession(data, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"cannot load ONNX model {path}: {first_line}") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    class_names, size, layout = _parse_metadata(meta, path)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{path}: the model has {len(inputs)} inputs; the runner feeds exactly one image tensor")
    dtype = _check_input(inputs[0], layout, size, meta.get("input_dtype"), path)
    batch_dim = inputs[0].shape[0]
    model_id = meta.get("model_id") or "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    output_names, ood = _ood_calibration(session, meta, path)
    model = EdgeModel(
        session=session,
        input_name=inputs[0].name,
        class_names=class_names,
        input_size=size,
        layout=layout,
        input_dtype=dtype,
        model_id=model_id,
        fixed_batch=batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None,
        output_names=output_names,
        ood=ood,
        backbone=_json_field(meta, "backbone", path) if "backbone" in meta else None,
        drift_reference=_drift_reference(meta, class_names, path),
        file_identity=identity,
    )
    # One run now: checks the output against class_names before any file is touched, and warms up.
    model.predict_scores(np.zeros((1, size[0], size[1], 3), np.uint8))
    return model
