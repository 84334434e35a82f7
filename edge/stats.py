"""The periodic stats line: images/s, latency percentiles and queue length over the last interval."""

from __future__ import annotations

import time

import numpy as np


class Stats:
    def __init__(self, every_seconds: float) -> None:
        self.every_seconds = every_seconds  # 0: never report periodically
        self.total = 0
        self.errors = 0
        self._latencies_ms: list[float] = []
        self._since = time.monotonic()

    def add(self, latency_ms: float, ok: bool) -> None:
        self.total += 1
        self.errors += 0 if ok else 1
        self._latencies_ms.append(latency_ms)

    def due(self) -> bool:
        return self.every_seconds > 0 and time.monotonic() - self._since >= self.every_seconds

    def line(self, queue: str) -> str:
        """The report for the interval since the previous call, which starts a new interval."""
        now = time.monotonic()
        elapsed = max(now - self._since, 1e-9)
        count = len(self._latencies_ms)
        if count:
            p50, p95 = (f"{v:.1f}" for v in np.percentile(self._latencies_ms, [50, 95]))
        else:
            p50 = p95 = "-"
        self._latencies_ms.clear()
        self._since = now
        return (
            f"stats: {count / elapsed:.1f} images/s over {elapsed:.1f} s, latency p50 {p50} ms p95 {p95} ms, "
            f"queue {queue}, total {self.total} ({self.errors} errors)"
        )
