"""Where `extract`'s time goes: py-spy samples of a whole `python cli.py extract` process, by activity.

For each ``--streams`` value, one fresh ``extract`` (an empty store, the engine cached by a warm-up
run) runs under ``py-spy record --idle`` (every thread sampled whether it runs or waits); each sample
of the main thread is put in one category (inside the extraction loop: inference in this thread,
waiting for the inference streams, waiting for decoded images, handing rows to the writer, ...;
outside it: start-up imports, scan and hashing, engine opening, final commit), and the other threads'
samples count as busy when they decode, write or infer. Shares of samples are shares of wall time,
which other processes on the machine stretch, but for all categories alike.

Example:
    python bench/extract_profile.py --data ../shared/datasets/trashnet --backbone efficientnet_lite0 --shard 0/8
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, data_parser, header, parse_data_args, write_results  # noqa: E402

LOOP_RULES = (  # (frame text, category) for main-thread samples inside the loop; the first match wins
    ("_open_engine (", "opening the engine (int8: the gate's cached verdict)"),
    ("BackgroundSegments", "handing rows to the segment writer"),
    ("commit (extract/store_writer", "checkpoints"),
    ("tqdm", "progress bar"),
)
OUTSIDE_RULES = (
    ("_find_and_load", "imports"),
    ("_scan (", "scan and hashing"),
    ("discover (", "listing the folder"),
    ("commit (extract/store_writer", "store commits"),
)
BUSY_RULES = (("_decode (extract/job.py", "decode threads: decoding"),
              ("write_segment", "segment writer: writing"),
              ("Session.run", "inference streams: computing"),
              ("read_image_file", "hash threads: reading and hashing"))


def _loop_category(text: str) -> str:
    """What the main thread does at one sample inside the extraction loop (``text``: its stack)."""
    if "Session.run" in text:
        return "inference in this thread"
    if "run_in_streams (" in text:
        rest = text.split("run_in_streams (", 1)[1]
        if "decoded_batches (" in rest:
            return "waiting for decoded images" if "result (concurrent" in rest else "stacking decoded images"
        return "waiting for the inference streams" if "result (concurrent" in rest else "submitting batches"
    return next((category for needle, category in LOOP_RULES if needle in text), "other loop work")


def categorize(stack: str) -> str | None:
    """The category of one collapsed py-spy stack (``thread (id): name;frame;frame``), or None for a
    sample of a thread that waits (pool threads between tasks)."""
    frames = stack.split(";")
    if "MainThread" not in frames[0]:
        return next((category for needle, category in BUSY_RULES if needle in stack), None)
    if any(f.startswith("_compute (extract/job.py") for f in frames):
        return "loop: " + _loop_category(stack)
    if len(frames) == 1:  # no Python frame yet (or any more)
        return "outside the loop: no Python frame (interpreter start and exit, native waits)"
    return "outside the loop: " + next((c for needle, c in OUTSIDE_RULES if needle in stack), "other")


def profile_counts(raw: str) -> dict[str, int]:
    """Samples per category of py-spy's raw (collapsed) output."""
    counts: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        category = categorize(stack)
        if category and number.isdigit():
            counts[category] += int(number)
    return dict(counts)


def run_profiled(data: str, backbone: str, weights: str, shard: str, streams: int, engine: str, rate: int,
                 work: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", data, "--store", str(work / f"s{streams}.h5"),
           "--backbone", backbone, "--weights", weights, "--shard", shard, "--streams", str(streams),
           "--engine", engine, "--tolerance", "100", "--json", "--quiet"]
    raw = work / f"s{streams}.txt"
    spy = [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--idle", "--threads",
           "-r", str(rate), "-f", "raw", "-o", str(raw), "--", *cmd]
    done = subprocess.run(spy, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(spy)}` failed: {done.stderr.strip()[-2000:]}")
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    return {"streams": streams, "images": summary["extracted"], "loop_rate": summary["images_per_second"],
            "seconds": summary["seconds"], "counts": profile_counts(raw.read_text())}


def to_markdown(r: dict) -> str:
    runs = r["runs"]
    lines = [header(f"Where extract's time goes: {r['backbone']} (weights {r['weights']}, engine {r['engine']})"),
             f"py-spy at {r['rate']} samples/s over one `extract` of shard {r['shard']} of "
             f"{Path(r['data']).name} ({runs[0]['images']} images) per streams setting; load average "
             f"{r['load_before']:.1f} before on {r['cores']} cores. Main thread: share of its samples (of wall "
             f"time); other threads: seconds they spent decoding, writing or computing (wall time: time a busy "
             f"machine preempts them counts too; onnxruntime's own intra-op threads are not Python threads and "
             f"are not sampled).\n",
             "| | " + " | ".join(f"--streams {p['streams']}" for p in runs) + " |",
             "|---|" + "---|" * len(runs),
             "| `extract` loop (images/s) | " + " | ".join(f"{p['loop_rate']:.1f}" for p in runs) + " |",
             "| `extract` whole run (s) | " + " | ".join(f"{p['seconds']:.1f}" for p in runs) + " |"]
    categories = sorted({c for p in runs for c in p["counts"]}, key=lambda c: (c.startswith("outside"),
                                                                             not c.startswith("loop"), c))
    for category in categories:
        cells = []
        for p in runs:
            samples = p["counts"].get(category, 0)
            main = sum(n for c, n in p["counts"].items() if c.startswith(("loop", "outside")))
            cells.append(f"{100 * samples / max(main, 1):.1f}%" if category.startswith(("loop", "outside"))
                         else f"{samples / r['rate']:.2f} s")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = data_parser(__doc__, "extract-profile.md")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--shard", default="0/8")
    parser.add_argument("--streams", default="1,2", help="comma-separated --streams values")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    args = parse_data_args(parser)
    result = {"data": args.data, "backbone": args.backbone, "weights": args.weights, "engine": args.engine,
              "shard": args.shard, "rate": args.rate, "cores": len(os.sched_getaffinity(0)),
              "load_before": os.getloadavg()[0], "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_profiled(args.data, args.backbone, args.weights, "0/64", 1, args.engine, 10, work)  # caches the engine
        for streams in (int(s) for s in args.streams.split(",")):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            result["runs"].append(run_profiled(args.data, args.backbone, args.weights, args.shard, streams,
                                               args.engine, args.rate, work))
    write_results(args.out, to_markdown(result), result)


if __name__ == "__main__":
    main()
