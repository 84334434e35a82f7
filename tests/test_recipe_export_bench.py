"""bench/recipe_export.py: the ONNX size split it reports, its markdown, and the CPU time it reads."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.memory import timed_command
from bench.recipe_export import onnx_sizes, to_markdown


def test_unknown_score_bytes_are_the_ood_initializers(tmp_path):
    weights = numpy_helper.from_array(np.ones((4, 3), np.float32), "head/W")
    basis = numpy_helper.from_array(np.ones((4, 8), np.float32), "merged/ood/basis")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "head/W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weights, basis])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    sizes = onnx_sizes(path)
    assert sizes == {"onnx_bytes": path.stat().st_size, "unknown_score_bytes": 4 * 8 * 4}


def test_timed_command_reads_cpu_seconds_and_stdout(tmp_path):
    busy = timed_command(["-c", "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\n"
                          "print('done')"], tmp_path)
    assert busy["cpu_seconds"] >= 0.4 and busy["wall_seconds"] >= busy["cpu_seconds"] - 0.1
    assert busy["stdout"].strip() == "done" and busy["peak_rss_mib"] > 1


def test_markdown_has_each_step_the_kept_head_sizes_and_parity():
    step = {"wall_seconds": 12.5, "cpu_seconds": 20.25, "peak_rss_mib": 900.4, "load_average_after": 3.2}
    result = {"data": "../shared/datasets/trashnet", "store": "/tmp/s.h5", "features": "a@flip+b@flip",
              "kept": {"kind": "rbf", "cv_accuracy": 0.9012, "cv_std": 0.01, "test_accuracy": 0.89},
              "steps": [{"step": "fit-head --kind all", **step}, {"step": "export-onnx", **step, "stages": [
                  {"step": "export-onnx", "what": "whole", "depth": 0, "started": 0.0, "wall_seconds": 100.0,
                   "cpu_seconds": 90.0, "rss_before_mib": 300.0, "peak_rss_mib": 9000.0},
                  {"step": "keras_graph", "what": "tf2onnx", "depth": 1, "started": 5.0, "wall_seconds": 60.0,
                   "cpu_seconds": 50.0, "rss_before_mib": 800.0, "peak_rss_mib": 8000.0},
                  {"step": "onnx.checker.check_model", "what": "check", "depth": 2, "started": 6.0,
                   "wall_seconds": 3.0, "cpu_seconds": 3.0, "rss_before_mib": 900.0, "peak_rss_mib": 950.0},
                  {"step": "keras batch", "what": "one batch", "depth": 2, "started": 80.0, "wall_seconds": 4.0,
                   "cpu_seconds": 3.0, "rss_before_mib": 900.0, "peak_rss_mib": 5000.0},
                  {"step": "keras batch", "what": "one batch", "depth": 2, "started": 90.0, "wall_seconds": 5.0,
                   "cpu_seconds": 4.0, "rss_before_mib": 900.0, "peak_rss_mib": 7000.0},
                  {"step": "graph_model_id", "what": "digest", "depth": 1, "started": 70.0, "wall_seconds": 0.5,
                   "cpu_seconds": 0.5, "rss_before_mib": 900.0, "peak_rss_mib": 900.0}]}],
              "onnx_bytes": 3 * 2**20, "unknown_score_bytes": 2**20,
              "parity": "parity on 64 images: max |p_keras - p_onnx| = 1.00e-06"}
    text = to_markdown(result)
    assert "| `export-onnx` | 12.5 | 20.2 | 900 | 3.2 |" in text
    assert "`rbf`, cross-validation accuracy 0.901 ± 0.010, test accuracy 0.890" in text
    assert "3.0 MiB, of which the unknown score's weights 1.0 MiB" in text and "parity on 64 images" in text
    assert "| `keras_graph` | tf2onnx | 1 | 5.0 | 60.0 | 50.0 | 800 | 8000 |" in text
    assert "| > `onnx.checker.check_model` | check | 1 | 6.0 | 3.0 |" in text
    assert "| > `keras batch` | one batch | 2 | 80.0 | 9.0 | 7.0 | 900 | 7000 |" in text  # calls summed
    assert "graph_model_id" not in text  # under 1 % of the command's wall time
