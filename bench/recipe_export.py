"""What the accuracy recipe costs to fit and export: ``fit-head --kind all`` on the features it names
(``classify/recipe.py``: EfficientNet-Lite0, -Lite1 and -Lite2, each averaged with the mirror image),
then ``export-onnx`` composing the three backbones, the head and the unknown score into one graph.

Each command runs in a fresh process under ``/usr/bin/time -v``: wall and CPU (user + system) seconds
and peak resident memory. Also the kind ``--kind all`` kept, the ONNX file's size and the part of it
that is the unknown score's weights (initializers under ``ood/``), the parity line ``export-onnx``
prints (Keras against onnxruntime on real images; the export is refused when they differ), and where
the export's time and memory go: it runs through ``bench/export_stages.py`` (the same command,
in-process, each step timed).
The recipe's features are extracted into ``--store`` first when missing (unless ``--no-extract``).

Example:
    python bench/recipe_export.py --data ../shared/datasets/trashnet --store /tmp/accuracy/bench/trashnet.h5
    python bench/recipe_export.py --features efficientnet_lite0@flip+efficientnet_lite1@flip --out flip.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accuracy import ensure_features  # noqa: E402
from bench.common import (ROOT, default_data, header, parse_data_args, shown_or_scratch, shown_path,  # noqa: E402
                          write_results)
from bench.memory import timed_command  # noqa: E402
from classify.joined import split_names  # noqa: E402
from classify.recipe import RECIPE_FEATURES  # noqa: E402

UNKNOWN_SCORE_PREFIX = "ood/"


def onnx_sizes(path: Path) -> dict:
    """The file's bytes, and the bytes of the unknown score's initializers inside it."""
    import onnx

    model = onnx.load(str(path))
    unknown = sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer
                  if UNKNOWN_SCORE_PREFIX in t.name)
    return {"onnx_bytes": path.stat().st_size, "unknown_score_bytes": unknown}


def step(name: str, args: list[str]) -> dict:
    usage = timed_command(args, ROOT)
    row = {"step": name, **{k: round(usage[k], 1) for k in ("wall_seconds", "cpu_seconds", "peak_rss_mib")},
           "load_average_after": round(os.getloadavg()[0], 1), "stdout": usage["stdout"].strip().splitlines()}
    print(f"{name}: {row['wall_seconds']} s wall, {row['cpu_seconds']} CPU-s, {row['peak_rss_mib']:.0f} MiB",
          file=sys.stderr, flush=True)
    return row


def measure(data: str, store: Path, features: str, extract: bool) -> dict:
    missing = [name for name in split_names(features) if not ensure_features(data, store, name, extract)]
    if missing:
        raise SystemExit(f"{store} lacks {', '.join(missing)}: run without --no-extract")
    cli = str(ROOT / "cli.py")
    with tempfile.TemporaryDirectory(prefix="recipe-export-") as tmp:
        head, model = Path(tmp) / "head", Path(tmp) / "model.onnx"
        fit = step("fit-head --kind all", [cli, "fit-head", "--store", str(store), "--kind", "all", "--backbone",
                                           features, "--out", str(head), "--json", "--quiet"])
        stages = Path(tmp) / "stages.json"
        export = step("export-onnx", [str(ROOT / "bench" / "export_stages.py"), "--stages-json", str(stages), "--",
                                      "--store", str(store), "--head", str(head), "--out", str(model), "--quiet"])
        sizes, export["stages"] = onnx_sizes(model), json.loads(stages.read_text())
    kept = next(row for row in map(json.loads, fit["stdout"]) if row.get("saved"))
    return {"data": shown_path(data), "store": shown_or_scratch(store), "features": features, "kept": {k: kept[k] for k in ("kind", "cv_accuracy", "cv_std", "test_accuracy")},
            "steps": [fit, export], **sizes, "parity": next(line for line in export["stdout"] if line.startswith("parity on"))}


def to_markdown(r: dict) -> str:
    rows = [f"| `{s['step']}` | {s['wall_seconds']:.1f} | {s['cpu_seconds']:.1f} | {s['peak_rss_mib']:.0f} | "
            f"{s['load_average_after']:g} |" for s in r["steps"]]
    return "\n".join([
        header(f"The accuracy recipe's fit and export on {Path(r['data']).name}"),
        f"Features `{r['features']}`{' (the recipe, `classify/recipe.py`)' if r['features'] == RECIPE_FEATURES else ''} from `{r['store']}` (images `{r['data']}`). Each "
        f"command in a fresh process under `/usr/bin/time -v`; CPU = user + system seconds; the load average "
        f"(1 minute) is read after each command on a machine shared with other work.\n",
        "| command | wall s | CPU s | peak RSS (MiB) | load after |", "|---|--:|--:|--:|--:|", *rows, "",
        f"- Head kept by `--kind all`: `{r['kept']['kind']}`, cross-validation accuracy "
        f"{r['kept']['cv_accuracy']:.3f} ± {r['kept']['cv_std']:.3f}, test accuracy {r['kept']['test_accuracy']:.3f}.",
        f"- ONNX file: {r['onnx_bytes'] / 2**20:.1f} MiB, of which the unknown score's weights "
        f"{r['unknown_score_bytes'] / 2**20:.1f} MiB.",
        f"- Parity (printed by `export-onnx`): {r['parity']}", "", *stage_table(r["steps"][-1]["stages"])])


def merged_stages(stages: list[dict]) -> list[dict]:
    """Calls of the same step at the same depth as one row (the parity check's batches): wall and CPU
    summed, the highest peak RSS, the first start, and how many calls."""
    merged: dict[tuple, dict] = {}
    for row in stages:
        key = (row["step"], row["depth"])
        if key not in merged:
            merged[key] = {**row, "calls": 0, "wall_seconds": 0.0, "cpu_seconds": 0.0}
        into = merged[key]
        into["calls"] += 1
        into["wall_seconds"] += row["wall_seconds"]
        into["cpu_seconds"] += row["cpu_seconds"]
        into["peak_rss_mib"] = max(into["peak_rss_mib"], row["peak_rss_mib"])
    return list(merged.values())


def stage_table(stages: list[dict]) -> list[str]:
    """Where `export-onnx`'s time and memory went (``bench/export_stages.py``), steps over 1 % of its wall time."""
    whole = stages[0]["wall_seconds"]
    shown = [row for row in merged_stages(stages) if row["depth"] == 0 or row["wall_seconds"] >= 0.01 * whole]
    return ["`export-onnx`'s steps (`bench/export_stages.py`: the same command in-process, each step of "
            "`export/onnx_export.py` timed; CPU of the whole process while the step ran; peak RSS sampled every "
            "50 ms; steps under 1 % of the wall time left out; `>` a step inside the one above; a step called "
            "several times: its calls summed):\n",
            "| step | what | calls | starts at s | wall s | CPU s | RSS before (MiB) | peak RSS (MiB) |",
            "|---|---|--:|--:|--:|--:|--:|--:|",
            *[f"| {'> ' * max(row['depth'] - 1, 0)}`{row['step']}` | {row['what']} | {row['calls']} | "
              f"{row['started']:.1f} | {row['wall_seconds']:.1f} | {row['cpu_seconds']:.1f} | "
              f"{row['rss_before_mib']:.0f} | {row['peak_rss_mib']:.0f} |" for row in shown], ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data("trashnet"), help="image folder (default: ../shared trashnet)")
    parser.add_argument("--store", default=None, help="feature store of --data holding (or to receive) the recipe's "
                        "features [default: TMPDIR/transferkit-bench-stores/DATA_NAME.h5, as bench/accuracy.py]")
    parser.add_argument("--features", default=RECIPE_FEATURES,
                        help="features to fit and export instead of the recipe's, as fit-head --backbone takes them")
    parser.add_argument("--no-extract", action="store_true", help="fail instead of extracting missing features")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "recipe-export.md"))
    args = parse_data_args(parser)
    store = Path(args.store or Path(tempfile.gettempdir()) / "transferkit-bench-stores" / f"{Path(args.data).name}.h5")
    result = measure(args.data, store, args.features, not args.no_extract)
    write_results(args.out, to_markdown(result), result)

if __name__ == "__main__":
    main()
