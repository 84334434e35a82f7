"""Cut a backbone at a block boundary into a frozen front and a trainable back that share its layers.

Fine-tuning only the last blocks of a backbone leaves everything before them frozen: their output
for an image never changes, so it is computed once and cached (``export.front_cache``), and training
runs the last blocks alone. The cut is the output of the block before the last ``blocks`` blocks;
blocks are recognised by their layer names, which every Keras application and the project's
EfficientNet-Lite share (``blocks_11_...``, ``block_12_...``, ``conv4_block6_...``, ``block6a_...``).
A cut is valid only where that one tensor is all the back needs (no skip connection crosses it):
the back is rebuilt from the backbone's own graph from the cut onwards, and refused otherwise.

Both halves call the backbone's layer objects, so training the back trains the backbone itself and
the usual classifier model built on it (``export.keras_models.classifier_model``) is the result.

    halves = cut_backbone(built, blocks=4)
    cached = halves.front(images)            # uint8 images -> (N, 7, 7, 192) for lite0 at 224 px
    features = halves.back(cached, training=False)   # == built.model(images)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import keras

from export.keras_models import backbone_of
from extract.errors import TransferKitError
from extract.models import BuiltBackbone

BLOCK_NAME = re.compile(r"^(.*?blocks?_?\d+[a-z]?)_")


def block_of(layer_name: str) -> str | None:
    """The block a layer belongs to by its name (``blocks_11_bn2`` -> ``blocks_11``), None outside blocks."""
    match = BLOCK_NAME.match(layer_name)
    return match.group(1) if match else None


@dataclass
class BackboneHalves:
    front: keras.Model  # uint8 image -> the cut tensor (preprocessing included); frozen
    back: keras.Model  # the cut tensor -> the backbone's pooled features; call with training=False
    cut_layer: str  # the layer whose output is cached
    blocks: list[str]  # the blocks the back holds, in order
    back_layers: int  # backbone layers after the cut (set_trainable's count)


def block_names(base: keras.Model) -> list[str]:
    """The backbone's blocks in graph order."""
    return list(dict.fromkeys(b for b in (block_of(layer.name) for layer in base.layers) if b))


def cut_backbone(built: BuiltBackbone, blocks: int) -> BackboneHalves:
    """Split ``built`` before its last ``blocks`` blocks (0: only the layers after the last block train)."""
    base = backbone_of(built.model)
    names = block_names(base)
    if blocks < 0 or blocks >= len(names):
        raise TransferKitError(f"--blocks must be between 0 and {len(names) - 1} for {built.spec.name} "
                               f"({len(names)} blocks), got {blocks}")
    before = names[len(names) - blocks - 1]
    cut_index = max(i for i, layer in enumerate(base.layers) if block_of(layer.name) == before)
    cut = base.layers[cut_index]
    back = _graph_from(base, cut)
    image = keras.Input(built.model.input.shape[1:], dtype="uint8", name="image")
    x = built.model.get_layer("preprocessing")(image)
    front = keras.Model(image, keras.Model(base.input, cut.output, name="front_layers")(x, training=False),
                        name=f"{built.spec.name}_front")
    return BackboneHalves(front=front, back=back, cut_layer=cut.name, blocks=names[len(names) - blocks:],
                          back_layers=len(base.layers) - cut_index - 1)


def _graph_from(base: keras.Model, cut: keras.layers.Layer) -> keras.Model:
    """The part of ``base``'s graph computable from ``cut``'s output alone, on a new input.

    Replays the backbone's nodes in depth order (as Keras' own ``Functional`` call does), starting from
    the cut tensor; a node that needs a tensor from before the cut is skipped, so a cut crossed by a
    skip connection leaves the output uncomputed and is refused.
    """
    from keras import tree

    start = keras.Input(cut.output.shape[1:], name=f"{cut.name}_output")
    computed = {id(cut.output): start}
    for depth in sorted(base._nodes_by_depth, reverse=True):
        for node in base._nodes_by_depth[depth]:
            if not node.operation or node.is_input or any(id(x) not in computed for x in node.input_tensors):
                continue
            args, kwargs = node.arguments.fill_in(computed)
            for ref, value in zip(node.outputs, tree.flatten(node.operation(*args, **kwargs))):
                computed[id(ref)] = value
    if id(base.output) not in computed:
        raise TransferKitError(f"cannot cut {base.name} after {cut.name}: a connection crosses it")
    return keras.Model(start, computed[id(base.output)], name=f"{base.name}_back")
