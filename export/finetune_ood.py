"""The unknown score of a fine-tuned model: the same Mahalanobis score as a head's, on its own features.

A fine-tuned network's features are not the store's (its backbone layers moved), so the scorer is
fitted on the network's penultimate features (the input of its final ``probabilities`` layer, after
fine-tuning) over the model's train and validation images, calibrated out of fold as every scorer
is (``classify/ood.py``). The cost is one inference pass of the fine-tuned network over those images.
The graph is converted with those features as a second output, the score's nodes are appended to it
(``classify/ood_graph.py``) and the features output is dropped again: the exported model has the same
two outputs, ``probabilities`` and ``ood_score``, as an export from a store and head.

    two = with_features_output(model)
    scorer = penultimate_scorer(two, images, size)
    graph = keras_graph(two, size, opset); add_score_output(graph, scorer)
"""

from __future__ import annotations

import keras
import numpy as np
import onnx

from classify.ood import MahalanobisScorer
from classify.ood_graph import add_ood_output
from export.data import LabelledImages, iter_batches
from extract.errors import TransferKitError

FEATURES = "features_for_ood"


def with_features_output(model: keras.Model) -> keras.Model:
    """``model`` with a second output: the input of its final ``probabilities`` layer."""
    try:
        penultimate = model.get_layer("probabilities").input
    except ValueError:
        raise TransferKitError(f"{model.name} has no 'probabilities' layer: it was not made by fine-tune") from None
    return keras.Model(model.inputs, [model.outputs[0], penultimate], name=model.name)


def penultimate_scorer(two_outputs: keras.Model, images: LabelledImages, size: int,
                       batch_size: int = 32) -> MahalanobisScorer:
    """The scorer fitted and calibrated on the penultimate features of every non-test image."""
    labelled = images.take(np.flatnonzero(images.split != "test"))
    features, labels = [], []
    for batch, batch_labels in iter_batches(labelled, size, batch_size):
        features.append(np.asarray(two_outputs(batch, training=False)[1], np.float64))
        labels.append(batch_labels)
    if not features:
        raise TransferKitError("no train or validation image could be read to calibrate the unknown score")
    return MahalanobisScorer().fit(np.concatenate(features), np.concatenate(labels))


def add_score_output(graph: onnx.ModelProto, scorer: MahalanobisScorer) -> None:
    """Score the graph's second output (the features) into ``ood_score`` and drop the features output."""
    features = graph.graph.output[1].name
    add_ood_output(graph, scorer, features=features)
    del graph.graph.output[1]
