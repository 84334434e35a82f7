"""Heads as ONNX graphs: features float32 [N, D] in, probabilities float32 [N, C] out.

Every head reduces to dense layers with the train-split standardisation folded into the first one,
so the graph is only ``MatMul -> Add (-> Relu -> MatMul -> Add)* -> Softmax``: any runtime runs it
and the export step can append it to a backbone graph by renaming its input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from classify.dense import Layers

INPUT = "features"
OUTPUT = "probabilities"


def dense_softmax_graph(layers: Layers, opset: int = 17, name: str = "head",
                        metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    nodes, initializers = [], []
    current = INPUT
    for i, (W, b) in enumerate(layers):
        initializers += [numpy_helper.from_array(np.asarray(W, np.float32), f"W{i}"),
                         numpy_helper.from_array(np.asarray(b, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [current, f"W{i}"], [f"matmul{i}"]),
                  helper.make_node("Add", [f"matmul{i}", f"b{i}"], [f"dense{i}"])]
        current = f"dense{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"]))
            current = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [current], [OUTPUT], axis=-1))
    n_features, n_classes = layers[0][0].shape[0], layers[-1][0].shape[1]
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
