"""From an image folder to a trained head: wall time of `extract` on an empty store + `fit-head --kind all`.

Both steps run as the user runs them (``python cli.py ...`` in fresh processes, so start-up, ONNX
conversion when not cached, and store writing count); the leaderboard is the one fit-head printed.

Example:
    python bench/heads_bench.py --data ../shared/datasets/trashnet --backbone efficientnet_lite0 --weights imagenet
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, data_parser, header, parse_data_args, write_results  # noqa: E402


def _run(args: list[str]) -> tuple[float, list[str]]:
    """Wall seconds and stdout lines of ``python cli.py ARGS``."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"`cli.py {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    return seconds, done.stdout.strip().splitlines()


def run_heads_benchmark(data: str, backbone: str, weights: str, workdir: str | Path,
                        store: str | Path | None = None, seed: int = 0) -> dict:
    """Extract ``data`` into a new store under ``workdir`` (or ``store``), fit every head, time both."""
    workdir = Path(workdir)
    store = Path(store) if store else workdir / "features.h5"
    if store.exists():
        raise FileExistsError(f"{store} exists; the benchmark starts from an empty store")
    head = store.with_name(f"{store.stem}-head")
    extract_seconds, lines = _run(["extract", str(data), "--store", str(store), "--backbone", backbone,
                                   "--weights", weights, "--json", "--quiet"])
    summary = json.loads(lines[-1])
    fit_seconds, lines = _run(["fit-head", "--store", str(store), "--kind", "all", "--out", str(head),
                               "--seed", str(seed), "--json"])
    return {
        "data": str(data), "backbone": backbone, "weights": weights, "store": str(store), "head": str(head),
        "images": summary["images"], "failed": summary["failed"], "engine": summary["engine"],
        "extract_seconds": extract_seconds, "fit_head_seconds": fit_seconds,
        "total_seconds": extract_seconds + fit_seconds,
        "leaderboard": [json.loads(line) for line in lines],
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def to_markdown(r: dict) -> str:
    lines = [
        header(f"Heads: {r['backbone']} (weights {r['weights']}), {Path(r['data']).name}"),
        f"{r['images']} images ({r['failed']} failed to decode), extraction engine `{r['engine']}`; "
        f"one run, each step a fresh `python cli.py` process.\n",
        "| step | wall time (s) |", "|---|---|",
        f"| `extract` into an empty store | {r['extract_seconds']:.1f} |",
        f"| `fit-head --kind all` | {r['fit_head_seconds']:.1f} |",
        f"| **empty store to trained head** | **{r['total_seconds']:.1f}** |",
        "",
        "| head | CV accuracy (mean ± std) | test accuracy | test macro-F1 | fit (s) | saved |", "|---|---|---|---|---|---|",
    ]
    for row in r["leaderboard"]:
        lines.append(f"| {row['kind']} | {row['cv_accuracy']:.3f} ± {row['cv_std']:.3f} | {_cell(row['test_accuracy'])} | "
                     f"{_cell(row['test_macro_f1'])} | {row['fit_seconds']:.2f} | {'yes' if row['saved'] else ''} |")
    best = next(row for row in r["leaderboard"] if row["saved"])
    lines.append(f"\n{best['n_train']} training, {best['n_val']} validation and {best['n_test']} test images; heads "
                 f"fitted on train + validation, the saved head the best on {best['cv_folds']}-fold CV accuracy; the "
                 f"kinds are fitted in parallel, so their seconds overlap.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = data_parser(__doc__, "heads.md")
    parser.add_argument("--store", default=None,
                        help="store to create and keep, the head beside it as STORE-head/ (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_data_args(parser)
    if args.store:
        result = run_heads_benchmark(args.data, args.backbone, args.weights, Path(args.store).resolve().parent,
                                     store=Path(args.store).resolve(), seed=args.seed)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_heads_benchmark(args.data, args.backbone, args.weights, tmp, seed=args.seed)
    write_results(args.out, to_markdown(result), result)


if __name__ == "__main__":
    main()
