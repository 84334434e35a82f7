"""`fit-head --kind all` on one store: wall and CPU seconds, peak RSS and the leaderboard, against an older commit.

Each run is a fresh `python cli.py fit-head --store S --kind all --json` process; its CPU seconds
(user + system, from wait4) are the figure to trust on a shared machine, where wall time grows
with everyone else's load (the load average is recorded at each run). With ``--baseline COMMIT``
the same command runs from that commit's tree (exported with `git archive`), interleaved with
this checkout's runs so both see the same load: the before/after of a change, with its accuracy.

Example:
    python bench/fit_head_bench.py --data ../shared/datasets/trashnet --repeats 3 --baseline f30b87b
    python bench/fit_head_bench.py --store features.h5 --repeats 5
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, data_parser, fmt, header, run_script, shown_path, spread, write_results  # noqa: E402


def timed_fit_head(tree: Path, store: Path, out: Path) -> dict:
    """One `fit-head --kind all` from ``tree``: wall s, CPU s, peak RSS MiB, load average, leaderboard."""
    load = os.getloadavg()[0]
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, str(tree / "cli.py"), "fit-head", "--store", str(store), "--kind",
                                 "all", "--out", str(out), "--json", "--quiet"], cwd=tree, stdout=stdout,
                                stderr=stderr, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - began
        stdout.seek(0)
        stderr.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"fit-head from {tree} failed: {stderr.read().strip()[-2000:]}")
        rows = [json.loads(line) for line in stdout.read().splitlines() if line.strip()]
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "load_average": load,
            "leaderboard": [{key: row[key] for key in ("kind", "cv_accuracy", "cv_std", "test_accuracy", "saved")}
                            for row in rows]}


def export_commit(commit: str, into: Path) -> Path:
    """The tree of ``commit`` (this repository's) written to ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run(store: Path, repeats: int, baseline: str | None, work: Path) -> dict:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # before the runs: the code they measure
    trees = {"this checkout": ROOT}
    if baseline:
        trees[f"commit {baseline}"] = export_commit(baseline, work / "baseline")
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(repeats):  # interleaved, so that both trees see the same load
        for name, tree in trees.items():
            runs[name].append(timed_fit_head(tree, store, work / "head"))
    return {"repeats": repeats, "baseline": baseline,
            "commit": commit,
            "results": {name: {"wall": spread([r["wall_seconds"] for r in rs]),
                               "cpu": spread([r["cpu_seconds"] for r in rs]),
                               "peak_rss_mib": spread([r["peak_rss_mib"] for r in rs]),
                               "load_average": spread([r["load_average"] for r in rs]),
                               "leaderboard": rs[0]["leaderboard"], "runs": rs}
                        for name, rs in runs.items()}}


def to_markdown(r: dict, title: str) -> str:
    lines = [header(f"fit-head --kind all: {title}"),
             f"Features: {r['source']}; each run a fresh `python cli.py fit-head --kind all` process; medians "
             f"(min–max) of {r['repeats']} interleaved runs. CPU seconds are user + system of the process.\n",
             "| code | wall s | CPU s | peak RSS MiB | load average at start |", "|---|---|---|---|---|"]
    for name, res in r["results"].items():
        shown = f"{name} ({r['commit']})" if name == "this checkout" else name
        lines.append(f"| {shown} | {fmt(res['wall'])} | {fmt(res['cpu'])} | {fmt(res['peak_rss_mib'], 0)} | "
                     f"{fmt(res['load_average'])} |")
    lines += ["", "| code | " + " | ".join(row["kind"] for row in next(iter(r["results"].values()))["leaderboard"])
              + " |", "|---" * (1 + len(next(iter(r["results"].values()))["leaderboard"])) + "|"]
    for name, res in r["results"].items():
        cells = [f"{row['cv_accuracy']:.3f} ± {row['cv_std']:.3f} / {row['test_accuracy']:.3f}"
                 + (" (saved)" if row["saved"] else "") for row in res["leaderboard"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("\nLeaderboard cells: CV accuracy (mean ± std over the folds) / test accuracy, from the first run.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = data_parser(__doc__, "fit-head.md")
    parser.add_argument("--store", default=None, help="an existing store to fit on (default: extract --data into a "
                                                      "temporary one first)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="a commit to compare with, run from its own tree")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store).resolve() if args.store else Path(tmp) / "features.h5"
        if not args.store:
            if not args.data:
                parser.error("give --store, or --data when ../shared/datasets is absent")
            run_script([str(ROOT / "cli.py"), "extract", args.data, "--store", str(store), "--backbone",
                        args.backbone, "--weights", args.weights, "--quiet"])
        result = run(store, args.repeats, args.baseline, Path(tmp))
    if args.store:
        title = f"{Path(args.data).name}, a store made beforehand" if args.data else "a store made beforehand"
        source = "the features in the store `--store` names (a scratch path of the machine it ran on: see the command)"
        if args.data:
            source += f", extracted from `{shown_path(args.data)}`"
    else:
        title = f"{Path(args.data).name}, {args.backbone}"
        source = f"`{shown_path(args.data)}` extracted with {args.backbone} into a new store"
    result.update(source=source)
    write_results(args.out, to_markdown(result, title), result)


if __name__ == "__main__":
    main()
