"""Local runner vs Ray runner on this machine: wall time and CPU-seconds of the same extraction.

Variants, each ``python cli.py extract DATA --store NEW --json --quiet`` in a fresh process on an empty
store, interleaved over --repeats:
- ``local``: the local runner (onnxruntime on every core, decoding threads beside it);
- ``ray-1``: ``--runner ray --cpus-per-task N``: one Ray worker with all N cores of the local instance;
- ``ray-2``: ``--runner ray --cpus-per-task N/2``: two Ray workers with half the cores each.
The Ray variants start their own local Ray instance, so Ray's start-up is in their wall time and CPU.
CPU-seconds are those of the command and of every process it started (Ray's GCS, raylet, agents and
workers), counted by ``bench/cputime.py`` (a cgroup of its own where one can be made, else /proc
sampling); ``RUSAGE_CHILDREN`` misses Ray's workers, which the raylet lets the kernel reap. Then: each Ray store against the local one (same rows in
the canonical order, max |feature difference|), ``fit-head --kind all`` on the local store and the
two-worker Ray store (same numbers?), and an unchanged re-run with ``--runner ray`` (Ray not started).

Example:
    python bench/ray_bench.py --data ../shared/datasets/trashnet --backbone efficientnet_lite0
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (ROOT, data_parser, descendants, fmt, header, parse_data_args, process_title,  # noqa: E402
                          rss_mib, spread, write_results)
from bench.cputime import run_tree  # noqa: E402

CPU_METHODS = {"cgroup": "charged by the kernel to a cgroup the command ran in",
               "proc": "the last /proc sample of each process"}
TASK_TITLE = "ray::run_shard_task"  # what a Ray worker calls itself while it runs an extraction task


def measured(cmd: list[str]) -> dict:
    """Wall seconds, CPU-seconds of the whole process tree (``bench.cputime``), the largest resident memory
    of a Ray task's worker (sampled while the command runs) and the JSON summary ``cmd`` printed."""
    worker_rss = [0.0]

    def sample_workers(pid: int) -> None:
        busy = [child for child in descendants(pid) if process_title(child) == TASK_TITLE]
        worker_rss[0] = max([worker_rss[0], *(rss_mib(child) for child in busy)])

    run = run_tree(cmd, cwd=ROOT, interval=0.1, on_poll=sample_workers, check=True)
    return {"wall_seconds": run.wall_seconds, "cpu_seconds": run.cpu_seconds, "cpu_method": run.method,
            "worker_peak_rss_mib": worker_rss[0], "summary": json.loads(run.stdout.strip().splitlines()[-1])}


def extract_cmd(data: str, store: Path, backbone: str, weights: str, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "extract", data, "--store", str(store), "--backbone", backbone,
            "--weights", weights, "--engine", "onnx", "--json", "--quiet", *extra]


def variants(cores: int) -> dict[str, list[str]]:
    return {"local": [], "ray-1": ["--runner", "ray", "--cpus-per-task", str(cores)],
            "ray-2": ["--runner", "ray", "--cpus-per-task", str(max(1, cores // 2))]}


def compare(store: Path, reference: Path) -> dict:
    import numpy as np

    from extract.store import FeatureStore

    got, want = FeatureStore(store).read(), FeatureStore(reference).read()
    row = {p: i for i, p in enumerate(got.paths)}
    aligned = got.features[[row[p] for p in want.paths]] if sorted(row) == sorted(want.paths) else None
    return {"same_rows": aligned is not None, "same_order": got.paths == want.paths,
            "max_abs_diff": None if aligned is None else float(np.abs(aligned - want.features).max())}


def fit_heads(store: Path, out: Path) -> list[dict]:
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit-head", "--store", str(store), "--kind", "all",
                           "--out", str(out), "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    heads = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [{k: v for k, v in h.items() if k not in ("fit_seconds", "head")}
            for h in heads]


def run_benchmark(data: str, backbone: str, weights: str, repeats: int, work: Path) -> dict:
    from extract.backbones import get_backbone
    from extract.ray_runner import prepare_engine
    from extract.record import BackboneRecord
    from extract.weights import resolve_weights

    spec = get_backbone(backbone)
    prepare_engine(BackboneRecord.create(spec, resolve_weights(spec, weights).record(), spec.input_size),
                   weights)  # converted before timing
    cores = len(os.sched_getaffinity(0))
    runs: dict[str, list[dict]] = {name: [] for name in variants(cores)}
    stores: dict[str, Path] = {}
    for repeat in range(repeats):
        for name, extra in variants(cores).items():
            stores[name] = work / f"{name}-{repeat}.h5"
            runs[name].append(measured(extract_cmd(data, stores[name], backbone, weights, extra)))
    unchanged = measured(extract_cmd(data, stores["ray-2"], backbone, weights, variants(cores)["ray-2"]))
    heads_local = fit_heads(stores["local"], work / "head-local")
    heads_ray = fit_heads(stores["ray-2"], work / "head-ray")
    images = runs["local"][0]["summary"]["images"]
    return {
        "data": Path(data).name, "backbone": backbone, "weights": weights, "cores": cores, "images": images,
        "cpu_method": runs["local"][0]["cpu_method"],
        "variants": {name: {"wall": spread([r["wall_seconds"] for r in rs]),
                            "cpu": spread([r["cpu_seconds"] for r in rs]),
                            "loop_rate": spread([r["summary"]["images_per_second"] for r in rs]),
                            "worker_peak_rss_mib": max(r["worker_peak_rss_mib"] for r in rs),
                            "extracted": rs[0]["summary"]["extracted"]} for name, rs in runs.items()},
        "parity": {name: compare(stores[name], stores["local"]) for name in ("ray-1", "ray-2")},
        "unchanged_rerun": {"wall_seconds": unchanged["wall_seconds"], "cpu_seconds": unchanged["cpu_seconds"],
                            "extracted": unchanged["summary"]["extracted"]},
        "fit_head_all": {"local": heads_local, "ray-2": heads_ray, "same": heads_local == heads_ray},
    }


def to_markdown(r: dict, title: str) -> str:
    cores, n = r["cores"], r["images"]
    names = {"local": f"local runner ({cores} onnxruntime threads)",
             "ray-1": f"Ray, 1 worker x {cores} CPUs", "ray-2": f"Ray, 2 workers x {max(1, cores // 2)} CPU"}
    lines = [header(title), f"{n} images, {r['backbone']} (weights {r['weights']}), ONNX engine cached before "
             f"timing; each run a fresh process on an empty store; the Ray runs start their own local Ray instance. "
             f"CPU-s: user+system of the command and of every process it started, {CPU_METHODS[r['cpu_method']]} "
             f"(`bench/cputime.py`). Medians (min–max).", "",
             "| runner | wall s | CPU-s (whole process tree) | CPU-ms per image | loop images/s | "
             "Ray task worker peak RSS |", "|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        rss = f"{v['worker_peak_rss_mib']:.0f} MiB" if v["worker_peak_rss_mib"] else "–"
        lines.append(f"| {names[name]} | {fmt(v['wall'])} | {fmt(v['cpu'])} | "
                     f"{1000 * v['cpu']['median'] / n:.1f} | {fmt(v['loop_rate'])} | {rss} |")
    lines += ["", *(f"- {names[name]} vs local runner: same rows **{p['same_rows']}**, in the same order "
                    f"**{p['same_order']}**, max |feature difference| **{p['max_abs_diff']}**"
                    for name, p in r["parity"].items())]
    u = r["unchanged_rerun"]
    lines.append(f"- unchanged folder again with `--runner ray`: {u['extracted']} computed in "
                 f"**{u['wall_seconds']:.2f} s** wall, {u['cpu_seconds']:.2f} CPU-s (no Ray started)")
    lines.append(f"- `fit-head --kind all` on the local store and on the 2-worker Ray store: same numbers: "
                 f"**{r['fit_head_all']['same']}**")
    load = r["load_average"]
    lines.append(f"- load average (1 min) {load['start']:.1f} at the start, {load['end']:.1f} at the end: wall "
                 f"times on a machine shared with other jobs stretch with it, CPU-s much less")
    if not all(p["same_order"] for p in r["parity"].values()):
        lines.append("- the stores hold the same rows but read them in the order they were written, and the "
                     "stochastic heads (softmax, MLP) depend on row order: reading in one canonical order is "
                     "what makes the heads equal")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = data_parser(__doc__, "ray.md")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved")
    args = parse_data_args(parser)
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:  # commands run from the repository root: absolute data path
        result = run_benchmark(str(Path(args.data).resolve()), args.backbone, args.weights, args.repeats, Path(work))
    result["load_average"] = {"start": load_at_start, "end": os.getloadavg()[0]}
    title = f"Ray runner vs local runner: {args.backbone}, {Path(args.data).name}"
    write_results(args.out, to_markdown(result, title), result)


if __name__ == "__main__":
    main()
