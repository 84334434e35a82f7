"""``--metrics FILE``: the runner's counters in the Prometheus text format, for node_exporter's textfile
collector (or anything that reads the format).

The file is rewritten atomically (``files.write_atomic``) every ``--metrics-interval`` seconds and
when the runner stops, so a reader never sees half of it. Counters start at 0 with each process
(Prometheus treats a drop as a restart). Series:

  edge_images_total                 files given a result line (errors included)
  edge_errors_total                 files that were not readable images (error lines)
  edge_unknown_total                images labelled "unknown"
  edge_class_total{label}           result lines per label ("unknown" included)
  edge_latency_seconds              histogram of each line's latency_ms (read + decode + its share of inference)
  edge_queue_files                  files seen in the watch folder and not yet reported
  edge_model_info{model_id}         1 for the model running now
  edge_model_swaps_total, edge_model_refusals_total
                                    model files loaded by hot-swap / refused (the old model kept running)
  edge_start_time_seconds           when this process started (Unix time)

Drift, only for a model whose metadata has ``drift_reference`` (the predicted class mix and mean top
probability on a held-out split, named by its ``split``): over the last ``--drift-window`` classified
images (best class, unknown images included; the window restarts when the model is swapped)

  edge_drift_window_images          images in the window (compare the gauges below once it is full)
  edge_drift_class_share{label}     share of the window per best class
  edge_drift_reference_class_share{label}
  edge_drift_class_distance         total-variation distance between the two mixes: half the sum of
                                    |window share - reference share| over the classes; 0 = same mix,
                                    1 = no class in common
  edge_drift_mean_confidence        mean top probability of the window
  edge_drift_reference_mean_confidence
  edge_drift_confidence_change      window minus reference mean confidence (negative: less sure than on
                                    the reference split)
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from typing import Any

from .files import write_atomic
from .imageio import escape_surrogates

log = logging.getLogger("edge")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped; an
    undecodable byte of a non-UTF-8 class name (a lone surrogate) becomes the text ``\\udcXX``, as in
    the JSON lines, so the file stays valid UTF-8."""
    return escape_surrogates(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Family:
    """One metric family: its HELP and TYPE lines, then its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.name = name

    def add(self, value: float, suffix: str = "", **labels: str) -> Family:
        text = ",".join(f'{key}="{escape_label(val)}"' for key, val in labels.items())
        self.lines.append(f"{self.name}{suffix}{'{' + text + '}' if text else ''} {number(value)}")
        return self


class Drift:
    """Class mix and mean top probability of the last ``window`` images against a reference."""

    def __init__(self, reference: dict[str, Any], class_names: list[str], window: int) -> None:
        self.reference_share = {name: float(reference["class_share"].get(name, 0.0)) for name in class_names}
        self.reference_confidence = float(reference["mean_confidence"])
        self._recent: deque[tuple[str, float]] = deque(maxlen=window)
        self._counts: Counter[str] = Counter()
        self._confidence_sum = 0.0

    def add(self, best_class: str, confidence: float) -> None:
        if len(self._recent) == self._recent.maxlen:
            old_class, old_confidence = self._recent[0]
            self._counts[old_class] -= 1
            self._confidence_sum -= old_confidence
        self._recent.append((best_class, confidence))
        self._counts[best_class] += 1
        self._confidence_sum += confidence

    def window_share(self) -> dict[str, float]:
        n = len(self._recent)
        return {name: self._counts[name] / n for name in self.reference_share} if n else {}

    def class_distance(self) -> float:
        """Total-variation distance between the window's class mix and the reference's (0..1)."""
        share = self.window_share()
        return 0.5 * sum(abs(share[name] - ref) for name, ref in self.reference_share.items())

    def mean_confidence(self) -> float:
        return self._confidence_sum / len(self._recent)

    def families(self) -> list[Family]:
        n = len(self._recent)
        window = Family("edge_drift_window_images", "gauge", "Images in the drift window").add(n)
        reference = Family("edge_drift_reference_class_share", "gauge",
                           "Share of the reference split (model metadata) per predicted class")
        for name, share in self.reference_share.items():
            reference.add(share, label=name)
        ref_conf = Family("edge_drift_reference_mean_confidence", "gauge",
                          "Mean top probability on the reference split (model metadata)").add(self.reference_confidence)
        if not n:
            return [window, reference, ref_conf]
        mix = Family("edge_drift_class_share", "gauge", "Share of the drift window per best class")
        for name, share in self.window_share().items():
            mix.add(share, label=name)
        confidence = self.mean_confidence()
        return [
            window, mix, reference,
            Family("edge_drift_class_distance", "gauge",
                   "Total-variation distance between the window's and the reference split's class mix (0..1)"
                   ).add(self.class_distance()),
            Family("edge_drift_mean_confidence", "gauge", "Mean top probability of the drift window").add(confidence),
            ref_conf,
            Family("edge_drift_confidence_change", "gauge",
                   "Window minus reference mean top probability").add(confidence - self.reference_confidence),
        ]


class Metrics:
    """The counters of one runner process, written to ``path`` every ``every_seconds``."""

    def __init__(self, path: str, every_seconds: float, drift_window: int) -> None:
        self.path = path
        self.every_seconds = every_seconds
        self.drift_window = drift_window
        self.images = self.errors = self.unknown = self.swaps = self.refusals = 0
        self.per_label: Counter[str] = Counter()
        self.bucket_counts = [0] * len(LATENCY_BUCKETS_S)
        self.latency_sum = 0.0
        self.queue = 0
        self.model_id = ""
        self.drift: Drift | None = None
        self.started = time.time()
        self._last_write = time.monotonic()
        self._failing = False

    def set_model(self, model_id: str, class_names: list[str], drift_reference: dict[str, Any] | None,
                  labels: list[str]) -> None:
        """The model now running (at start-up and after a swap): the drift window starts again."""
        self.model_id = model_id
        for label in labels:  # every label of the model shows up, at 0 until it is seen
            self.per_label.setdefault(label, 0)
        self.drift = None if drift_reference is None else Drift(drift_reference, class_names, self.drift_window)

    def observe(self, record: dict[str, Any]) -> None:
        """Count one result line."""
        self.images += 1
        seconds = record["latency_ms"] / 1000
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.bucket_counts[i] += 1
                break
        if "error" in record:
            self.errors += 1
            return
        self.per_label[record["label"]] += 1
        self.unknown += record.get("unknown") is True
        if self.drift is not None:
            self.drift.add(record["top"][0]["label"], record["top"][0]["probability"])

    def seconds_to_due(self) -> float:
        return max(0.0, self._last_write + self.every_seconds - time.monotonic())

    def write_if_due(self, queue: int) -> None:
        if self.seconds_to_due() <= 0:
            self.write(queue)

    def write(self, queue: int) -> None:
        """Rewrite the file now; a failure (full disk) is logged once and retried at the next interval."""
        self.queue = queue
        self._last_write = time.monotonic()
        try:
            write_atomic(self.path, self.text().encode("utf-8"))
        except OSError as exc:
            if not self._failing:
                log.warning("cannot write the metrics file %s (%s); trying again every %g s",
                            self.path, exc.strerror or exc, self.every_seconds)
            self._failing = True
            return
        if self._failing:
            log.info("metrics file %s written again", self.path)
        self._failing = False

    def text(self) -> str:
        families = [
            Family("edge_images_total", "counter", "Files given a result line (errors included)").add(self.images),
            Family("edge_errors_total", "counter", "Files that were not readable images").add(self.errors),
            Family("edge_unknown_total", "counter", 'Images labelled "unknown"').add(self.unknown),
            self._per_label(), self._latency(),
            Family("edge_queue_files", "gauge", "Files in the watch folder not yet reported").add(self.queue),
            Family("edge_model_info", "gauge", "The model running now").add(1, model_id=self.model_id),
            Family("edge_model_swaps_total", "counter", "Model files loaded by hot-swap").add(self.swaps),
            Family("edge_model_refusals_total", "counter",
                   "Replacement model files refused (the old model kept running)").add(self.refusals),
            Family("edge_start_time_seconds", "gauge", "Start of this runner process (Unix time)").add(self.started),
            *(self.drift.families() if self.drift is not None else []),
        ]
        return "".join(line + "\n" for family in families for line in family.lines)

    def _per_label(self) -> Family:
        family = Family("edge_class_total", "counter", 'Result lines per label ("unknown" included)')
        for label, count in sorted(self.per_label.items()):
            family.add(count, label=label)
        return family

    def _latency(self) -> Family:
        family = Family("edge_latency_seconds", "histogram", "Latency of each result line (read, decode, inference)")
        cumulative = 0
        for bound, count in zip(LATENCY_BUCKETS_S, self.bucket_counts):
            cumulative += count
            family.add(cumulative, "_bucket", le=number(bound))
        family.add(self.images, "_bucket", le="+Inf")
        family.add(self.latency_sum, "_sum").add(self.images, "_count")
        return family
