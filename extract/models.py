"""Build Keras models from registry specs: raw uint8 RGB in, features (or ImageNet probabilities) out."""

from __future__ import annotations

from dataclasses import dataclass

import keras

from extract.backbones import BackboneSpec, get_backbone
from extract.errors import TransferKitError
from extract.preprocessing import ImagePreprocessing
from extract.record import BackboneRecord
from extract.weights import ResolvedWeights, resolve_record_weights, resolve_weights


@dataclass
class BuiltBackbone:
    spec: BackboneSpec
    model: keras.Model  # input: (N, H, W, 3) uint8 RGB; output: (N, feature_dim) or (N, 1000)
    weights: ResolvedWeights
    record: BackboneRecord  # what the model computes: the record it was built from, or a new one

    @property
    def input_size(self) -> int:
        return self.record.input_size


def check_input_size(spec: BackboneSpec, input_size: int | None) -> int:
    size = int(input_size or spec.input_size)
    if size < spec.min_input_size:
        raise TransferKitError(f"{spec.name} needs an input size of at least {spec.min_input_size} px, got {size}")
    return size


def build_base(spec: BackboneSpec, weights: ResolvedWeights, size: int, include_top: bool) -> keras.Model:
    """The bare Keras application (expects preprocessed float input)."""
    constructor = spec.resolve_constructor()
    kwargs = dict(include_top=include_top, input_shape=(size, size, 3))
    if not include_top:
        kwargs["pooling"] = "avg"
    if include_top and size != spec.input_size:
        raise TransferKitError(f"the ImageNet top of {spec.name} needs input size {spec.input_size}")
    try:
        return constructor(weights=str(weights.path) if weights.path else None, **kwargs)
    except (ValueError, OSError, KeyError, TypeError) as exc:  # weights of another architecture, a broken file
        raise TransferKitError(f"cannot load weights into {spec.name}: {first_sentence(exc)} (are they "
                               f"{spec.name} weights{' with' if include_top else ' without'} the top?)") from None


def first_sentence(exc: BaseException, limit: int = 200) -> str:
    """Keras' weight-loading errors list every layer (kilobytes): keep the line that says what is wrong."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.split(". ", 2)
    text = ". ".join(text[:2])
    return text if len(text) <= limit else text[:limit - 3] + "..."


def build_backbone(
    name: str,
    weights: str | None = "imagenet",
    input_size: int | None = None,
    include_top: bool = False,
    seed: int = 0,
) -> BuiltBackbone:
    """A frozen backbone with preprocessing inside the graph, and a new record describing it.

    ``weights="none"`` initialises randomly from ``seed`` so repeated runs build the same model
    (the store relies on that to mix features from several runs).
    """
    spec = get_backbone(name)
    size = check_input_size(spec, input_size)
    resolved = resolve_weights(spec, weights, include_top=include_top, seed=seed)
    return _assemble(spec, resolved, BackboneRecord.create(spec, resolved.record(), size), include_top)


def build_from_record(record: BackboneRecord, weights: str | None = None,
                      who: str = "the record describes") -> BuiltBackbone:
    """The frozen backbone whose features ``record`` describes, carrying ``record`` unchanged.

    ``weights``: the user's choice (None: the record's own kind). Refuses, before the slow build, a
    backbone or weights that differ from the record's (``who`` starts those messages).
    """
    spec, resolved = resolve_record_weights(record, weights, who)
    return _assemble(spec, resolved, record, include_top=False)


def _assemble(spec: BackboneSpec, resolved: ResolvedWeights, record: BackboneRecord,
              include_top: bool) -> BuiltBackbone:
    size = check_input_size(spec, record.input_size)
    if resolved.path is None:
        keras.utils.set_random_seed(resolved.seed or 0)
    base = build_base(spec, resolved, size, include_top)
    base.trainable = False
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = ImagePreprocessing(record.preprocessing.mode, name="preprocessing")(image)
    # training=False keeps BatchNorm in inference mode even if someone later unfreezes the base.
    out = base(x, training=False)
    model = keras.Model(image, out, name=f"{spec.name}_{'classifier' if include_top else 'features'}")
    return BuiltBackbone(spec=spec, model=model, weights=resolved, record=record)
