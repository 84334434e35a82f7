"""The feature side of an exported head: one Keras model from one uint8 image to the head's features.

A head trained on one backbone's plain features takes that backbone's model as it is. A head over
several backbones (``fit-head --backbone a+b``), or over mirror-averaged features (``extract --tta
flip``), takes a composed model instead, converted to ONE ONNX graph with one uint8 input:

- the input is square at the largest input size of the backbones; a backbone with a smaller input
  size gets a bilinear resize in the graph (half-pixel centres, no antialiasing: the edge runner
  decodes the photo at the largest size, the graph brings it to each backbone's size);
- each backbone has its own preprocessing in the graph, as in a single-backbone export;
- a mirror-averaged backbone runs on a batch of 2N (the images and their left-right mirrors, the
  width axis reversed) and averages the two halves, as ``extract.tta.mirror_averaged`` does;
- the features are concatenated in the head's backbone order.

Features the store holds for a smaller backbone were computed from the photo decoded straight to that
size, so the graph's features for it differ slightly from the stored ones (the resize is another
path to the same size); same-size and mirror-averaged features match the stored ones.

    >>> model = feature_model(trained.records)  # uint8 [N, S, S, 3] -> [N, sum of feature_dims]
"""

from __future__ import annotations

import keras

from extract.models import BuiltBackbone, build_from_record
from extract.preprocessing import ImagePreprocessing
from extract.record import BackboneRecord


@keras.saving.register_keras_serializable(package="transferkit")
class MirrorBatch(keras.layers.Layer):
    """``[N, H, W, C] -> [2N, H, W, C]``: the images, then the same images mirrored left to right."""

    def call(self, inputs):
        return keras.ops.concatenate([inputs, keras.ops.flip(inputs, axis=2)], axis=0)


@keras.saving.register_keras_serializable(package="transferkit")
class MirrorMean(keras.layers.Layer):
    """``[2N, D] -> [N, D]``: the mean of each image's features and its mirror image's."""

    def call(self, inputs):
        half = keras.ops.shape(inputs)[0] // 2
        return (inputs[:half] + inputs[half:]) / 2.0


def composite_size(records: list[BackboneRecord]) -> int:
    """The composed model's input size: the largest of the backbones'."""
    return max(record.input_size for record in records)


def _base(built: BuiltBackbone) -> keras.Model:
    """The bare application inside a built backbone (its preprocessing layer stripped)."""
    return next(layer for layer in built.model.layers if isinstance(layer, keras.Model))


def _branch(image, built: BuiltBackbone, size: int, index: int):
    """One backbone's features of ``image`` (uint8 at ``size``), resized, preprocessed and mirror-averaged
    as its record says (layers named ``b<index>_...``: the same backbone may come twice, plain and mirrored)."""
    record, prefix = built.record, f"b{index}_{built.record.name}"
    x = ImagePreprocessing(record.preprocessing.mode, name=f"{prefix}_preprocessing")(image)
    if record.input_size != size:  # preprocessing is affine per pixel, so it commutes with the bilinear resize
        x = keras.layers.Resizing(record.input_size, record.input_size, interpolation="bilinear",
                                  name=f"{prefix}_resize")(x)
    if record.tta:
        x = MirrorBatch(name=f"{prefix}_mirror")(x)
    base = _base(built)
    base.name = prefix  # layer names must be unique in the composed model
    features = base(x, training=False)
    return MirrorMean(name=f"{prefix}_mirror_mean")(features) if record.tta else features


def feature_model(builts: list[BuiltBackbone]) -> keras.Model:
    """uint8 ``[N, S, S, 3]`` -> the concatenated features the head takes (``S``: ``composite_size``)."""
    if len(builts) == 1 and not builts[0].record.tta:
        return builts[0].model
    size = composite_size([built.record for built in builts])
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    branches = [_branch(image, built, size, index) for index, built in enumerate(builts)]
    out = branches[0] if len(branches) == 1 else keras.layers.Concatenate(name="features")(branches)
    return keras.Model(image, out, name="composite_features")


def build_feature_model(records: list[BackboneRecord], weights: str | None = None,
                        who: str = "the record describes") -> keras.Model:
    """``feature_model`` of the backbones ``records`` describe (``weights`` applies to a single backbone)."""
    builts = [build_from_record(record, weights if len(records) == 1 else None, who) for record in records]
    return feature_model(builts)
