"""bench/export_stages.py: export-onnx run in-process with its steps timed, and the wrappers removed after."""

from __future__ import annotations

import onnx

import export.onnx_export as onnx_export
import export.parity as parity
from bench.export_stages import run


def test_steps_are_timed_inside_the_command_and_put_back(workspace, tmp_path):
    before = onnx_export.keras_graph, onnx.checker.check_model, onnx_export.check_parity, parity.onnx_session
    out = tmp_path / "model.onnx"
    rows = run(["--store", str(workspace.store), "--head", str(workspace.head), "--out", str(out), "--quiet"])
    assert out.exists()
    assert (onnx_export.keras_graph, onnx.checker.check_model, onnx_export.check_parity, parity.onnx_session) == before
    whole, *steps = rows
    assert whole["step"] == "export-onnx" and whole["depth"] == 0 and whole["started"] == 0
    names = [row["step"] for row in steps]
    for name in ("build_feature_model", "keras_graph", "unknown_scorer", "onnx.checker.check_model", "check_parity"):
        assert name in names
    assert names.index("keras_graph") < names.index("check_parity")  # in the order they ran
    assert all(row["depth"] >= 1 for row in steps)
    top = [row for row in steps if row["depth"] == 1]
    assert sum(row["wall_seconds"] for row in top) <= whole["wall_seconds"]
    (check,) = [row for row in steps if row["step"] == "check_parity"]
    inside = [row["step"] for row in steps if check["started"] <= row["started"] <= check["started"] + check[
        "wall_seconds"] and row["depth"] == 2]
    assert inside.count("keras batch") == inside.count("onnxruntime batch") == 4  # 60 images, batches of 16
    assert inside.count("onnx_session") == 1
    for inner in (row for row in steps if row["depth"] > 1):  # a step called by another lies inside it
        assert any(outer["started"] <= inner["started"] <= outer["started"] + outer["wall_seconds"] for outer in top)
    assert all(row["peak_rss_mib"] >= row["rss_before_mib"] > 50 for row in rows)
