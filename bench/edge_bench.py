"""Benchmark the edge runner on any folder of images, against a bare onnxruntime loop.

Measures, for ``python -m edge --once`` over a copy of the folder (with --done and --quarantine):
- time to first result: process start -> first complete line in results.jsonl (includes Python
  and onnxruntime start-up, model load, and one --poll-seconds stability wait);
- peak RSS of the runner process (``os.wait4`` rusage of that child alone);
- images/s: steady (lines after the first batch over the time they took) and end to end;
and, in this process on the same files and model, a bare loop (decode with ``edge.imageio``, then
``EdgeModel.predict``, i.e. ``InferenceSession.run``; no hashing, fsync, moves or polling).

    python bench/edge_bench.py --model model.onnx --images photos/ --threads 2 --batch-size 16

``run_edge_benchmark`` returns the figures as a dict for aggregate benchmark scripts;
``format_markdown`` turns that dict into the section written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `edge` lives at the repository root

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from edge.imageio import ImageDecodeError, load_image  # noqa: E402
from edge.model import load_model  # noqa: E402
from edge.watch import scan  # noqa: E402


def _files(folder: Path) -> list[str]:
    """The files the runner would pick up (temporary names and dot-files excluded)."""
    root = os.path.realpath(folder)
    return sorted(os.path.join(root, state.rel) for state in scan(root, frozenset()))


def _bare_loop(model_path: Path, files: list[str], threads: int, batch_size: int) -> float:
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


def _run_runner(cmd: list[str], results: Path, log: Path) -> tuple[float | None, float, int, float]:
    """Start the runner; return (time to first result, wall time, exit code, peak RSS in MiB)."""
    start = time.perf_counter()
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    first = None
    while True:
        if first is None and results.exists() and b"\n" in results.read_bytes()[:65536]:
            first = time.perf_counter() - start
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # rusage of this child alone
        if pid:
            break
        time.sleep(0.002)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if first is None and results.exists() and results.stat().st_size:
        first = wall
    return first, wall, proc.returncode, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def _steady_rate(lines: list[dict]) -> float | None:
    """Images/s after the first batch, from the lines' ``time`` (all lines of a batch share it)."""
    times = sorted(datetime.fromisoformat(line["time"].replace("Z", "+00:00")).timestamp() for line in lines)
    after_first = [t for t in times if t > times[0]] if times else []
    if not after_first:
        return None
    return len(after_first) / (times[-1] - times[0])


def run_edge_benchmark(model: str | Path, images: str | Path, threads: int, batch_size: int,
                       poll_seconds: float = 0.5) -> dict:
    """Benchmark ``python -m edge --once`` and a bare loop on ``images``; return the figures."""
    model, images = Path(model).resolve(), Path(images).resolve()
    files = _files(images)
    if not files:
        raise ValueError(f"no image files under {images}")
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        work = Path(tmp)
        shutil.copytree(images, work / "watch", symlinks=False)
        results = work / "results.jsonl"
        cmd = [
            sys.executable, "-m", "edge", "--model", str(model), "--watch", str(work / "watch"),
            "--results", str(results), "--done", str(work / "done"), "--quarantine", str(work / "quarantine"),
            "--once", "--threads", str(threads), "--batch-size", str(batch_size),
            "--poll-seconds", str(poll_seconds), "--stats-seconds", "0",
        ]
        first, wall, code, rss = _run_runner(cmd, results, work / "runner.log")
        if code != 0:
            raise RuntimeError(f"runner exited with {code}: {(work / 'runner.log').read_text()[-2000:]}")
        lines = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    bare = _bare_loop(model, files, threads, batch_size)
    steady = _steady_rate(lines)
    return {
        "model": str(model),
        "model_id": lines[0]["model"] if lines else None,
        "images": len(lines),
        "errors": sum("error" in line for line in lines),
        "threads": threads,
        "batch_size": batch_size,
        "poll_seconds": poll_seconds,
        "time_to_first_result_s": first,
        "runner_wall_s": wall,
        "peak_rss_mb": rss,
        "runner_images_per_s": steady,
        "runner_end_to_end_images_per_s": len(lines) / wall,
        "bare_images_per_s": bare,
        "runner_vs_bare": steady / bare if steady else None,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}, onnxruntime {ort.__version__}",
        "command": shlex.join([
            "python", "bench/edge_bench.py", "--model", str(model), "--images", str(images),
            "--threads", str(threads), "--batch-size", str(batch_size), "--poll-seconds", str(poll_seconds),
        ]),
    }


def format_markdown(r: dict) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    return "\n".join([
        "## Edge runner (`python -m edge`)",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"Model: `{r['model_id']}`, {r['images']} images ({r['errors']} not readable), "
        f"{r['threads']} threads, batch {r['batch_size']}, --poll-seconds {r['poll_seconds']}",
        "",
        "| time to first result | peak RSS | runner images/s (steady) | runner images/s (end to end) "
        "| bare loop images/s | runner / bare |",
        "|---|---|---|---|---|---|",
        f"| {num(r['time_to_first_result_s'], '.2f')} s | {r['peak_rss_mb']:.0f} MiB "
        f"| {num(r['runner_images_per_s'], '.1f')} | {r['runner_end_to_end_images_per_s']:.1f} "
        f"| {r['bare_images_per_s']:.1f} | {num(r['runner_vs_bare'], '.2f')} |",
        "",
        "Time to first result includes interpreter and model start-up and one --poll-seconds "
        "stability wait. Steady images/s counts the lines after the first batch; the bare loop decodes "
        "the same files with the same code and runs the same session, without hashing, fsync or moves.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported ONNX model")
    parser.add_argument("--images", required=True, help="folder of images (copied; the original is untouched)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--poll-seconds", type=float, default=0.5)
    parser.add_argument("--out", default="docs/bench/edge.md", help="markdown file to write")
    args = parser.parse_args(argv)
    result = run_edge_benchmark(args.model, args.images, args.threads, args.batch_size, args.poll_seconds)
    text = format_markdown(result)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
