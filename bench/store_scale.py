"""The feature store at scale: a synthetic store of N rows built through the library's own writer.

Measures what issue 12 asks: time of each checkpoint (first vs last), `store info` time and peak
RSS, `fit-head --kind svm/softmax` time and peak RSS (each in a fresh process, under an address
space cap so a head that needs more memory than the box has fails alone), `store merge` of 4 shard
stores, and disk used vs the features' own bytes. Results for every N measured so far are kept in
docs/bench/store-scale.json and rendered to docs/bench/store-scale.md.

Example:
    python bench/store_scale.py --rows 100000 --dim 1280
    python bench/store_scale.py --rows 1000000 --dim 1280 --work /tmp/store-1m --fit-mem-gb 8
    python bench/store_scale.py --rows 100000 --merge-only   # `store merge` alone, for a row measured before
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import ROOT, command_line, header, machine, write_section  # noqa: E402
from bench.memory import TIME  # noqa: E402
from bench.store_synthetic import SPLIT_SETTINGS, image_table, record  # noqa: E402
from extract.store import ImageTable, StoreWriter, empty_state, merge_stores  # noqa: E402

OUT = ROOT / "docs" / "bench"


def _features(rows: np.ndarray, table: ImageTable, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Class-separable float16 features: a class centre plus noise."""
    classes = np.asarray([int(table.class_name[i][1:]) for i in rows], dtype=np.float32)
    noise = rng.standard_normal((len(rows), dim), dtype=np.float32)
    return (noise + classes[:, None] * 0.5).astype(np.float16)


def build_store(store: Path, table: ImageTable, rows: np.ndarray, dim: int, backbones: int, checkpoints: int,
                batch: int, classes: int, shard: str = "") -> list[float]:
    """Write ``rows`` in batches, committing ``checkpoints`` times; seconds of each checkpoint (commit)."""
    rng = np.random.default_rng(len(rows))
    batches = -(-len(rows) // batch)
    every = -(-batches // checkpoints)  # batches per checkpoint
    seconds = []
    with StoreWriter(store) as writer:
        state = empty_state(**SPLIT_SETTINGS, layout="class-folders", images_root="/synthetic", shard=shard)
        state.images, state.classes = table, [f"c{k}" for k in range(classes)]
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            paths, shas = [table.path[i] for i in chunk], [table.sha256[i] for i in chunk]
            for k in range(backbones):
                name = f"synthetic{k}"
                writer.write_segment(name, {**record(dim), "name": name}, paths, shas,
                                     _features(chunk, table, dim, rng), {})
            done = start // batch + 1
            if done % every == 0 or done == batches:
                began = time.perf_counter()
                writer.commit(state)
                seconds.append(time.perf_counter() - began)
    return seconds


def _subtable(table: ImageTable, rows: np.ndarray) -> ImageTable:
    return ImageTable(*([getattr(table, c)[i] for i in rows] for c in ImageTable.COLUMNS))


def measured(args: list[str], mem_cap_gb: float | None = None, timeout: float = 1800) -> dict:
    """Wall seconds, peak RSS (MB, of that process alone) and outcome of ``python cli.py ARGS``
    (``python ARGS`` when ARGS starts with ``-c``).

    Peak RSS and CPU come from ``/usr/bin/time`` around the command, not from this process's wait4:
    Linux records the parent's memory at fork+exec in a child's peak, and this process holds the
    synthetic image table (about 450 MB at 1M rows), which once made a 57 MB `store info` read 448 MB.
    """
    cap = int(mem_cap_gb * 2**30) if mem_cap_gb else None

    def limit():
        if cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as usage:
        began = time.perf_counter()
        script = [] if args[0] == "-c" else [str(ROOT / "cli.py")]
        proc = subprocess.Popen([TIME, "-q", "-o", usage.name, "-f", "%M %U %S", sys.executable, *script, *args],
                                cwd=ROOT, stdout=out, stderr=err, text=True, preexec_fn=limit,
                                start_new_session=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))  # time and its child
        timer.start()
        code = proc.wait()
        timer.cancel()
        seconds = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        kib, user, system = (float(v) for v in usage.read().split()[-3:]) if code != -9 else (0.0, 0.0, 0.0)
    code = _child_exit_code(code, stderr)
    if code == 0:
        status = "ok"
    elif code == -9:
        status = f"stopped after {timeout:.0f} s"
    else:
        lines = [line for line in stderr.strip().splitlines() if line.strip()] or ["?"]
        status = "failed: " + lines[-1][:200]
    return {"seconds": round(seconds, 2), "cpu_seconds": round(user + system, 2),
            "peak_rss_mb": round(kib / 1024, 1), "status": status,
            "mem_cap_gb": mem_cap_gb, "stdout_tail": stdout.strip()[-3000:]}


def _child_exit_code(code: int, stderr: str) -> int:
    """``/usr/bin/time`` exits with its child's status; a child killed by a signal shows as 128+N."""
    if code == 128 + 9 or "Command terminated by signal 9" in stderr:
        return -9
    return code


def disk_bytes(store: Path) -> int:
    folder = store.with_name(store.name + ".d")
    return store.stat().st_size + sum(p.stat().st_size for p in folder.glob("*.h5"))


def run(rows: int, dim: int, backbones: int, work: Path, checkpoints: int, batch: int, classes: int, shards: int,
        fit_mem_gb: float, fit_timeout: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store.h5"
    for old in (store, *work.glob("shard*.h5"), work / "merged.h5"):
        _remove_store(old)
    began = time.perf_counter()
    table = image_table(rows, classes)
    table_seconds = time.perf_counter() - began
    began = time.perf_counter()
    commits = build_store(store, table, np.arange(rows), dim, backbones, checkpoints, batch, classes)
    build_seconds = time.perf_counter() - began
    feature_bytes = rows * dim * 2 * backbones
    result = {
        "rows": rows, "dim": dim, "dtype": "float16", "backbones": backbones, "classes": classes,
        "machine": machine(), "command": command_line(), "measured": _now(),
        "load_average_at_start": os.getloadavg()[0],
        "image_table_seconds": round(table_seconds, 2), "build_seconds": round(build_seconds, 2),
        "checkpoints": len(commits), "checkpoint_seconds": [round(c, 3) for c in commits],
        "last_over_first_checkpoint": round(commits[-1] / commits[0], 2),
        "feature_bytes": feature_bytes, "disk_bytes": disk_bytes(store),
    }
    result["disk_over_features"] = round(result["disk_bytes"] / feature_bytes, 3)
    result.update(measure_info(store))
    result.update(measure_fits(store, rows * dim * 2, fit_mem_gb, fit_timeout))
    result["merge"] = _merge(work, table, dim, backbones, shards, batch, classes)
    return result


def measure_fits(store: Path, one_backbone: int, fit_mem_gb: float, fit_timeout: float) -> dict:
    """`fit-head --kind svm` and `--kind softmax` on the store, each in a fresh process: seconds, CPU
    seconds, peak RSS and its ratio to one backbone's feature bytes, the head's CV and test accuracy."""
    fits = {}
    for kind in ("svm", "softmax"):
        fit = measured(["fit-head", "--store", str(store), "--kind", kind, "--backbone", "synthetic0",
                        "--out", str(store.parent / f"head-{kind}"), "--json", "--quiet"], fit_mem_gb, fit_timeout)
        fit["peak_over_feature_bytes"] = round(fit["peak_rss_mb"] * 2**20 / one_backbone, 2)
        if fit["status"] == "ok":
            row = json.loads(fit["stdout_tail"].splitlines()[-1])
            fit.update(cv_accuracy=row["cv_accuracy"], cv_folds=row["cv_folds"], test_accuracy=row["test_accuracy"])
        fits[f"fit_{kind}"] = fit
    return fits


def measure_info(store: Path) -> dict:
    """`store info` as a command, and the library call alone in a fresh process (no CLI imports)."""
    from extract.store import FeatureStore

    began = time.perf_counter()
    FeatureStore(store).info()
    in_process = round(time.perf_counter() - began, 3)
    return {"store_info": measured(["store", "info", str(store), "--json"]),
            "store_info_library": measured(["-c", INFO_ONLY, str(store)]),
            "store_info_in_process_seconds": in_process}


INFO_ONLY = "import sys; from extract.store import FeatureStore; FeatureStore(sys.argv[1]).info()"


def _merge(work: Path, table: ImageTable, dim: int, backbones: int, shards: int, batch: int, classes: int) -> dict:
    """Build ``shards`` shard stores of the same images, then time `store merge` into one."""
    from extract.dataset import shard_of

    paths = []
    for k in range(shards):
        rows = np.asarray([i for i, p in enumerate(table.path) if shard_of(p, shards) == k], dtype=np.int64)
        path = work / f"shard{k}.h5"
        build_store(path, _subtable(table, rows), np.arange(len(rows)), dim, backbones, 2, batch, classes,
                    shard=f"{k}/{shards}")
        paths.append(path)
    out = work / "merged.h5"
    timing = measured(["store", "merge", str(out), *map(str, paths)])
    began = time.perf_counter()
    merge_stores(work / "merged-again.h5", paths)
    in_process = time.perf_counter() - began
    _remove_store(work / "merged-again.h5")
    return {**timing, "shards": shards, "in_process_seconds": round(in_process, 3),
            "merged_root_bytes": out.stat().st_size, "merged_disk_bytes_new": _new_bytes(out)}


def _new_bytes(store: Path) -> int:
    """Bytes the merged store added to the disk: its root, plus files that are not hard links."""
    folder = store.with_name(store.name + ".d")
    return store.stat().st_size + sum(p.stat().st_size for p in folder.glob("*.h5") if p.stat().st_nlink == 1)


def _remove_store(store: Path) -> None:
    import shutil

    store.unlink(missing_ok=True)
    for suffix in (".d", ".parts"):
        shutil.rmtree(store.with_name(store.name + suffix), ignore_errors=True)


def render(results: dict) -> str:
    lines = [header("Feature store at scale (synthetic float16 rows through the store's own writer)"),
             "Targets (issue 12): `store info` < 1 s and < 150 MB at 1M rows; last checkpoint <= 1.5x the first; "
             "merge < 1 s; fit-head peak RSS < 2.5x the backbone's feature bytes.\n",
             "| rows x dim | build s | checkpoints (first / last s, ratio) | disk / features | store info: command "
             "s, MB; library alone s, MB (in-process s) | fit svm s, MB (x features) | "
             "fit softmax s, MB (x features) | "
             "merge of 4: s (in-process s), new bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(results, key=int):
        r = results[key]
        c, info, merge = r["checkpoint_seconds"], r["store_info"], r["merge"]
        fits = [_fit_cell(f) for f in (r["fit_svm"], r["fit_softmax"])]
        lines.append(f"| {r['rows']:,} x {r['dim']} | {r['build_seconds']} | {len(c)}: {c[0]} / {c[-1]} "
                     f"({r['last_over_first_checkpoint']}x) | {r['disk_over_features']} | {info['seconds']}, "
                     f"{info['peak_rss_mb']}; {_library_info(r)} ({r['store_info_in_process_seconds']}) | "
                     f"{fits[0]} | {fits[1]} | "
                     f"{merge['seconds']} ({merge['in_process_seconds']}), {merge['merged_disk_bytes_new']:,} |")
    lines.append("")
    for key in sorted(results, key=int):
        r = results[key]
        lines.append(f"- {r['rows']:,} rows: `{r['command']}`, {r['measured']}, load average "
                     f"{r['load_average_at_start']:.1f} at start (a shared 2-core machine: other jobs ran meanwhile)"
                     + (f"; `store info` re-measured with `{r['info_command']}`" if "info_command" in r else "")
                     + (f"; fit-head re-measured with `{r['fit_command']}`, {r['fit_measured']}, load average "
                        f"{r['fit_load_average_at_start']:.1f} at start" if "fit_command" in r else "")
                     + (f"; `store merge` re-measured with `{r['merge_command']}`, {r['merge_measured']}, load "
                        f"average {r['merge_load_average']:.1f} at start" if "merge_command" in r else "") + ".")
    lines.append("\nTimes of `store info`, `fit-head` and `store merge` are whole `python cli.py ...` processes "
                 "(start-up included); fit-head runs under an address-space cap (`--fit-mem-gb`) so a head "
                 "needing more memory than the machine has fails alone instead of taking the machine down.")
    return "\n".join(lines) + "\n"


def _fit_cell(fit: dict) -> str:
    """seconds (CPU seconds), MB (x features)[, CV / test accuracy and folds]."""
    cpu = f" ({fit['cpu_seconds']} CPU)" if "cpu_seconds" in fit else ""
    accuracy = (f"; CV {fit['cv_accuracy']:.3f} ({fit['cv_folds']} fold{'s' if fit['cv_folds'] > 1 else ''}), "
                f"test {fit['test_accuracy']:.3f}" if "cv_accuracy" in fit else "")
    return f"{fit['seconds']}{cpu}, {fit['peak_rss_mb']} ({fit['peak_over_feature_bytes']}x){accuracy}{_note(fit)}"


def _library_info(result: dict) -> str:
    library = result.get("store_info_library")
    return f"{library['seconds']}, {library['peak_rss_mb']}" if library else "not measured"


def _note(fit: dict) -> str:
    return "" if fit["status"] == "ok" else f" **{fit['status']}** (cap {fit['mem_cap_gb']} GB)"


def _remeasure_fits(args: argparse.Namespace) -> None:
    """Re-measure `fit-head` of the --rows row on the store kept in --work (built there first if absent)."""
    store = args.work / "store.h5"
    if not store.exists():
        args.work.mkdir(parents=True, exist_ok=True)
        build_store(store, image_table(args.rows, args.classes), np.arange(args.rows), args.dim, args.backbones,
                    args.checkpoints, args.batch, args.classes)
    load, began = os.getloadavg()[0], _now()
    _update_row(args, measure_fits(store, args.rows * args.dim * 2, args.fit_mem_gb, args.fit_timeout),
                fit_command=command_line(), fit_measured=began, fit_load_average_at_start=load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--backbones", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="Keep the built store at WORK/store.h5.")
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4096, help="Rows per batch file (extract uses --batch-size).")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--fit-mem-gb", type=float, default=8.0, help="Address-space cap of each fit-head process.")
    parser.add_argument("--fit-timeout", type=float, default=1200.0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--info-only", action="store_true",
                        help="Only re-measure `store info` on the store kept in --work (updates that row).")
    parser.add_argument("--fit-only", action="store_true",
                        help="Only re-measure `fit-head` on the store in --work, building it there first if absent "
                             "(updates that row).")
    parser.add_argument("--merge-only", action="store_true",
                        help="Only re-measure `store merge` of --shards new shard stores of --rows rows in all "
                             "(updates that row).")
    args = parser.parse_args()
    path = args.out / "store-scale.json"
    if args.info_only:
        _update_row(args, measure_info(args.work / "store.h5"), info_command=command_line())
        return
    if args.fit_only:
        _remeasure_fits(args)
        return
    if args.merge_only:  # the shards have the row's shape (dim, backbones, classes), not the options'
        load, row = os.getloadavg()[0], json.loads(path.read_text())[str(args.rows)]
        args.work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            merge = _merge(Path(tmp), image_table(args.rows, row["classes"]), row["dim"], row["backbones"],
                           args.shards, args.batch, row["classes"])
        _update_row(args, {"merge": merge}, merge_command=command_line(), merge_measured=_now(),
                    merge_load_average=load)
        return
    with tempfile.TemporaryDirectory(dir=args.work.parent if args.work else None) as tmp:
        work = args.work or Path(tmp)
        result = run(args.rows, args.dim, args.backbones, work, args.checkpoints, args.batch, args.classes,
                     args.shards, args.fit_mem_gb, args.fit_timeout)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[str(args.rows)] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_section(args.out / "store-scale.md", render(results))


def _update_row(args: argparse.Namespace, fields: dict, **notes) -> None:
    """Replace some measurements of the --rows row of the kept results, and render them again."""
    path = args.out / "store-scale.json"
    results = json.loads(path.read_text())
    results[str(args.rows)].update(fields, **notes)
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_section(args.out / "store-scale.md", render(results))


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


if __name__ == "__main__":
    main()
