"""Edge runner speed: ``python -m edge --once`` over a folder of images vs a bare onnxruntime loop.

For the runner (a fresh process, over a copy of the folder, with --done and --quarantine):
- time to first result: process start -> first complete line in results.jsonl (includes Python and
  onnxruntime start-up, model load and one --poll-seconds stability wait);
- peak RSS of the runner process (``os.wait4`` rusage of that child alone);
- images/s: steady (the lines after the first batch, over the time they took) and end to end.
For the bare loop (in this process, same files, same model, same decoding): decode with
``edge.imageio.load_image``, then ``EdgeModel.predict`` (``InferenceSession.run`` after the layout
and dtype conversion); no hashing, fsync, moves or polling.

Works on any folder of images. Example:
    python bench/edge_bench.py --model model.onnx --images ../shared/datasets/trashnet --threads 2 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import ROOT, fmt, header, spread, write_results  # noqa: E402
from edge.__main__ import default_threads  # noqa: E402
from edge.imageio import ImageDecodeError, load_image  # noqa: E402
from edge.model import load_model  # noqa: E402
from edge.runner import RunnerConfig  # noqa: E402
from edge.watch import scan  # noqa: E402


def _files(folder: Path) -> list[str]:
    """The files the runner would pick up (temporary names and dot-files excluded)."""
    root = os.path.realpath(folder)
    return sorted(os.path.join(root, state.rel) for state in scan(root, frozenset()))


def bare_loop_rate(model_path: Path, files: list[str], threads: int, batch_size: int) -> float:
    """Images/s of decode + inference alone, in batches of ``batch_size``."""
    model = load_model(model_path, threads)
    start = time.perf_counter()
    done = 0
    for first in range(0, len(files), batch_size):
        images = []
        for path in files[first : first + batch_size]:
            try:
                images.append(load_image(path, model.input_size))
            except ImageDecodeError:
                continue
        if images:
            model.predict(np.stack(images))
            done += len(images)
    return done / max(time.perf_counter() - start, 1e-9)


def _steady_rate(lines: list[dict]) -> float | None:
    """Images/s after the first batch, from the lines' ``time`` (the lines of a batch share it)."""
    times = sorted(datetime.fromisoformat(line["time"].replace("Z", "+00:00")).timestamp() for line in lines)
    later = [t for t in times if t > times[0]]
    return len(later) / (times[-1] - times[0]) if later else None


def run_runner(model: Path, images: Path, threads: int, batch_size: int, poll_seconds: float) -> dict:
    """One ``python -m edge --once`` over a copy of ``images``."""
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        work = Path(tmp)
        shutil.copytree(images, work / "watch")
        results = work / "results.jsonl"
        cmd = [
            sys.executable, "-m", "edge", "--model", str(model), "--watch", str(work / "watch"),
            "--results", str(results), "--done", str(work / "done"), "--quarantine", str(work / "quarantine"),
            "--once", "--threads", str(threads), "--batch-size", str(batch_size),
            "--poll-seconds", str(poll_seconds), "--stats-seconds", "0",
        ]
        start = time.perf_counter()
        with open(work / "runner.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        first = None
        while True:
            if first is None and results.exists() and b"\n" in results.read_bytes()[:65536]:
                first = time.perf_counter() - start
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # rusage of this child alone
            if pid:
                break
            time.sleep(0.002)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if proc.returncode != 0:
            raise RuntimeError(f"runner exited with {proc.returncode}: {(work / 'runner.log').read_text()[-2000:]}")
        lines = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    return {
        "first": first if first is not None else wall,
        "wall": wall,
        "rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "cpu_s": usage.ru_utime + usage.ru_stime,  # every thread of the runner, start-up included
        "steady": _steady_rate(lines) if lines else None,
        "images": len(lines),
        "errors": sum("error" in line for line in lines),
        "model_id": lines[0]["model"] if lines else None,
    }


def run_edge_benchmark(model: str | Path, images: str | Path, threads: int, batch_size: int,
                       poll_seconds: float = 0.5, repeats: int = 3) -> dict:
    """Runner and bare loop on ``images``, each ``repeats`` times; medians/min/max via ``spread``."""
    model, images = Path(model).resolve(), Path(images).resolve()
    files = _files(images)
    if not files:
        raise ValueError(f"no files to classify under {images}")
    runs, bare = [], []
    for _ in range(repeats):  # interleaved, so a drift in machine load hits both alike
        runs.append(run_runner(model, images, threads, batch_size, poll_seconds))
        bare.append(bare_loop_rate(model, files, threads, batch_size))
    steady = [r["steady"] for r in runs if r["steady"] is not None]
    return {
        "model": str(model), "model_id": runs[0]["model_id"], "images_folder": str(images),
        "images": runs[0]["images"], "errors": runs[0]["errors"], "threads": threads, "batch_size": batch_size,
        "poll_seconds": poll_seconds,
        "time_to_first_result_s": spread([r["first"] for r in runs]),
        "peak_rss_mb": spread([r["rss_mb"] for r in runs]),
        "runner_images_per_s": spread(steady) if steady else None,
        "runner_end_to_end_images_per_s": spread([r["images"] / r["wall"] for r in runs]),
        "bare_images_per_s": spread(bare),
    }


def to_markdown(r: dict) -> str:
    steady = r["runner_images_per_s"]
    lines = [
        header(f"Edge runner: {Path(r['model']).name} on {Path(r['images_folder']).name}"),
        f"Model `{r['model_id']}`, {r['images']} files ({r['errors']} not readable images), {r['threads']} threads, "
        f"batch {r['batch_size']}, --poll-seconds {r['poll_seconds']}; medians (min–max) of repeated runs.\n",
        "| measurement | value |", "|---|---|",
        f"| runner: start to first result line (s) | {fmt(r['time_to_first_result_s'], 2)} |",
        f"| runner: peak RSS (MiB) | {fmt(r['peak_rss_mb'], 0)} |",
        f"| runner: steady, after the first batch (images/s) | {fmt(steady) if steady else 'n/a (one batch)'} |",
        f"| runner: end to end incl. start-up (images/s) | {fmt(r['runner_end_to_end_images_per_s'])} |",
        f"| bare loop: decode + `InferenceSession.run` (images/s) | {fmt(r['bare_images_per_s'])} |",
    ]
    if steady:
        ratio = steady["median"] / r["bare_images_per_s"]["median"]
        lines += ["", f"- runner steady / bare loop: **{ratio:.0%}** (the rest is hashing, fsync and moves)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported ONNX model (with metadata)")
    parser.add_argument("--images", required=True, help="folder of images (copied; the original is untouched)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--batch-size", type=int, default=RunnerConfig.batch_size,
                        help="as for the runner [default: %(default)s, its default]")
    parser.add_argument("--poll-seconds", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "edge.md"))
    args = parser.parse_args()
    result = run_edge_benchmark(args.model, args.images, args.threads, args.batch_size, args.poll_seconds,
                                args.repeats)
    write_results(args.out, to_markdown(result), result)


if __name__ == "__main__":
    main()
