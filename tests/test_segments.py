"""Computed rows reach the store from a background thread, grouped, and failures surface in the loop."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from extract.segments import BackgroundSegments


class RecordingWriter:
    def __init__(self, fail_on: int | None = None):
        self.segments, self.threads, self.fail_on = [], set(), fail_on

    def write_segment(self, backbone, record, paths, shas, features, failed):
        self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and len(self.segments) == self.fail_on:
            raise OSError("disk full")
        self.segments.append((backbone, list(paths), features.shape, dict(failed)))


def _batch(start: int, n: int = 8):
    paths = [f"img{i}" for i in range(start, start + n)]
    return paths, [p + "-sha" for p in paths], np.full((n, 4), start, np.float32), {}


def test_small_batches_are_grouped_and_written_off_the_loop_thread():
    writer = RecordingWriter()
    with BackgroundSegments(writer, "resnet50", {"name": "resnet50"}, min_rows=16, max_seconds=60) as segments:
        for start in range(0, 40, 8):
            segments.add(*_batch(start))
        segments.add([], [], np.zeros((0, 4), np.float32), {"bad.jpg": ("sha", "cannot decode")})
    assert [s[2] for s in writer.segments] == [(16, 4), (16, 4), (8, 4)]
    assert [p for s in writer.segments for p in s[1]] == [f"img{i}" for i in range(40)]
    assert writer.segments[-1][3] == {"bad.jpg": ("sha", "cannot decode")}
    assert threading.current_thread().name not in writer.threads


def test_flush_writes_everything_kept():
    writer = RecordingWriter()
    with BackgroundSegments(writer, "resnet50", {}, min_rows=64, max_seconds=60) as segments:
        segments.add(*_batch(0))
        assert writer.segments == []  # kept, not yet big enough
        segments.flush()  # what a checkpoint does first
        assert [s[2] for s in writer.segments] == [(8, 4)]


def test_a_failed_write_raises_in_the_loop():
    writer = RecordingWriter(fail_on=0)
    with pytest.raises(OSError, match="disk full"):
        with BackgroundSegments(writer, "resnet50", {}, min_rows=8, max_seconds=60) as segments:
            for start in range(0, 32, 8):
                segments.add(*_batch(start))


def test_rows_computed_before_ctrl_c_are_written():
    writer = RecordingWriter()
    with pytest.raises(KeyboardInterrupt):
        with BackgroundSegments(writer, "resnet50", {}, min_rows=64, max_seconds=60) as segments:
            segments.add(*_batch(0))
            raise KeyboardInterrupt
    assert [p for s in writer.segments for p in s[1]] == [f"img{i}" for i in range(8)]
