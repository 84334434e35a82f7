"""The int8 extraction engine: the backbone quantized once, kept only if a linear head does not notice.

``extract --engine onnx-int8`` quantizes the backbone's ONNX engine with ``extract.quantization``
(static QDQ, per-channel int8 weights) calibrated on up to ``CALIBRATION_IMAGES`` of the folder's own
train-split images, and caches it under ``cache_dir("engines")`` keyed by backbone, weights, input
size and the content hash of the gate images (calibration + validation images), with a JSON report
beside it. A later run with the same images opens the cached file and report without TensorFlow.

The gate is the downstream accuracy, not feature equality: a logistic-regression head is fitted on
the fp32 and on the int8 features of the gate images (the calibration images from the train split
and up to ``GATE_VALIDATION_IMAGES`` of the validation split) and scored by stratified k-fold
cross-validation with the same folds for both. A plain train -> validation comparison would score
int8 on the validation split alone: 139 images on the fruits set, where one image is 0.72 points,
more than the default tolerance; cross-validation scores every gate image (one image = 0.2 points
on 500). When int8 loses more than ``tolerance`` points, or there are too few images to tell, the
engine is refused and ``extract`` computes fp32 features, saying why. The report also gives the
features' cosine similarity to fp32 and both engines' speed on the gate images.

int8 features are stored under their own name (``resnet50@int8``) with a record that names the
quantization and the calibration, so fp32 and int8 rows never mix.

Example::

    choice = open_int8_engine(plan, fp32_path=Path("resnet50.onnx"), tolerance=0.5)
    print(choice.message)  # accepted or refused, with the accuracy, cosine and speed
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from extract.dataset import Dataset
from extract.defaults import DEFAULT_TOLERANCE
from extract.engine import OnnxEngine
from extract.errors import StoreError, TransferKitError
from extract.paths import cache_dir
from extract.quantization import quantize_int8, settings
from extract.streams import stream_plan
from extract.files import atomic_write, file_sha256, write_atomic
from extract.tta import tta_suffix

INT8_ENGINE = "onnx-int8"
INT8_SUFFIX = "@int8"
CALIBRATION_IMAGES = 300
GATE_VALIDATION_IMAGES = 300
GATE_FOLDS = 5
KEY_VERSION = "int8-v1"
ACTIVATIONS = "uint8"  # U8S8 kernels: see extract.quantization.quantize_int8
SETTINGS = settings(ACTIVATIONS)
PAYS_FROM = 1.2  # int8 speed-up below which the verdict says int8 does not pay
NOT_FASTER = ("; int8 is barely faster than fp32 here, so --engine auto gives fp32 features at about the same "
              "speed (int8 pays on dense convolutions such as ResNet50, little on depthwise ones such as "
              "EfficientNet-Lite0 and MobileNetV2)")


def features_name(backbone: str, int8: bool, tta: str | None = None) -> str:
    """The name the store keeps a backbone's features under: ``resnet50``, ``resnet50@int8``, and
    ``@flip`` after either for mirror-averaged features (``extract.tta``)."""
    return (backbone + INT8_SUFFIX if int8 else backbone) + tta_suffix(tta)


def stored_name(record) -> str:
    """The name features described by ``record`` (a ``BackboneRecord`` or its JSON) are stored under
    (int8 records carry ``quantization``, mirror-averaged ones ``tta``)."""
    if isinstance(record, dict):
        return features_name(record.get("name", ""), bool(record.get("quantization")), record.get("tta"))
    return features_name(record.name, bool(record.quantization), record.tta)


class Int8Refused(TransferKitError):
    """The int8 engine failed its gate (or could not be built); the message says why."""


class Int8Engine(OnnxEngine):
    name = INT8_ENGINE

    def __init__(self, path: Path, report: "GateReport", threads: int | None = None, streams: int = 1):
        super().__init__(None, threads, path=path, streams=streams)
        self.report = report


@dataclass(frozen=True)
class GatePlan:
    """Which images calibrate and judge the int8 engine of one backbone, weights and input size."""

    root: Path
    backbone: str
    weights_id: str
    input_size: int
    calibration: list[str]  # relpaths, train split
    validation: list[str]  # relpaths, validation split
    labels: dict[str, int]  # relpath -> class index
    contents: dict[str, str]  # relpath -> sha256 of the gate image's bytes
    images_sha256: str  # over the gate images' paths and contents, in order

    @property
    def key(self) -> str:
        text = "|".join([KEY_VERSION, self.backbone, self.weights_id, str(self.input_size), self.images_sha256,
                         json.dumps(SETTINGS, sort_keys=True)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def engine_path(self) -> Path:
        return engine_path(self.backbone, self.input_size, self.key)

    @property
    def report_path(self) -> Path:
        return self.engine_path.with_suffix(".json")


def engine_path(backbone: str, input_size: int, key: str) -> Path:
    """Where the int8 engine with this key is cached (its gate report: the same name, ``.json``)."""
    return cache_dir("engines") / f"{backbone}-{input_size}-int8-{key}.onnx"


def _sample(relpaths: list[str], count: int) -> list[str]:
    """Up to ``count`` paths ranked by a hash of the path: a fixed random sample that adding images
    to the folder rarely changes (so the cached engine keeps serving), sorted for a stable order."""
    return sorted(sorted(relpaths, key=lambda p: hashlib.sha256(p.encode('utf-8', 'surrogateescape')).digest())[:count])


def plan_gate(dataset: Dataset, backbone: str, weights_id: str, input_size: int,
              calibration_images: int = CALIBRATION_IMAGES,
              validation_images: int = GATE_VALIDATION_IMAGES) -> GatePlan:
    """The gate images of the whole folder (not of one shard: every shard gets the same engine)."""
    by_split: dict[str, list[str]] = {"train": [], "validation": []}
    for entry in dataset.entries:
        by_split.get(entry.split, []).append(entry.relpath)
    calibration = _sample(by_split["train"], calibration_images)
    if not calibration:
        raise Int8Refused("int8 calibration needs train-split images; the folder has none")
    validation = _sample(by_split["validation"], validation_images)
    index = {name: i for i, name in enumerate(dataset.class_names)}
    labels = {e.relpath: index[e.class_name] for e in dataset.entries}
    contents = {p: file_sha256(dataset.root / p) for p in calibration + validation}
    digest = hashlib.sha256()
    for relpath in calibration + ["--validation--"] + validation:
        digest.update(relpath.encode("utf-8", "surrogateescape") + b"\0" + contents.get(relpath, "").encode())
    return GatePlan(Path(dataset.root), backbone, weights_id, input_size, calibration, validation, labels,
                    contents, digest.hexdigest())


@dataclass
class GateReport:
    """What quantization and the gate measured (cached as JSON beside the engine)."""

    backbone: str
    weights_id: str
    input_size: int
    key: str
    calibration_images: int  # decoded train images the ranges were calibrated on
    gate_images: int  # decoded gate images the heads were scored on
    folds: int
    accuracy_fp32: float  # k-fold accuracy of a logistic-regression head, a fraction
    accuracy_int8: float
    cosine_mean: float  # cosine similarity of int8 to fp32 features, over the gate images
    cosine_min: float
    fp32_images_per_second: float  # both engines on the gate images, batch by batch in turn
    int8_images_per_second: float
    quantize_seconds: float
    fp32_images_per_cpu_second: float = 0.0  # images per second of this process's CPU time: what a
    int8_images_per_cpu_second: float = 0.0  # machine busy with other work shows best (0: not measured)

    @property
    def drop(self) -> float:
        """Accuracy points int8 loses (negative: it gains)."""
        return 100 * (self.accuracy_fp32 - self.accuracy_int8)

    @property
    def speedup(self) -> float:
        """int8 speed over fp32 by CPU time when measured (wall time stretches alike for both under load)."""
        if self.fp32_images_per_cpu_second and self.int8_images_per_cpu_second:
            return self.int8_images_per_cpu_second / self.fp32_images_per_cpu_second
        return self.int8_images_per_second / max(self.fp32_images_per_second, 1e-9)

    def accepts(self, tolerance: float) -> bool:
        return self.drop <= tolerance

    def describe(self, tolerance: float) -> str:
        verdict = "accepted" if self.accepts(tolerance) else "refused"
        return (f"int8 engine for {self.backbone} {verdict}: linear-head accuracy {100 * self.accuracy_fp32:.1f}% "
                f"fp32 vs {100 * self.accuracy_int8:.1f}% int8 ({self.drop:+.1f} points lost, tolerance "
                f"{tolerance:g}; {self.folds}-fold on {self.gate_images} images); feature cosine to fp32 "
                f"{self.cosine_mean:.3f} (min {self.cosine_min:.3f}); {self.speedup:.2f}x fp32 speed by CPU time "
                f"({self.int8_images_per_second:.0f} vs {self.fp32_images_per_second:.0f} images/s on those images)"
                + (NOT_FASTER if self.speedup < PAYS_FROM else ""))

    def to_dict(self) -> dict:
        return {**asdict(self), "drop_points": self.drop, "speedup": self.speedup}

    @classmethod
    def from_dict(cls, data: dict) -> "GateReport":
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})


def _decode_gate_images(plan: GatePlan, workers: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 images, labels, how many of them are calibration images), undecodable files left out."""
    from extract.job import decoded_batches

    relpaths, calibrating = plan.calibration + plan.validation, set(plan.calibration)
    arrays, labels, calibration = [], [], 0
    todo = [(p, plan.contents[p]) for p in relpaths]
    for paths, _, batch, _ in decoded_batches(plan.root, todo, plan.input_size, 32, workers):
        arrays.extend(batch)
        labels.extend(plan.labels[p] for p in paths)
        calibration += sum(1 for p in paths if p in calibrating)
    size = plan.input_size
    images = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return images, np.asarray(labels, np.int64), calibration


def _calibration_batches(images: np.ndarray, batch_size: int = 16):
    """The calibration images (the first rows of the gate images) in batches."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def _run_both(fp32: OnnxEngine, int8: OnnxEngine, images: np.ndarray, batch_size: int = 8):
    """Features of both engines, and their images per second of wall time and of CPU time, timed batch
    by batch in turn so that load from other processes hits both alike."""
    outputs: dict[str, list] = {"fp32": [], "int8": []}
    wall, cpu = {"fp32": 0.0, "int8": 0.0}, {"fp32": 0.0, "int8": 0.0}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        for key, engine in (("fp32", fp32), ("int8", int8)):
            started, cpu_started = time.perf_counter(), time.process_time()
            outputs[key].append(engine(batch))
            wall[key] += time.perf_counter() - started
            cpu[key] += time.process_time() - cpu_started
    features = {k: np.concatenate(v) for k, v in outputs.items()}
    rates = {k: len(images) / max(s, 1e-9) for k, s in wall.items()}
    cpu_rates = {k: len(images) / max(s, 1e-9) for k, s in cpu.items()}
    return features["fp32"], features["int8"], rates, cpu_rates


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, in float64 (random-init features can be as small as 1e-12)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-300)


def _kfold_accuracy(features: np.ndarray, labels: np.ndarray, folds: int) -> float:
    """Stratified k-fold accuracy of a standardised logistic regression (same folds for equal labels)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    head = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    with threadpool_limits(limits=1, user_api="blas"):
        predicted = cross_val_predict(head, features, labels, cv=cv)
    return float(np.mean(predicted == labels))


def _folds(labels: np.ndarray) -> tuple[int, str]:
    """How many folds the labels allow (at most ``GATE_FOLDS``), or why none."""
    counts = np.bincount(labels) if len(labels) else np.zeros(0, int)
    present = counts[counts > 0]
    if len(present) < 2 or present.min() < 2:
        return 0, (f"too few images to check its accuracy ({len(labels)} decoded gate images; every class "
                   f"needs at least 2 in the train and validation splits)")
    return int(min(GATE_FOLDS, present.min())), ""


def quantize_and_gate(plan: GatePlan, fp32_path: Path, threads: int | None = None, workers: int = 4) -> GateReport:
    """Quantize the fp32 engine at ``fp32_path``, measure the gate, cache engine and report; returns the report."""
    images, labels, calibration = _decode_gate_images(plan, workers)
    if not calibration:
        raise Int8Refused(f"int8 engine for {plan.backbone} refused: no calibration image could be decoded")
    folds, too_few = _folds(labels)
    if too_few:
        raise Int8Refused(f"int8 engine for {plan.backbone} refused: {too_few}")
    started = time.perf_counter()
    engine_path = plan.engine_path
    batches = _calibration_batches(images[:calibration])
    with atomic_write(engine_path) as tmp:
        quantize_int8(fp32_path, tmp, batches, activations=ACTIVATIONS)
    quantize_seconds = time.perf_counter() - started
    fp32, int8 = OnnxEngine(None, threads, path=fp32_path), OnnxEngine(None, threads, path=engine_path)
    fp32_features, int8_features, rates, cpu_rates = _run_both(fp32, int8, images)
    accuracy = {k: _kfold_accuracy(f, labels, folds) for k, f in (("fp32", fp32_features), ("int8", int8_features))}
    cosine = _cosine(fp32_features, int8_features)
    report = GateReport(
        backbone=plan.backbone, weights_id=plan.weights_id, input_size=plan.input_size, key=plan.key,
        calibration_images=calibration, gate_images=len(images), folds=folds, accuracy_fp32=accuracy["fp32"],
        accuracy_int8=accuracy["int8"], cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()),
        fp32_images_per_second=rates["fp32"], int8_images_per_second=rates["int8"],
        fp32_images_per_cpu_second=cpu_rates["fp32"], int8_images_per_cpu_second=cpu_rates["int8"],
        quantize_seconds=quantize_seconds,
    )
    write_atomic(plan.report_path, json.dumps(report.to_dict(), indent=1).encode())
    return report


def cached_report(path: Path) -> GateReport | None:
    """The report of the engine cached at ``path``, if both files are there."""
    report = path.with_suffix(".json")
    if not (path.is_file() and report.is_file()):
        return None
    try:
        return GateReport.from_dict(json.loads(report.read_text()))
    except (ValueError, TypeError):
        return None  # a damaged report: quantize again


@dataclass
class Int8Choice:
    engine: Int8Engine
    report: GateReport
    cached: bool

    @property
    def record(self) -> dict:
        """The quantization facts the features' backbone record carries."""
        r = self.report
        return {**SETTINGS, "engine_key": r.key, "calibration_images": r.calibration_images,
                "gate": {"images": r.gate_images, "folds": r.folds, "accuracy_fp32": round(r.accuracy_fp32, 4),
                         "accuracy_int8": round(r.accuracy_int8, 4), "cosine_mean": round(r.cosine_mean, 4),
                         "cosine_min": round(r.cosine_min, 4)}}


def open_int8_engine(plan: GatePlan, fp32_path, tolerance: float = DEFAULT_TOLERANCE, threads: int | None = None,
                     workers: int = 4, streams: int = 1) -> Int8Choice:
    """The int8 engine for ``plan`` (quantized now or taken from the cache); raises ``Int8Refused``.

    ``fp32_path`` is a callable giving the fp32 ONNX engine's path, called only when quantizing.
    ``threads`` inference threads in all (the gate runs one batch on all of them) are shared by the
    engine's ``streams`` (``extract.streams``).
    """
    report, cached = cached_report(plan.engine_path), True
    if report is None:
        report, cached = quantize_and_gate(plan, Path(fp32_path()), threads, workers), False
    return _accepted(plan.engine_path, report, cached, tolerance, threads, streams)


def _accepted(path: Path, report: GateReport, cached: bool, tolerance: float, threads: int | None,
              streams: int = 1) -> Int8Choice:
    if not report.accepts(tolerance):
        raise Int8Refused(report.describe(tolerance))
    streams, threads_each = stream_plan(threads, streams)
    return Int8Choice(Int8Engine(path, report, threads_each, streams), report, cached)


def int8_engine_for_store(dataset: Dataset, backbone: str, weights_id: str, input_size: int,
                          stored_record: dict | None, fp32_path, tolerance: float = DEFAULT_TOLERANCE,
                          threads: int | None = None, workers: int = 4, streams: int = 1) -> Int8Choice:
    """The int8 engine for new rows of a store: the one its int8 rows were computed with, so rows
    from engines calibrated on other images never mix; for a store without int8 rows, the engine of
    this folder's gate images (``open_int8_engine``)."""
    stored_key = ((stored_record or {}).get("quantization") or {}).get("engine_key")
    plan = plan_gate(dataset, backbone, weights_id, input_size)
    if stored_key is None or stored_key == plan.key:
        return open_int8_engine(plan, fp32_path, tolerance, threads, workers, streams)
    path = engine_path(backbone, input_size, stored_key)
    report = cached_report(path)
    if report is None:
        raise StoreError(f"the store's {features_name(backbone, True)} rows were computed with int8 engine "
                         f"{stored_key}, which is no longer cached, and the folder's calibration images have "
                         f"changed since; use another --store (or --engine auto for fp32 features)")
    return _accepted(path, report, True, tolerance, threads, streams)
