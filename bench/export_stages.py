"""Where ``export-onnx`` spends its time and memory: the command, run in this process, with its steps timed.

Runs ``python cli.py export-onnx ARGS`` in-process (the same click command, output included) after
wrapping the steps ``export/onnx_export.py`` calls (building the Keras backbones, the tf2onnx
conversion, the unknown score's fit, the graph check, the parity check...) so that each records its
wall and CPU seconds (CPU of the whole process while the step runs, every thread included) and the
peak resident memory seen while it ran (``/proc/self/status`` sampled every 50 ms). A step called
inside another is listed under it (``depth``). The steps go to ``--stages-json`` as a JSON list.

Example:
    python bench/export_stages.py --stages-json stages.json -- --store features.h5 --head head --out model.onnx
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import rss_mib  # noqa: E402

SAMPLE_SECONDS = 0.05
# The steps of export/onnx_export.py (module attributes it calls), and of the onnx module it calls through.
EXPORT_STEPS = {
    "build_feature_model": "Keras backbones (weights read, graph built)",
    "keras_graph": "tf2onnx conversion of the backbones",
    "unknown_scorer": "unknown score: fit and out-of-fold calibration",
    "add_ood_output": "unknown score: nodes added to the head graph",
    "append_head": "head graph appended to the backbones'",
    "_drift_reference": "drift reference (head on the test rows)",
    "graph_model_id": "model id (digest of the graph)",
    "load_batch": "parity images decoded",
    "check_parity": "parity check (Keras and onnxruntime on the images)",
}
ONNX_STEPS = {"checker.check_model": "onnx.checker.check_model (full check)", "save": "onnx.save"}


class StageClock:
    """Wraps functions so that each call records wall s, CPU s and peak RSS while it ran."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._open: list[dict] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "StageClock":
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            now = _own_rss_mib()
            for entry in list(self._open):
                entry["peak_rss_mib"] = max(entry["peak_rss_mib"], now)

    def wrap(self, name: str, what: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            entry = {"step": name, "what": what, "depth": len(self._open), "started": time.perf_counter(),
                     "rss_before_mib": _own_rss_mib()}
            entry["peak_rss_mib"] = entry["rss_before_mib"]
            self._open.append(entry)
            cpu = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                entry["wall_seconds"] = time.perf_counter() - entry["started"]
                entry["cpu_seconds"] = time.process_time() - cpu
                entry["peak_rss_mib"] = max(entry["peak_rss_mib"], _own_rss_mib())
                self._open.remove(entry)
                self.rows.append(entry)
        return timed


def _own_rss_mib() -> float:
    return rss_mib(os.getpid())


def instrument(clock: StageClock) -> list[tuple[object, str, object]]:
    """Replace the steps in ``export.onnx_export`` and ``onnx`` by timed wrappers; returns what to put back."""
    import onnx

    import export.onnx_export as module

    targets = [(module, name, what) for name, what in EXPORT_STEPS.items()]
    for dotted, what in ONNX_STEPS.items():
        *path, attribute = dotted.split(".")
        targets.append((functools.reduce(getattr, path, onnx), attribute, what))
    originals = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in targets]
    for owner, attribute, what in targets:
        label = attribute if owner is module else f"onnx.{'checker.' if owner is not onnx else ''}{attribute}"
        setattr(owner, attribute, clock.wrap(label, what, getattr(owner, attribute)))
    return originals + _instrument_parity(clock)


def _instrument_parity(clock: StageClock) -> list[tuple[object, str, object]]:
    """The parity check's parts: Keras on each batch (its ``reference``), the onnxruntime session's
    creation and each of its runs."""
    import export.onnx_export as module
    import export.parity as parity

    checked, opened = module.check_parity, parity.onnx_session

    def check_parity(reference, *args, **kwargs):
        return checked(clock.wrap("keras batch", "parity: Keras on one batch", reference), *args, **kwargs)

    def onnx_session(*args, **kwargs):
        session = opened(*args, **kwargs)
        session.run = clock.wrap("onnxruntime batch", "parity: onnxruntime on one batch", session.run)
        return session

    module.check_parity = check_parity
    parity.onnx_session = clock.wrap("onnx_session", "parity: onnxruntime session created", onnx_session)
    return [(module, "check_parity", checked), (parity, "onnx_session", opened)]


def run(export_args: list[str]) -> list[dict]:
    """``export-onnx EXPORT_ARGS`` in this process (the wrappers removed after); its steps in the order they
    started, the whole command first, at depth 0."""
    from cli import cli

    with StageClock() as clock:
        originals = instrument(clock)
        try:
            clock.wrap("export-onnx", "the whole command, in this process",
                       lambda: cli.main(["export-onnx", *export_args], standalone_mode=False))()
        finally:
            for owner, attribute, original in reversed(originals):  # the last wrapped first
                setattr(owner, attribute, original)
    rows = sorted(clock.rows, key=lambda row: row["started"])
    start = rows[0]["started"] if rows else 0.0
    for row in rows:
        row["started"] = round(row["started"] - start, 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages-json", required=True, type=Path, help="where the steps' figures go")
    parser.add_argument("export_args", nargs=argparse.REMAINDER, help="-- then export-onnx's options")
    args = parser.parse_args()
    export_args = args.export_args[1:] if args.export_args[:1] == ["--"] else args.export_args
    args.stages_json.write_text(json.dumps(run(export_args), indent=1))


if __name__ == "__main__":
    main()
