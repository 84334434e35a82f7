"""Model hot-swap: the runner loads a replaced --model file between batches, refuses bad ones, and keeps
exactly one line per file across swaps and SIGKILLs.

Models are told apart by their answers: the tiny colour model of ``test_edge`` with its weight
matrix rolled by ``shift`` labels a red image CLASSES[(0 + shift) % 3], so each line's label shows
which model classified it, and must agree with the line's ``model`` id.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_edge import (CLASSES, METADATA, REPO, build_model, count_lines, drop_images, files_under,
                       read_results, run_edge, solid, wait_for)

from edge.model import load_model
from edge.swap import ModelSwapper

SHIFTS = {"model-a": 0, "model-b": 1, "model-c": 2}


def build_shifted(path: Path, model_id: str, metadata: dict[str, str] | None = None) -> Path:
    """The tiny model answering CLASSES[(colour + shift) % 3], with its own model_id."""
    build_model(path, metadata={**METADATA, "model_id": model_id, **(metadata or {})})
    model = onnx.load(str(path))
    weights = np.roll(np.eye(3, dtype=np.float32) * 0.05, SHIFTS.get(model_id, 0), axis=1)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weights, "weights"))
    onnx.save(model, str(path))
    return path


def replace_atomically(target: Path, source: Path | bytes) -> None:
    """What a deployment does: write beside the model, then rename over it."""
    tmp = target.with_name(target.name + ".new")
    tmp.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    os.replace(tmp, target)


def expected_label(line: dict, truth: str) -> str:
    return CLASSES[(CLASSES.index(truth) + SHIFTS[line["model"]]) % 3]


def start_logged(*args, log: Path):
    """The runner with its stderr in ``log`` (read while it runs)."""
    handle = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "edge", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=handle)
    handle.close()
    return proc


def log_text(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""


# --- in a running runner ------------------------------------------------------------------------


def test_swaps_with_sigkills_around_them_keep_one_line_per_file_and_name_the_model(tmp_path):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    versions = {mid: build_shifted(tmp_path / f"{mid}.onnx", mid) for mid in SHIFTS}
    order = ["model-a", "model-b", "model-c"] * 3
    model = tmp_path / "deployed" / "model.onnx"
    model.parent.mkdir()
    replace_atomically(model, versions[order[0]])
    watch, results, done, log = tmp_path / "watch", tmp_path / "r.jsonl", tmp_path / "done", tmp_path / "edge.log"
    watch.mkdir()
    args = ("--model", model, "--watch", watch, "--results", results, "--done", done,
            "--batch-size", "3", "--poll-seconds", "0.05", "--threads", "1")
    expected = drop_images(watch, 0, 150)
    for round_, next_model in enumerate(order[1:6], start=1):
        text = log_text(log)
        before, swaps_before, loads_before = count_lines(results), text.count("model swapped"), text.count("loading and")
        proc = start_logged(*args, log=log)
        wait_for(lambda: count_lines(results) > before or proc.poll() is not None)
        replace_atomically(model, versions[next_model])
        if round_ == 1:  # at least one swap seen inside a process, and a line from the new model
            wait_for(lambda: log_text(log).count("model swapped") > swaps_before)
            after = count_lines(results)
            expected.update(drop_images(watch, 1000, 6))
            wait_for(lambda: count_lines(results) > after)
        elif round_ == 2:  # as soon as the load starts: during it, or right after it
            wait_for(lambda: log_text(log).count("loading and checking") > loads_before or proc.poll() is not None,
                     step=0.001)
        else:  # before, during or just after the load (settling takes --poll-seconds)
            time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.wait(timeout=20)
        expected.update(drop_images(watch, 150 + 40 * round_, 40))
    final = run_edge(*args, "--once")
    assert final.returncode == 0, final.stderr

    lines = read_results(results)
    counts = Counter(line["path"] for line in lines)
    assert set(counts) == set(expected), f"lost: {set(expected) - set(counts)} (seed {seed})"
    assert max(counts.values()) == 1, f"duplicated: {[p for p, n in counts.items() if n > 1]} (seed {seed})"
    assert all(line["label"] == expected_label(line, expected[line["path"]]) for line in lines), f"seed {seed}"
    runs = [mid for i, mid in enumerate(line["model"] for line in lines) if i == 0 or lines[i - 1]["model"] != mid]
    positions = [order.index(runs[0])]
    for mid in runs[1:]:  # never a line from an older model after one from a newer model
        positions.append(order.index(mid, positions[-1] + 1))
    assert len(runs) >= 3 and runs[-1] == order[5], (runs, seed)
    assert files_under(done) == set(expected) and files_under(watch) == set()
    assert "refused" not in log_text(log)


def test_a_bad_replacement_is_refused_once_and_the_old_model_keeps_running(tmp_path):
    model = build_shifted(tmp_path / "model.onnx", "model-a")
    watch, results, log = tmp_path / "watch", tmp_path / "r.jsonl", tmp_path / "edge.log"
    watch.mkdir()
    proc = start_logged("--model", model, "--watch", watch, "--results", results, "--poll-seconds", "0.05",
                        "--threads", "1", log=log)
    try:
        solid(watch / "0.png", "red")
        wait_for(lambda: count_lines(results) == 1)
        wrong_input = build_shifted(tmp_path / "wrong.onnx", "model-b", {"input_size": "[32, 32]"})
        for n, bad in enumerate([b"not an onnx file", wrong_input], start=1):
            replace_atomically(model, bad)
            wait_for(lambda: log_text(log).count("refused the new model file") == n)
            solid(watch / f"{n}.png", "red")
            wait_for(lambda: count_lines(results) == n + 1)
        time.sleep(0.5)  # ten polls: the refused file is not tried again
        replace_atomically(model, build_shifted(tmp_path / "good.onnx", "model-b"))
        wait_for(lambda: "model swapped: model-a -> model-b" in log_text(log))
        solid(watch / "3.png", "red")
        wait_for(lambda: count_lines(results) == 4)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0
    text = log_text(log)
    refusals = [line for line in text.splitlines() if "refused" in line]
    assert len(refusals) == 2 and all("still running model-a" in line for line in refusals)
    assert "cannot load ONNX model" in refusals[0] and "does not match" in refusals[1]
    labels = [(line["path"], line["model"], line["label"]) for line in read_results(results)]
    assert labels == [("0.png", "model-a", "red"), ("1.png", "model-a", "red"), ("2.png", "model-a", "red"),
                      ("3.png", "model-b", "green")]


# --- the swapper alone --------------------------------------------------------------------------


def _counting_loader(calls: list[Path]):
    def load(path, threads):
        calls.append(path)
        return load_model(path, threads)
    return load


@pytest.mark.parametrize("bad, message", [
    (b"\x08\x07garbage", "cannot load ONNX model"),
    ({"class_names": json.dumps(["a", "b"])}, "expected [1, 2]"),
    ({"preprocessing": json.dumps({"in_graph": False})}, "not inside the graph"),
    ({"input_size": "[32, 32]"}, "does not match"),
    ({"drift_reference": json.dumps({"class_share": {"red": 2.0}, "mean_confidence": 0.9})}, "drift_reference"),
])
def test_swapper_refuses_unusable_files_once_per_version(tmp_path, caplog, bad, message):
    path = build_shifted(tmp_path / "model.onnx", "model-a")
    calls: list[Path] = []
    swapper = ModelSwapper(path, 1, load_model(path, 1), settle_seconds=0.0, load=_counting_loader(calls))
    assert swapper.check() is None and calls == []  # unchanged: nothing loaded
    replace_atomically(path, bad if isinstance(bad, bytes) else build_shifted(tmp_path / "bad.onnx", "m", bad))
    with caplog.at_level(logging.INFO, logger="edge"):
        for _ in range(5):
            assert swapper.check() is None
    assert len(calls) == 1 and swapper.refusals == 1
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and message in refused[0] and "still running model-a" in refused[0]
    replace_atomically(path, build_shifted(tmp_path / "good.onnx", "model-b"))
    new = swapper.check()
    assert new is not None and new.model_id == "model-b" and swapper.check() is None and len(calls) == 2


def test_swapper_waits_for_the_file_to_settle_and_survives_its_removal(tmp_path, caplog):
    path = build_shifted(tmp_path / "model.onnx", "model-a")
    swapper = ModelSwapper(path, 1, load_model(path, 1), settle_seconds=0.3)
    replace_atomically(path, build_shifted(tmp_path / "b.onnx", "model-b"))
    assert swapper.check() is None and swapper.seconds_to_check() <= 0.3  # just replaced: settling
    time.sleep(0.35)
    assert swapper.check().model_id == "model-b"
    path.unlink()
    with caplog.at_level(logging.INFO, logger="edge"):
        swapper.check()
        time.sleep(0.35)
        for _ in range(3):
            assert swapper.check() is None
    assert sum("is gone; still running model-b" in r.getMessage() for r in caplog.records) == 1
    replace_atomically(path, build_shifted(tmp_path / "c.onnx", "model-c"))
    time.sleep(0.35)
    swapper.check()
    time.sleep(0.35)
    assert swapper.check().model_id == "model-c"
