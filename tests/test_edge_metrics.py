"""``--metrics``: the Prometheus text file the runner keeps up to date, read back with prometheus_client's
own parser (a test-only dependency; the edge writes the format itself), and the drift gauges against
the ``drift_reference`` in the model's metadata."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
from test_edge import METADATA, build_model, count_lines, read_results, run_edge, solid, wait_for
from test_edge_swap import log_text, start_logged

from edge.__main__ import main as edge_main
from edge.metrics import Metrics

parser = pytest.importorskip("prometheus_client.parser", reason="pip install prometheus_client (test extra)")


def reference(share: dict[str, float], confidence: float = 0.9) -> dict[str, str]:
    return {"drift_reference": json.dumps({"class_share": share, "mean_confidence": confidence,
                                           "split": "validation", "rows": 30})}


def samples(path: Path) -> dict[tuple, float]:
    """{(sample name, sorted labels...): value}, through the reference parser (which raises on bad text)."""
    out = {}
    for family in parser.text_string_to_metric_families(path.read_text(encoding="utf-8")):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def families(path: Path) -> dict[str, str]:
    return {f.name: f.type for f in parser.text_string_to_metric_families(path.read_text(encoding="utf-8"))}


def test_metrics_file_counts_what_the_runner_did(tmp_path):
    model = build_model(tmp_path / "m.onnx", metadata={**METADATA, **reference({c: 1 / 3 for c in
                                                                                ("red", "green", "blue")})})
    watch = tmp_path / "watch"
    for i in range(4):
        solid(watch / f"r{i}.png", "red")
    solid(watch / "g.png", "green")
    solid(watch / "sub" / "b.png", "blue")
    (watch / "broken.png").write_bytes(b"\x89PNG broken")
    metrics = watch / "edge.prom"  # inside the watch folder: never classified
    done = run_edge("--model", model, "--watch", watch, "--results", tmp_path / "r.jsonl", "--once",
                    "--poll-seconds", "0.05", "--metrics", metrics, "--drift-window", "10")
    assert done.returncode == 0, done.stderr
    assert {line["path"] for line in read_results(tmp_path / "r.jsonl")} == {
        "r0.png", "r1.png", "r2.png", "r3.png", "g.png", "sub/b.png", "broken.png"}
    got = samples(metrics)
    assert got[("edge_images_total",)] == 7 and got[("edge_errors_total",)] == 1
    assert got[("edge_unknown_total",)] == 0 and got[("edge_queue_files",)] == 0
    assert {label: got[("edge_class_total", ("label", label))] for label in ("red", "green", "blue")} == {
        "red": 4, "green": 1, "blue": 1}
    assert got[("edge_model_info", ("model_id", "tiny-rgb-1"))] == 1
    buckets = sorted((float(dict([k[1]])["le"]), v) for k, v in got.items() if k[0] == "edge_latency_seconds_bucket")
    assert buckets[-1] == (float("inf"), 7) and got[("edge_latency_seconds_count",)] == 7
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))  # cumulative
    lines = read_results(tmp_path / "r.jsonl")
    assert got[("edge_latency_seconds_sum",)] == pytest.approx(sum(line["latency_ms"] for line in lines) / 1000)
    assert families(metrics)["edge_latency_seconds"] == "histogram"
    assert got[("edge_drift_window_images",)] == 6
    assert got[("edge_drift_class_share", ("label", "red"))] == pytest.approx(4 / 6)
    assert got[("edge_drift_class_distance",)] == pytest.approx(1 / 3)  # (|4/6-1/3| + 2 |1/6-1/3|) / 2
    confidence = sum(line["probability"] for line in lines if "error" not in line) / 6
    assert got[("edge_drift_mean_confidence",)] == pytest.approx(confidence)
    assert got[("edge_drift_confidence_change",)] == pytest.approx(confidence - 0.9)
    assert sorted(p.name for p in watch.iterdir() if p.name.startswith(".") or "prom" in p.name) == ["edge.prom"]


def test_drift_gauges_follow_the_class_mix_of_the_last_images(tmp_path):
    model = build_model(tmp_path / "m.onnx", metadata={**METADATA, **reference({"red": 0.5, "green": 0.5})})
    watch, results, metrics, log = tmp_path / "watch", tmp_path / "r.jsonl", tmp_path / "m.prom", tmp_path / "log"
    watch.mkdir()
    proc = start_logged("--model", model, "--watch", watch, "--results", results, "--poll-seconds", "0.05",
                        "--metrics", metrics, "--metrics-interval", "0.1", "--drift-window", "6", log=log)

    def gauges_after(count: int) -> dict:
        wait_for(lambda: count_lines(results) == count)
        wait_for(lambda: metrics.exists() and samples(metrics)[("edge_images_total",)] == count)
        return samples(metrics)

    try:
        for i, colour in enumerate(["red", "green"] * 3):
            solid(watch / f"a{i}.png", colour)
        like_validation = gauges_after(6)
        for i in range(6):
            solid(watch / f"b{i}.png", "blue")
        all_blue = gauges_after(12)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0
    assert like_validation[("edge_drift_class_distance",)] == pytest.approx(0)
    assert all_blue[("edge_drift_class_distance",)] == pytest.approx(1)  # no class in common any more
    assert all_blue[("edge_drift_class_share", ("label", "blue"))] == 1
    assert all_blue[("edge_drift_reference_class_share", ("label", "blue"))] == 0
    assert all_blue[("edge_drift_window_images",)] == 6


def test_a_model_without_a_reference_has_no_drift_gauges(tmp_path):
    watch = tmp_path / "watch"
    solid(watch / "a.png", "red")
    done = run_edge("--model", build_model(tmp_path / "m.onnx"), "--watch", watch, "--results",
                    tmp_path / "r.jsonl", "--once", "--metrics", tmp_path / "m.prom")
    assert done.returncode == 0 and "drift metrics: not available" in done.stderr
    names = families(tmp_path / "m.prom")
    assert "edge_images" in names and not [n for n in names if n.startswith("edge_drift")]


def test_swaps_and_refusals_are_counted_and_the_drift_window_restarts(tmp_path):
    from test_edge_swap import build_shifted, replace_atomically

    model = build_shifted(tmp_path / "model.onnx", "model-a", reference({"red": 1.0}))
    watch, results, metrics, log = tmp_path / "watch", tmp_path / "r.jsonl", tmp_path / "m.prom", tmp_path / "log"
    watch.mkdir()
    proc = start_logged("--model", model, "--watch", watch, "--results", results, "--poll-seconds", "0.05",
                        "--metrics", metrics, "--metrics-interval", "0.1", log=log)
    try:
        solid(watch / "a.png", "red")
        wait_for(lambda: count_lines(results) == 1)
        replace_atomically(model, b"garbage")
        wait_for(lambda: "refused" in log_text(log))
        replace_atomically(model, build_shifted(tmp_path / "b.onnx", "model-b", reference({"green": 1.0})))
        wait_for(lambda: "model swapped" in log_text(log))
        wait_for(lambda: metrics.exists() and ("edge_model_info", ("model_id", "model-b")) in samples(metrics))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    got = samples(metrics)
    assert got[("edge_model_swaps_total",)] == 1 and got[("edge_model_refusals_total",)] == 1
    assert ("edge_model_info", ("model_id", "model-a")) not in got
    assert got[("edge_drift_window_images",)] == 0  # the new model's window starts empty
    assert got[("edge_drift_reference_class_share", ("label", "green"))] == 1
    assert got[("edge_class_total", ("label", "red"))] == 1  # counters keep counting across swaps


def test_label_values_are_escaped_and_a_failing_write_is_logged_once(tmp_path, caplog):
    names = ['say "hi"', "back\\slash", "two\nlines"]
    metrics = Metrics(str(tmp_path / "m.prom"), 5.0, drift_window=3)
    metrics.set_model('id "1"\n', names, {"class_share": {names[0]: 1.0}, "mean_confidence": 0.5}, names)
    for name in names:
        metrics.observe({"label": name, "top": [{"label": name, "probability": 0.8}], "latency_ms": 3.0})
    metrics.write(queue=2)
    got = samples(tmp_path / "m.prom")
    assert {got[("edge_class_total", ("label", n))] for n in names} == {1}
    assert got[("edge_model_info", ("model_id", 'id "1"\n'))] == 1 and got[("edge_queue_files",)] == 2
    assert got[("edge_drift_class_distance",)] == pytest.approx(2 / 3)
    assert got[("edge_latency_seconds_bucket", ("le", "0.005"))] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.prom"]  # no temporary file left

    metrics.path = str(tmp_path / "gone" / "m.prom")
    with caplog.at_level(logging.INFO, logger="edge"):
        metrics.write(queue=0)
        metrics.write(queue=0)
        metrics.path = str(tmp_path / "m.prom")
        metrics.write(queue=0)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write the metrics file" in m for m in messages) == 1
    assert any("written again" in m for m in messages)


def test_bad_metrics_options_are_usage_errors(tmp_path, capsys):
    watch = tmp_path / "watch"
    watch.mkdir()
    model = build_model(tmp_path / "m.onnx")
    base = ["--model", model, "--watch", watch, "--results", tmp_path / "r.jsonl", "--once"]
    for extra, message in [(["--metrics", tmp_path / "nowhere" / "m.prom"], "folder of --metrics does not exist"),
                           (["--metrics", watch], "--metrics must be a file"),
                           (["--metrics", tmp_path / "r.jsonl"], "another file than --results"),
                           (["--metrics-interval", "0"], "must be > 0"),
                           (["--drift-window", "-3"], "must be > 0")]:
        code = edge_main([str(arg) for arg in [*base, *extra]])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
