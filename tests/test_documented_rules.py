"""Documented rules outside the heads that a deliberate breakage once left green (issue 11).

Each test names the rule it holds and fails when the rule is broken: NFC-equivalent class folders
give one class (extract/dataset.py), a file still growing is not picked up by the edge watcher
(edge/watch.py), and onnxruntime threads do not spin where the code says they do not
(extract/engine.py, edge/model.py).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edge.watch
from edge.model import session_options
from edge.watch import Watcher
from extract.dataset import discover
from extract.engine import onnx_session

INTRA_SPIN = "session.intra_op.allow_spinning"
INTER_SPIN = "session.inter_op.allow_spinning"


def test_nfc_equivalent_class_folders_are_one_class(tmp_path):
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # the same name, as macOS and Linux may write it
    assert composed != decomposed and unicodedata.normalize("NFC", decomposed) == composed
    for folder in (composed, decomposed, "thé"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            (tmp_path / folder / f"{len(folder)}-{i}.jpg").write_bytes(b"not decoded by discover")
    dataset = discover(tmp_path)
    assert dataset.class_names == [composed, "thé"]
    assert sorted(e.class_name for e in dataset.entries) == [composed] * 4 + ["thé"] * 2


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_file_still_growing_is_not_picked_up(tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(edge.watch, "time", SimpleNamespace(monotonic=clock.monotonic))
    watcher = Watcher(str(tmp_path), frozenset(), settle_seconds=2.0, skip=lambda state: False, max_pending=10)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x" * 100)
    assert watcher.poll(limit=10) == []  # first sight: size unknown to be stable
    clock.now += 5
    with open(photo, "ab") as fh:  # the writer is still at it
        fh.write(b"x" * 100)
    assert watcher.poll(limit=10) == []  # grew since the last poll
    clock.now += 1
    assert watcher.poll(limit=10) == []  # unchanged, but only for 1 s of the 2 s settle time
    clock.now += 1
    assert [state.rel for state in watcher.poll(limit=10)] == ["photo.jpg"]


def _entry(options, key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # not set: onnxruntime's default
        return None


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_the_edge_runner_threads_never_spin():
    options = session_options(2)
    assert (_entry(options, INTRA_SPIN), _entry(options, INTER_SPIN)) == ("0", "0")
    assert options.inter_op_num_threads == 1


def test_the_extract_engine_has_no_spinning_inter_op_pool(tiny_model):
    session = onnx_session(tiny_model, threads=2, spinning=False)
    options = session.get_session_options()
    assert options.inter_op_num_threads == 1 and _entry(options, INTER_SPIN) in (None, "0")
    assert _entry(options, INTRA_SPIN) == "0"  # spinning=False is honoured
    assert session.run(None, {"x": np.array([[-1, 2, -3, 4]], np.float32)})[0].tolist() == [[0, 2, 0, 4]]
