"""The unknown score as ONNX nodes: a second output ``ood_score`` beside the head's probabilities.

Added to a head graph (features in), so the exported model computes it from the same features as
the classes: ``z = features @ W`` then the smallest squared distance from ``z`` to the whitened
class means. It is computed as a broadcast difference rather than the shorter ``|z|^2 - 2 z.c + |c|^2``
because float32 would lose the small distances to cancellation; the cost is one D x D MatMul per image.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from classify.ood import MahalanobisScorer

OOD_OUTPUT = "ood_score"


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _reduce(op: str, data: str, axis: int, out: str, opset: int, prefix: str) -> tuple[list, list]:
    """ReduceSum takes its axes as an input from opset 13, ReduceMin only from opset 18."""
    if op == "ReduceSum" or opset >= 18:
        axes = numpy_helper.from_array(np.array([axis], np.int64), f"{prefix}{op}_axes")
        return [helper.make_node(op, [data, axes.name], [out], keepdims=0, name=f"{prefix}{op}")], [axes]
    return [helper.make_node(op, [data], [out], axes=[axis], keepdims=0, name=f"{prefix}{op}")], []


def ood_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes ``add_ood_output`` added (under any prefix a merge put before ``ood/``)."""
    return [node.name for node in model.graph.node if "ood/" in node.name]


def add_ood_output(model: onnx.ModelProto, scorer: MahalanobisScorer, features: str = "features",
                   output: str = OOD_OUTPUT, prefix: str = "ood/") -> None:
    """Append the score of ``scorer`` on tensor ``features`` to ``model`` as output ``output`` (in place)."""
    whitening = np.asarray(scorer.whitening_, np.float32)
    centres = np.asarray(scorer.class_means_ @ scorer.whitening_, np.float32)[None]  # (1, C, D)
    opset = _opset(model)
    inits = [numpy_helper.from_array(whitening, f"{prefix}whitening"),
             numpy_helper.from_array(centres, f"{prefix}centres"),
             numpy_helper.from_array(np.array([1], np.int64), f"{prefix}class_axis")]
    nodes = [  # named, so that int8 quantization can leave them float (export/quantize.py)
        helper.make_node("MatMul", [features, f"{prefix}whitening"], [f"{prefix}z"], name=f"{prefix}MatMul"),
        helper.make_node("Unsqueeze", [f"{prefix}z", f"{prefix}class_axis"], [f"{prefix}z3"],
                         name=f"{prefix}Unsqueeze"),
        helper.make_node("Sub", [f"{prefix}z3", f"{prefix}centres"], [f"{prefix}diff"], name=f"{prefix}Sub"),
        helper.make_node("Mul", [f"{prefix}diff", f"{prefix}diff"], [f"{prefix}squared"], name=f"{prefix}Mul"),
    ]
    sum_nodes, sum_inits = _reduce("ReduceSum", f"{prefix}squared", 2, f"{prefix}distances", opset, prefix)
    min_nodes, min_inits = _reduce("ReduceMin", f"{prefix}distances", 1, output, opset, prefix)
    model.graph.node.extend(nodes + sum_nodes + min_nodes)
    model.graph.initializer.extend(inits + sum_inits + min_inits)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    model.graph.output.append(helper.make_tensor_value_info(
        output, TensorProto.FLOAT, [batch.dim_param or batch.dim_value or "N"]))
