"""Computed rows written to the store from a background thread, in segments of a useful size.

Profiling ``extract`` (py-spy, EfficientNet-Lite0 on TrashNet) showed the main thread spending about
2 % of its samples in ``write_segment`` (an HDF5 file and two fsyncs per batch) and 2.5 % in
checkpoints, time in which the engine computed nothing. Here the loop hands each batch over and
goes straight back to inference: one thread writes (fsync releases the GIL), and small batches are
grouped so that a batch of 8 does not cost a file and two fsyncs of its own.

At most one segment is in flight and at most ``min_rows`` rows wait in memory, so a SIGKILL loses
those rows and nothing else (the next run computes them again); after an error or Ctrl-C in the
loop they are written before the error goes on.

Example::

    with BackgroundSegments(writer, "resnet50", record) as segments:
        for paths, shas, features, failures in batches:
            segments.add(paths, shas, features, failures)
        segments.flush()  # before writer.commit(state)
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

MIN_ROWS = 64  # rows grouped into one segment
MAX_SECONDS = 2.0  # ...or whatever waited this long


class BackgroundSegments:
    def __init__(self, writer, backbone: str, record: dict, min_rows: int = MIN_ROWS,
                 max_seconds: float = MAX_SECONDS):
        self._writer, self._backbone, self._record = writer, backbone, record
        self._min_rows, self._max_seconds = min_rows, max_seconds
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="segments")
        self._in_flight: Future | None = None
        self._clear()

    def _clear(self) -> None:
        self._paths, self._shas, self._features, self._failures = [], [], [], {}
        self._since = time.monotonic()

    def add(self, paths: list[str], shas: list[str], features: np.ndarray, failures: dict) -> None:
        """Keep one computed batch; write the group once it is big or old enough."""
        self._paths += paths
        self._shas += shas
        self._features.append(features)
        self._failures.update(failures)
        if len(self._paths) >= self._min_rows or time.monotonic() - self._since > self._max_seconds:
            self._submit()

    def _submit(self) -> None:
        self._wait()
        if not self._paths and not self._failures:
            return
        features = np.concatenate(self._features)
        self._in_flight = self._pool.submit(self._writer.write_segment, self._backbone, self._record,
                                            self._paths, self._shas, features, self._failures)
        self._clear()

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()  # a failed write raises here, in the loop's thread

    def flush(self) -> None:
        """Write everything kept and wait until it is on disk (before a checkpoint, at the end)."""
        self._submit()
        self._wait()

    def __enter__(self) -> "BackgroundSegments":
        return self

    def __exit__(self, *exc) -> None:
        """Rows computed before an error or Ctrl-C are valid: write them too (the loop's error wins)."""
        try:
            if exc[0] is None:
                self.flush()
            else:
                try:
                    self.flush()
                except Exception:  # noqa: BLE001 - a failing write must not hide the error that stopped the loop
                    pass
        finally:
            self._pool.shutdown(wait=True)
