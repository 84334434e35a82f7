"""Inference streams: several batches in flight at once, results in the batches' order, the same rows
whatever the number of streams (extract.streams)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_image_folder

import extract.job
from cli import cli
from extract.errors import TransferKitError
from extract.job import run_extraction
from extract.store import FeatureStore
from extract.streams import MAX_STREAMS, run_in_streams, stream_plan

SMALL = dict(backbone="mobilenet_v2", weights="none", input_size=32, progress=False, batch_size=4)


def test_results_come_in_order_with_streams_computing_at_once():
    together = threading.Barrier(2, timeout=30)  # broken (an error) unless two computes run at once
    running, most = [0], [0]
    lock = threading.Lock()

    def compute(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        if x < 2:
            together.wait()
        with lock:
            running[0] -= 1
        return x * 10

    out = list(run_in_streams(compute, range(7), streams=2))
    assert out == [(i, i * 10) for i in range(7)]
    assert most[0] == 2


def test_one_stream_computes_in_the_callers_thread():
    threads = set()
    out = list(run_in_streams(lambda x: threads.add(threading.get_ident()) or x, "abc", streams=1))
    assert out == [("a", "a"), ("b", "b"), ("c", "c")] and threads == {threading.get_ident()}


def test_batches_in_flight_are_handed_over_before_ctrl_c_goes_on():
    def items():
        yield from (1, 2)
        raise KeyboardInterrupt

    got = []
    with pytest.raises(KeyboardInterrupt):
        for item, result in run_in_streams(lambda x: -x, items(), streams=3, take=lambda x: x):
            got.append((item, result))
    assert got == [(1, -1), (2, -2)]


def test_a_failed_compute_raises_at_its_item():
    def compute(x):
        if x == 3:
            raise ValueError("bad batch")
        return x

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for item, _ in run_in_streams(compute, range(6), streams=2):
            got.append(item)
    assert got == [0, 1, 2]


def test_stream_plan_splits_the_inference_threads():
    assert stream_plan(threads=2) == (2, 1)
    assert stream_plan(threads=8) == (MAX_STREAMS, 8 // MAX_STREAMS)
    assert stream_plan(threads=6, streams=3) == (3, 2)
    assert stream_plan(threads=4, streams=1) == (1, 4)
    with pytest.raises(TransferKitError, match="--streams must be between 1 and the inference threads \\(2\\)"):
        stream_plan(threads=2, streams=3)


def test_extract_writes_the_same_rows_whatever_the_streams(tmp_path, monkeypatch):
    images = make_image_folder(tmp_path / "images", per_class=5)
    used = []

    def spy(compute, items, streams, take):
        used.append(streams)
        return run_in_streams(compute, items, streams, take)

    monkeypatch.setattr(extract.job, "run_in_streams", spy)
    one = run_extraction(images, tmp_path / "one.h5", threads=2, streams=1, **SMALL)
    two = run_extraction(images, tmp_path / "two.h5", threads=2, **SMALL)  # default: one stream per thread
    assert used == [1, 2] and one.extracted == two.extracted == 15
    a, b = (FeatureStore(tmp_path / name).read("mobilenet_v2") for name in ("one.h5", "two.h5"))
    assert list(a.paths) == list(b.paths)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)


def test_cli_refuses_more_streams_than_threads(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=2)
    args = ["extract", str(images), "--store", str(tmp_path / "f.h5"), "--weights", "none", "--quiet"]
    too_many = CliRunner().invoke(cli, [*args, "--threads", "2", "--streams", "3"])
    assert too_many.exit_code == 1
    assert too_many.output == "Error: --streams must be between 1 and the inference threads (2)\n"
    zero = CliRunner().invoke(cli, [*args, "--streams", "0"])
    assert zero.exit_code == 2 and "--streams" in zero.output


def test_decode_threads_follow_the_cores_this_process_may_use(monkeypatch):
    from extract.job import decode_workers

    monkeypatch.setattr("os.cpu_count", lambda: 64)  # a container's host
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert decode_workers() == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert decode_workers() == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    assert decode_workers() == 8 and stream_plan() == (MAX_STREAMS, 8)
