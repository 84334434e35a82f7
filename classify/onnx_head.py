"""Heads as ONNX graphs: features float32 [N, D] in, probabilities float32 [N, C] out.

Plain standard operators only, so any runtime runs them and the export step can append a head to
a backbone graph by renaming its input:
- dense heads (svm, softmax, mlp), with the train-split standardisation folded into the first layer:
  ``MatMul -> Add (-> Relu -> MatMul -> Add)* -> Softmax``;
- the RBF head: ``-gamma |x - s|^2 = 2 gamma x.s - gamma |x|^2 - gamma |s|^2`` puts the kernel on one
  MatMul against the support vectors, then ``Exp -> MatMul -> Add -> Softmax``.
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


def _dense_nodes(layers: Layers, current: str, prefix: str = "") -> tuple[list, list, str]:
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
    nodes, initializers, logits = _dense_nodes(layers, INPUT)
    return _softmax_model(nodes, initializers, logits, layers[0][0].shape[0], layers[-1][0].shape[1], opset,
                          name, metadata)


def rbf_softmax_graph(mean: np.ndarray, scale: np.ndarray, support_vectors: np.ndarray, gamma: float,
                      output_layer: tuple[np.ndarray, np.ndarray], opset: int = 17, name: str = "rbf_head",
                      metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """softmax(exp(-gamma |(x - mean) / scale - s|^2) @ coef + intercept) over the support vectors s."""
    if opset < 13:
        raise ValueError("the RBF head graph needs opset 13 or later (ReduceSum with axes as an input)")
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
    dense, dense_initializers, logits = _dense_nodes([output_layer], "kernel", prefix="out_")
    return _softmax_model(nodes + dense, initializers + dense_initializers, logits, sv.shape[1],
                          output_layer[0].shape[1], opset, name, metadata)
