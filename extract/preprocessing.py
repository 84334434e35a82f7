"""Backbone input preprocessing, as a Keras layer that lives inside every model graph.

Putting preprocessing in the graph means the feature extractor, the fine-tuned model and the
exported ONNX file all take raw RGB pixels (0..255) and cannot be fed the wrong scaling.
``preprocess_numpy`` is the reference implementation the layer is tested against; it never
mutates its input (unlike ``keras.applications.*.preprocess_input``).

Modes:
- ``caffe``: RGB->BGR, subtract the ImageNet mean (ResNet50, VGG16).
- ``tf``: scale to [-1, 1] (ResNet50V2, Xception, InceptionV3, InceptionResNetV2, MobileNetV2).
- ``torch``: scale to [0, 1], subtract mean and divide by std per channel.
- ``raw``: keep 0..255 (Keras EfficientNet normalises inside the model).
- ``lite``: ``(x - 127) / 128`` (EfficientNet-Lite).
"""

from __future__ import annotations

import keras
import numpy as np

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("caffe", "tf", "torch", "raw", "lite")


def _scale_offset(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, offset) so that ``y = x * scale + offset`` (after any channel flip)."""
    if mode == "caffe":
        return np.ones(3), -np.asarray(CAFFE_MEAN_BGR)
    if mode == "tf":
        return np.full(3, 1 / 127.5), np.full(3, -1.0)
    if mode == "torch":
        std = np.asarray(TORCH_STD)
        return 1 / (255.0 * std), -np.asarray(TORCH_MEAN) / std
    if mode == "raw":
        return np.ones(3), np.zeros(3)
    if mode == "lite":
        return np.full(3, 1 / 128.0), np.full(3, -127.0 / 128.0)
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {', '.join(MODES)}")


def preprocess_numpy(images: np.ndarray, mode: str) -> np.ndarray:
    """Reference preprocessing of an NHWC RGB batch; returns a new float32 array."""
    x = np.asarray(images, dtype=np.float32)
    if mode == "caffe":
        x = x[..., ::-1]
    scale, offset = _scale_offset(mode)
    return (x * scale.astype(np.float32) + offset.astype(np.float32)).astype(np.float32)


@keras.saving.register_keras_serializable(package="transferkit")
class ImagePreprocessing(keras.layers.Layer):
    """Cast RGB pixels (any dtype, 0..255) to float32 and apply a backbone's preprocessing."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        _scale_offset(mode)  # validate early
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        if self.mode == "caffe":
            x = keras.ops.flip(x, axis=-1)
        scale, offset = _scale_offset(self.mode)
        if self.mode == "raw":
            return x
        return x * keras.ops.convert_to_tensor(scale.astype(np.float32)) + keras.ops.convert_to_tensor(
            offset.astype(np.float32)
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
