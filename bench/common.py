"""Helpers shared by the benchmark scripts: machine description, medians, markdown output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = ROOT.parent / "shared" / "datasets"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    return f"{cores} cores, {cpu}, Python {platform.python_version()}"


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def fmt(stat: dict, digits: int = 1) -> str:
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f}, {stat['runs']} runs)"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def header(title: str) -> str:
    return (f"## {title}\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}.\n"
            f"Command: `{command_line()}`\n")


def write_section(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)


def shown_path(path: str | Path) -> str:
    """A path as the docs show it, relative to the repository: the shared data as ``../shared/...``
    also when ``../shared`` is a link (as in a git worktree, where resolving it gave ``../../shared``)."""
    resolved = Path(path).resolve()
    shared = (ROOT.parent / "shared").resolve()
    if resolved.is_relative_to(shared):
        return (Path("../shared") / resolved.relative_to(shared)).as_posix()
    return os.path.relpath(resolved, ROOT)


def shown_or_scratch(path: str | Path) -> str:
    """``shown_path`` for a path inside the repository or ../shared; anything else (a scratch store
    under /tmp) is named by its file name only, the command line giving the whole path."""
    shown = shown_path(path)
    return f"{Path(path).name}, a scratch path (see the command)" if shown.startswith("..") and \
        not shown.startswith("../shared/") else shown


def default_data(name: str) -> str | None:
    folder = DEFAULT_SHARED / name
    return str(folder) if folder.is_dir() else None


def run_script(args: list[str]) -> tuple[float, list[str]]:
    """Wall seconds and stdout lines of ``python ARGS`` in a fresh process, from the repository root.

    A failure raises RuntimeError with the end of the process's stderr, so the benchmark says why.
    """
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"`python {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    return seconds, done.stdout.strip().splitlines()


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid``, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def process_title(pid: int) -> str:
    """The first word of a process's command line (Ray workers set it to ``ray::FUNCTION``); '' if gone."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (0 if it is gone)."""
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def data_parser(doc: str, out_name: str, backbone: str = "efficientnet_lite0",
                weights: str = "imagenet") -> argparse.ArgumentParser:
    """The options of a benchmark on one image folder: --data (default: ../shared trashnet), --backbone,
    --weights and --out (default: docs/bench/OUT_NAME); check the result with ``parse_data_args``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data("trashnet"), help="image folder (default: ../shared trashnet)")
    parser.add_argument("--backbone", default=backbone)
    parser.add_argument("--weights", default=weights)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / out_name))
    return parser


def parse_data_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if not args.data:
        parser.error("--data is required when ../shared/datasets is absent")
    return args


def write_results(out: str | Path, markdown: str, result: dict) -> None:
    """A benchmark's markdown at ``out`` and its raw results as JSON beside it."""
    write_section(out, markdown)
    Path(out).with_suffix(".json").write_text(json.dumps(result, indent=1))
