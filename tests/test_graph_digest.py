"""model_id's digest (export/metadata.graph_digest): the same computation gives the same digest
whatever the tensor names and the order of independent nodes (tf2onnx changes both between two
conversions of one model), and any change to what is computed changes it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.metadata import graph_digest


def two_branches(names: dict[str, str], order: tuple[int, int, int], weight: float = 2.0,
                 subtract_from_left: bool = True) -> onnx.ModelProto:
    """x -> (x * w) and (x + w) side by side -> their difference."""
    n = {k: names.get(k, k) for k in ("x", "w", "a", "b", "y")}
    nodes = [helper.make_node("Mul", [n["x"], n["w"]], [n["a"]], name=names.get("mul", "mul")),
             helper.make_node("Add", [n["x"], n["w"]], [n["b"]], name=names.get("add", "add")),
             helper.make_node("Sub", [n["a"], n["b"]] if subtract_from_left else [n["b"], n["a"]], [n["y"]],
                              name=names.get("sub", "sub"))]
    graph = helper.make_graph(
        [nodes[k] for k in order], "g",
        [helper.make_tensor_value_info(n["x"], TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info(n["y"], TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([weight, 3.0], np.float32), n["w"])])
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    return model


def test_names_and_the_order_of_independent_branches_do_not_change_the_digest():
    first = graph_digest(two_branches({}, (0, 1, 2)))
    renamed = {"x": "input__7", "w": "const__12", "a": "Mul__100", "b": "Add__99", "y": "out", "mul": "n9", "add": "n1"}
    assert graph_digest(two_branches(renamed, (1, 0, 2))) == first  # Add listed before Mul: the same computation


def test_a_weight_or_the_wiring_changes_the_digest():
    first = graph_digest(two_branches({}, (0, 1, 2)))
    assert graph_digest(two_branches({}, (0, 1, 2), weight=2.5)) != first
    assert graph_digest(two_branches({}, (0, 1, 2), subtract_from_left=False)) != first
