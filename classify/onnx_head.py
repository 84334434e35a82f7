"""Heads as ONNX graphs: features float32 [N, D] in, probabilities float32 [N, C] out.

Plain standard operators only, so any runtime runs them and the export step can append a head to
a backbone graph by renaming its input:
- dense heads (svm, softmax, mlp), with the train-split standardisation folded into the first layer:
  ``MatMul -> Add (-> Relu -> MatMul -> Add)* -> Softmax``;
- SVM heads (svm, rbf): pair decisions, then their vote scores ``Sign -> MatMul`` plus the squashed
  summed decisions (classify.svm.class_scores), divided by the temperature, ``-> Softmax``; the RBF
  head's decisions come from its kernel: ``-gamma |x - s|^2 = 2 gamma x.s - gamma |x|^2 - gamma |s|^2``
  puts it on one MatMul against the support vectors, then ``Exp -> MatMul -> Add``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from classify.dense import Layers

INPUT = "features"
OUTPUT = "probabilities"


def _initializer(array, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def dense_nodes(layers: Layers, current: str = INPUT, prefix: str = "") -> tuple[list, list, str]:
    """MatMul + Add per layer, Relu between layers; returns (nodes, initializers, output name)."""
    nodes, initializers = [], []
    for i, (W, b) in enumerate(layers):
        initializers += [_initializer(W, f"{prefix}W{i}"), _initializer(b, f"{prefix}b{i}")]
        nodes += [helper.make_node("MatMul", [current, f"{prefix}W{i}"], [f"{prefix}matmul{i}"]),
                  helper.make_node("Add", [f"{prefix}matmul{i}", f"{prefix}b{i}"], [f"{prefix}dense{i}"])]
        current = f"{prefix}dense{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"{prefix}relu{i}"]))
            current = f"{prefix}relu{i}"
    return nodes, initializers, current


def _softmax_model(nodes: list, initializers: list, logits: str, n_features: int, n_classes: int, opset: int,
                   name: str, metadata: dict[str, str] | None) -> onnx.ModelProto:
    nodes = [*nodes, helper.make_node("Softmax", [logits], [OUTPUT], axis=-1)]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", n_classes])],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="transferkit",
                              ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(model, metadata or {})
    onnx.checker.check_model(model, full_check=True)
    return model


def dense_softmax_graph(layers: Layers, opset: int = 17, name: str = "head",
                        metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    nodes, initializers, logits = dense_nodes(layers)
    return _softmax_model(nodes, initializers, logits, layers[0][0].shape[0], layers[-1][0].shape[1], opset,
                          name, metadata)


def rbf_kernel_nodes(mean: np.ndarray, scale: np.ndarray, support_vectors: np.ndarray,
                     gamma: float) -> tuple[list, list, str]:
    """exp(-gamma |(x - mean) / scale - s|^2) for every support vector s: (nodes, initializers, output)."""
    sv = np.asarray(support_vectors, np.float64)
    initializers = [
        _initializer(mean, "mean"), _initializer(scale, "scale"),
        _initializer((2.0 * gamma * sv).T, "sv_2gamma_T"),  # (features, n_support)
        _initializer(-gamma * (sv * sv).sum(axis=1), "minus_gamma_sv_sq"),  # (n_support,)
        _initializer(-gamma, "minus_gamma"), _initializer(0.0, "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Sub", [INPUT, "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "scale"], ["standardised"]),
        helper.make_node("Mul", ["standardised", "standardised"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "axis1"], ["x_sq"], keepdims=1),  # (N, 1)
        helper.make_node("Mul", ["x_sq", "minus_gamma"], ["minus_gamma_x_sq"]),
        helper.make_node("MatMul", ["standardised", "sv_2gamma_T"], ["cross"]),  # (N, n_support)
        helper.make_node("Add", ["cross", "minus_gamma_sv_sq"], ["partial"]),
        helper.make_node("Add", ["partial", "minus_gamma_x_sq"], ["exponent_raw"]),
        helper.make_node("Min", ["exponent_raw", "zero"], ["exponent"]),  # |x - s|^2 >= 0, as in numpy
        helper.make_node("Exp", ["exponent"], ["kernel"]),
    ]
    return nodes, initializers, "kernel"


def pairwise_softmax_graph(nodes: list, initializers: list, decisions: str, n_features: int, pair_signs: np.ndarray,
                           temperature: float, opset: int = 17, name: str = "svm_head",
                           metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """softmax(class_scores(decisions) / temperature) after ``nodes`` computing the pair decisions."""
    if opset < 13:
        raise ValueError("SVM head graphs need opset 13 or later (ReduceSum with axes as an input)")
    initializers = [*initializers, _initializer(pair_signs / 2, "half_signs"), _initializer(pair_signs, "signs"),
                    _initializer(3.0, "three"), _initializer(1.0 / temperature, "inverse_temperature")]
    nodes = [
        *nodes,
        helper.make_node("Sign", [decisions], ["pair_winners"]),
        helper.make_node("MatMul", ["pair_winners", "half_signs"], ["votes"]),  # votes, up to a constant
        helper.make_node("MatMul", [decisions, "signs"], ["confidence"]),
        helper.make_node("Abs", ["confidence"], ["abs_confidence"]),
        helper.make_node("Add", ["abs_confidence", "one"], ["abs_confidence_1"]),
        helper.make_node("Mul", ["abs_confidence_1", "three"], ["squash"]),
        helper.make_node("Div", ["confidence", "squash"], ["squashed"]),  # in (-1/3, 1/3): below one vote
        helper.make_node("Add", ["votes", "squashed"], ["class_scores"]),
        helper.make_node("Mul", ["class_scores", "inverse_temperature"], ["logits"]),
    ]
    initializers.append(_initializer(1.0, "one"))
    return _softmax_model(nodes, initializers, "logits", n_features, pair_signs.shape[1], opset, name, metadata)
