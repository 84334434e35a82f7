"""Save and load heads without pickle: ``HEAD/head.json`` (config) + ``HEAD/weights.npz`` (arrays).

The JSON holds the kind, hyper-parameters, class names in order, the backbone record (a head over
several backbones: the first, and every one in ``backbones``, in column order), the store the
head was trained on (path + fingerprint), its metrics, the tool version and the sha256 of the
weights file. The npz holds the standardisation, the learned arrays and the class names again, so
the class order is covered by the hash. Loading parses JSON and reads plain numeric arrays with
``allow_pickle=False``: nothing in the files is executed. A head whose weights do not match the
hash, whose arrays have other names, dtypes or shapes than its config implies, or whose class
names disagree, is refused with a ``HeadFileError``.

    >>> save_head(trained, "head/")
    >>> load_head("head/").predict_proba(features)
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from classify.errors import HeadFileError, HeadMismatch
from classify.fingerprints import SplitFingerprint, recorded_split_fingerprints
from classify.heads import HEAD_KINDS, Head
from edge.imageio import strict_json
from extract.clock import utc_now
from extract.files import file_sha256, write_atomic
from extract.record import BackboneRecord, RecordError
from extract.version import __version__

if TYPE_CHECKING:
    import onnx

    from extract.models import BuiltBackbone

TOOL_VERSION = __version__
HEAD_FORMAT = "transferkit-head"
HEAD_FORMAT_VERSION = 2  # the newest this reads; written only by heads over several backbones
SINGLE_BACKBONE_FORMAT_VERSION = 1  # every other head, so older transferkits still read them
CONFIG_NAME = "head.json"
WEIGHTS_NAME = "weights.npz"
TRAINED_ON = "the head was trained on"  # starts the messages refusing another backbone or weights


@dataclass
class TrainedHead:
    """A fitted head with what it needs to be used: class order, backbone and training store."""

    head: Head
    class_names: list[str]
    backbone: BackboneRecord  # the store's record of the features it was trained on, unchanged (the first, joined)
    store: dict  # classify.fingerprints.training_store: path and fingerprints of the features it was trained on
    metrics: dict = field(default_factory=dict)
    tool_version: str = TOOL_VERSION
    joined: list[BackboneRecord] = field(default_factory=list)  # every backbone's record when over several

    @property
    def records(self) -> list[BackboneRecord]:
        """The records of the backbones whose features the head takes, concatenated in this order."""
        return list(self.joined) or [self.backbone]

    @property
    def split_fingerprints(self) -> dict[str, SplitFingerprint] | None:
        """Each split's fingerprints at fit time (classify.fingerprints); None for heads saved before them."""
        return recorded_split_fingerprints(self.store, "the head's head.json")

    @property
    def kind(self) -> str:
        return self.head.kind

    @property
    def n_features(self) -> int:
        return int(self.head.mean_.shape[0])

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(features)

    def build_backbone(self, weights: str | None = None) -> BuiltBackbone:
        """The frozen backbone whose features this head takes, built from its record (refuses other weights)."""
        from extract.models import build_from_record

        if len(self.records) > 1 or self.backbone.tta:
            raise HeadMismatch(f"the head takes {self.features_name} features, which no single backbone "
                               f"computes; train a head on one backbone's plain features for this")

        return build_from_record(self.backbone, weights, who=TRAINED_ON)

    @property
    def features_name(self) -> str:
        from classify.joined import joined_name

        return joined_name(self.records)

    def open_engine(self, weights: str | None = None, engine: str = "auto", threads: int | None = None):
        """An engine computing this head's features (a cached ONNX engine needs no TensorFlow) from images
        at ``input_size``: each backbone's, resized and mirror-averaged as its record says, concatenated."""
        from classify.joined import JoinedEngine
        from extract.engine import open_engine

        if len(self.records) > 1 and weights is not None:
            raise HeadMismatch("--weights applies to a head over one backbone; this head records each "
                               "backbone's weights")
        return JoinedEngine(self.records, [open_engine(record, weights, engine, threads, who=TRAINED_ON)
                                           for record in self.records])

    @property
    def input_size(self) -> int:
        """The size images are decoded at for this head: the largest of its backbones' input sizes."""
        return max(record.input_size for record in self.records)

    def to_onnx(self, opset: int = 17) -> "onnx.ModelProto":
        """The head graph with the class order, kind and backbone record in its metadata."""
        return self.head.to_onnx(opset, metadata={
            "class_names": strict_json(self.class_names),
            "head_kind": self.kind,
            "backbone": strict_json(self.backbone.to_dict(), sort_keys=True),
            **({"backbones": strict_json([r.to_dict() for r in self.joined], sort_keys=True)} if self.joined else {}),
        })


def head_dir(path: str | Path) -> Path:
    """``HEAD`` may name the head folder or the ``head.json`` inside it."""
    path = Path(path)
    return path.parent if path.name == CONFIG_NAME else path


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An npz whose bytes depend only on the arrays (``np.savez`` stamps the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buffer.getvalue()


def save_head(trained: TrainedHead, out: str | Path) -> Path:
    """Write the head folder (weights first, then the config that carries their hash)."""
    folder = head_dir(out)
    if folder.exists() and not folder.is_dir():
        raise HeadFileError(f"{folder} is a file; --out names a folder for head.json and weights.npz")
    head = trained.head
    if not np.array_equal(head.classes_, np.arange(len(trained.class_names))):
        raise ValueError("the head's classes_ must be 0..C-1, indices into class_names")
    folder.mkdir(parents=True, exist_ok=True)
    weights = _npz_bytes({**head.learned_arrays(), "class_names": np.asarray(trained.class_names, dtype=str)})
    config = {
        "format": HEAD_FORMAT,
        "format_version": HEAD_FORMAT_VERSION if trained.joined else SINGLE_BACKBONE_FORMAT_VERSION,
        "tool_version": trained.tool_version,
        "created": utc_now(),
        "kind": head.kind,
        "params": head.get_params(),
        "learned": head.get_learned_info(),
        "n_features": trained.n_features,
        "class_names": list(trained.class_names),
        "backbone": trained.backbone.to_dict(),
        **({"backbones": [record.to_dict() for record in trained.joined]} if trained.joined else {}),
        "store": trained.store,
        "metrics": trained.metrics,
        "weights": {"file": WEIGHTS_NAME, "sha256": hashlib.sha256(weights).hexdigest()},
    }
    write_atomic(folder / WEIGHTS_NAME, weights)
    write_atomic(folder / CONFIG_NAME, (strict_json(config, indent=2) + "\n").encode())
    return folder


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise HeadFileError(f"no head at {path.parent}: {path.name} is missing "
                            f"(write one with `python cli.py fit-head`)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeadFileError(f"{path} is not valid JSON ({exc}); re-run fit-head") from None
    except RecursionError:  # json recurses once per nesting level: a hostile file nests thousands deep
        raise HeadFileError(f"{path} is nested too deeply to be a transferkit head") from None
    if not isinstance(config, dict) or config.get("format") != HEAD_FORMAT:
        raise HeadFileError(f"{path} is not a transferkit head")
    if not isinstance(config.get("format_version"), int) or config["format_version"] > HEAD_FORMAT_VERSION:
        raise HeadFileError(f"{path} has head format {config.get('format_version')!r}; this transferkit "
                            f"reads up to {HEAD_FORMAT_VERSION}")
    expected = {"tool_version": str, "kind": str, "params": dict, "learned": dict, "n_features": int,
                "class_names": list, "backbone": dict, "store": dict, "metrics": dict, "weights": dict}
    for key, kind in expected.items():
        if not isinstance(config.get(key), kind):
            raise HeadFileError(f"{path} is damaged: '{key}' is missing or not a {kind.__name__}")
    if config["kind"] not in HEAD_KINDS:
        raise HeadFileError(f"{path} has unknown head kind {config['kind']!r}")
    names = config["class_names"]
    if len(names) < 2 or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise HeadFileError(f"{path} is damaged: class_names must be two or more distinct strings")
    return config


def _read_arrays(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if names != set(expected):
                raise HeadFileError(
                    f"{path} holds arrays {sorted(names)}, but head.json implies {sorted(expected)}"
                )
            arrays = {name: npz[name] for name in sorted(names)}
    except HeadFileError:
        raise
    except Exception as exc:  # BadZipFile, object arrays refused without pickle, truncated members...
        raise HeadFileError(f"cannot read {path}: {exc}") from None
    for name, array in arrays.items():
        wanted_kind = "U" if name == "class_names" else "fiu"
        if array.dtype.kind not in wanted_kind:
            raise HeadFileError(f"{path}: array {name} has dtype {array.dtype}; expected a plain numeric array")
        if array.shape != expected[name]:
            raise HeadFileError(f"{path}: array {name} has shape {array.shape}, but head.json implies "
                                f"{expected[name]}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise HeadFileError(f"{path}: array {name} holds NaN or infinite values")
    return arrays


def load_head(path: str | Path) -> TrainedHead:
    folder = head_dir(path)
    config_path = folder / CONFIG_NAME
    config = _read_config(config_path)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise HeadFileError(f"{weights_path} is missing; copy the whole head folder or re-run fit-head")
    if file_sha256(weights_path) != config["weights"].get("sha256"):
        raise HeadFileError(f"{weights_path} does not match the sha256 recorded in {config_path}: the head was "
                            f"modified or copied incompletely; re-run fit-head")
    class_names = config["class_names"]
    try:
        head = HEAD_KINDS[config["kind"]](**config["params"])
        shapes = head.array_shapes(config["n_features"], len(class_names), config["learned"])
    except (TypeError, ValueError) as exc:
        raise HeadFileError(f"{config_path} has invalid params for a {config['kind']} head: {exc}") from None
    arrays = _read_arrays(weights_path, {**shapes, "class_names": (len(class_names),)})
    if arrays.pop("class_names").tolist() != class_names:
        raise HeadFileError(f"the class names in {config_path} differ from those in {weights_path}; the head "
                            f"was edited; re-run fit-head")
    if not np.array_equal(arrays["classes_"], np.arange(len(class_names))):
        raise HeadFileError(f"{weights_path}: classes_ must be 0..{len(class_names) - 1}")
    missing = [name for name in head.learned_info if name not in config["learned"]]
    if missing:
        raise HeadFileError(f"{config_path} is damaged: learned {', '.join(missing)} missing")
    head.set_learned(arrays, config["learned"])
    if config["tool_version"] != TOOL_VERSION:
        warnings.warn(f"{config_path} was written by transferkit {config['tool_version']}, this is "
                      f"{TOOL_VERSION}; check its predictions", stacklevel=2)
    backbone, joined = _records(config, config_path)
    recorded_split_fingerprints(config["store"], str(config_path))  # a damaged entry is refused on load
    return TrainedHead(head=head, class_names=class_names, backbone=backbone, store=config["store"],
                       metrics=config["metrics"], tool_version=config["tool_version"], joined=joined)


def _records(config: dict, config_path: Path) -> tuple[BackboneRecord, list[BackboneRecord]]:
    """The head's backbone record, and every backbone's for a head over several (else [])."""
    joined = config.get("backbones", [])
    if not isinstance(joined, list) or len(joined) == 1:
        raise HeadFileError(f"{config_path} is damaged: 'backbones' must list two or more backbone records")
    try:
        backbone = BackboneRecord.from_dict(config["backbone"])
        records = [BackboneRecord.from_dict(record) for record in joined]
    except RecordError as exc:
        raise HeadFileError(f"{config_path}: {exc}; re-run fit-head") from None
    if records and records[0] != backbone:
        raise HeadFileError(f"{config_path} is damaged: 'backbone' is not the first of 'backbones'")
    return backbone, records
