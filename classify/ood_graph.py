"""The unknown score as ONNX nodes: a second output ``ood_score`` beside the head's probabilities.

Added to a head graph (features in), so the exported model computes it from the same features as
the classes (``classify/ood.py``): the centred features are projected on the D x k basis and whitened,
the residual outside the basis (``centred - projected @ basis.T``) is scaled by its one variance, and
the score is the smallest sum of the squared distances of both to the class means' own parts. The
distances are broadcast differences rather than the shorter ``|z|^2 - 2 z.c + |c|^2`` because float32
would lose the small distances to cancellation. When k is at least half of D, one D x D whitening
matrix (``Geometry.whitening``) computes the same score with one product instead of two D x k ones, so
a graph never costs more than the full covariance's did; at D = 3840 and k = 1024 it carries a
3840 x 1024 basis (15.7 MB) instead of a 3840 x 3840 matrix (59 MB).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from classify.ood import Geometry, MahalanobisScorer

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


def _squared_distances(points: str, centres: str, out: str, opset: int, prefix: str) -> tuple[list, list]:
    """``out[n, c] = |points[n] - centres[0, c]|^2`` as a broadcast difference (no float32 cancellation)."""
    node = helper.make_node
    nodes = [node("Unsqueeze", [points, f"{prefix}class_axis"], [f"{points}3"], name=f"{points}/Unsqueeze"),
             node("Sub", [f"{points}3", centres], [f"{points}/diff"], name=f"{points}/Sub"),
             node("Mul", [f"{points}/diff", f"{points}/diff"], [f"{points}/squared"], name=f"{points}/Mul")]
    sums, inits = _reduce("ReduceSum", f"{points}/squared", 2, out, opset, f"{points}/")
    return nodes + sums, inits


def _square_form(geometry: Geometry, p: str) -> tuple[list, list, list[str]]:
    """One D x D whitening product: weights, nodes, and the (N, C) squared distances' tensors to add."""
    whitening = geometry.whitening()
    weights = [("whitening", whitening), ("centres", ((geometry.class_means - geometry.mean) @ whitening)[None])]
    nodes = [helper.make_node("MatMul", [f"{p}centred", f"{p}whitening"], [f"{p}inside"], name=f"{p}MatMul")]
    return weights, nodes, [(f"{p}inside", f"{p}centres")]


def _basis_form(geometry: Geometry, p: str) -> tuple[list, list, list[str]]:
    """The D x k basis, whitened inside, and the residual outside it scaled by its one variance."""
    inside, outside = geometry.parts(geometry.class_means - geometry.mean)
    weights = [("basis", geometry.basis), ("scales", geometry.scales), ("centres", inside[None]),
               ("residual_scale", np.array(geometry.residual_scale)), ("residual_centres", outside[None])]
    node = helper.make_node
    nodes = [node("MatMul", [f"{p}centred", f"{p}basis"], [f"{p}projected"], name=f"{p}MatMul"),
             node("Mul", [f"{p}projected", f"{p}scales"], [f"{p}inside"], name=f"{p}Whiten"),
             node("Gemm", [f"{p}projected", f"{p}basis"], [f"{p}back"], transB=1, name=f"{p}Back"),
             node("Sub", [f"{p}centred", f"{p}back"], [f"{p}residual"], name=f"{p}Residual"),
             node("Mul", [f"{p}residual", f"{p}residual_scale"], [f"{p}outside"], name=f"{p}ScaleResidual")]
    return weights, nodes, [(f"{p}inside", f"{p}centres"), (f"{p}outside", f"{p}residual_centres")]


def add_ood_output(model: onnx.ModelProto, scorer: MahalanobisScorer, features: str = "features",
                   output: str = OOD_OUTPUT, prefix: str = "ood/") -> None:
    """Append the score of ``scorer`` on tensor ``features`` to ``model`` as output ``output`` (in place).

    Two equal forms, the cheaper one chosen: the D x k basis and the residual (two D x k products per
    image) when 2k < D, else one D x D whitening matrix."""
    geometry, p, opset = scorer.geometry_, prefix, _opset(model)
    width, k = geometry.basis.shape
    weights, form_nodes, parts = (_square_form if 2 * k >= width else _basis_form)(geometry, p)
    nodes = [helper.make_node("Sub", [features, f"{p}mean"], [f"{p}centred"], name=f"{p}Centre"), *form_nodes]
    inits = [numpy_helper.from_array(np.asarray(value, np.float32), f"{p}{name}")
             for name, value in [("mean", geometry.mean), *weights]]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), f"{p}class_axis"))
    sums = []
    for points, centres in parts:  # named, so that int8 quantization can leave them float (export/quantize.py)
        part_nodes, part_inits = _squared_distances(points, centres, f"{points}_distances", opset, p)
        nodes, inits, sums = nodes + part_nodes, inits + part_inits, sums + [f"{points}_distances"]
    if len(sums) == 2:
        nodes.append(helper.make_node("Add", sums, [f"{p}distances"], name=f"{p}Add"))
    min_nodes, min_inits = _reduce("ReduceMin", f"{p}distances" if len(sums) == 2 else sums[0], 1, output, opset, p)
    model.graph.node.extend(nodes + min_nodes)
    model.graph.initializer.extend(inits + min_inits)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    model.graph.output.append(helper.make_tensor_value_info(
        output, TensorProto.FLOAT, [batch.dim_param or batch.dim_value or "N"]))
