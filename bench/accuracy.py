"""Head accuracy on stored features: 5-fold cross-validation over the whole data set, per head kind,
per backbone and per combination of backbones (mirror-averaged or not), with CPU time per image.

For each data set, the features of every variant in ``VARIANTS`` (extracted into one store per data
set in ``--store-dir`` with ``python cli.py extract [--tta flip]`` when not there yet; several names
joined with ``+`` are concatenated as ``fit-head --backbone a+b`` does) are split into 5 stratified
folds over all images (train, validation and test together); on each fold every head kind is fitted
on the other four, choosing its own hyper-parameters by an inner 3-fold CV exactly as ``fit-head``
does, and scored on the held-out fold. ``all`` is what ``fit-head --kind all`` would keep on those
four folds (best inner CV accuracy); the same folds serve every variant and kind.

CPU ms per image: each backbone's onnxruntime engine on one thread at batch 8 on the data set's own
images (CPU time of this process, so the machine's load inflates it less than wall time would;
mirror-averaged features run the backbone on the image and its mirror), summed over the variant's
backbones, plus the head in numpy on one BLAS thread. Also the head's ONNX graph size.

The recipe ``fit-head --kind all`` recommends (``classify/recipe.py``) is the last variant.

Example:
    python bench/accuracy.py --data ../shared/datasets/trashnet --data ../shared/datasets/fruits
    python bench/accuracy.py --data ../shared/datasets/trashnet --variants efficientnet_lite0 --kinds rbf,softmax
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, command_line, default_data, header, shown_path, write_results  # noqa: E402
from classify.heads import HEAD_KINDS  # noqa: E402
from classify.joined import read_features, split_names  # noqa: E402
from classify.recipe import RECIPE_FEATURES  # noqa: E402
from classify.selection import stratified_folds  # noqa: E402
from classify.train import choose, fit_candidates  # noqa: E402
from extract.store import FeatureStore  # noqa: E402

OUTER_FOLDS, INNER_FOLDS = 5, 3
TIMING_IMAGES = 32
VARIANTS = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "efficientnet_lite0@flip",
    "efficientnet_lite1@flip",
    "efficientnet_lite2@flip",
    "efficientnet_lite0+efficientnet_lite1",
    "efficientnet_lite0@flip+efficientnet_lite1@flip",
    "efficientnet_lite0@flip+efficientnet_lite2@flip",
    "efficientnet_lite0@flip+efficientnet_lite1@flip+efficientnet_lite2@flip",
    RECIPE_FEATURES,
)


def ensure_features(data: str, store: Path, name: str, extract: bool) -> bool:
    """Extract the stored features ``name`` (``BACKBONE`` or ``BACKBONE@flip``) of ``data`` into ``store``
    unless there; False when missing and ``extract`` is off."""
    if store.exists() and name in FeatureStore(store).backbones:
        return True
    if not extract:
        return False
    backbone, _, tta = name.partition("@")
    store.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "extract", data, "--store", str(store),
                           "--backbone", backbone, *(["--tta", tta] if tta else []), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"extract failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    return True


def backbone_ms(store: Path, name: str) -> float:
    """CPU ms per image of the features ``name``: its engine, one thread, batch 8, on the store's images."""
    from classify.joined import JoinedEngine
    from edge.imageio import load_image
    from extract.engine import open_engine

    features = FeatureStore(store).read(name, splits=("test",))
    record = features.backbone
    root = Path(features.store_attrs["images_root"])
    engine = JoinedEngine([record], [open_engine(record, engine="onnx", threads=1)])
    batch = np.stack([load_image(root / p, (record.input_size,) * 2) for p in features.paths[:TIMING_IMAGES]])
    engine(batch[:8])  # warm-up
    started = time.process_time()
    for start in range(0, len(batch), 8):
        engine(batch[start:start + 8])
    return (time.process_time() - started) / len(batch) * 1000


def head_onnx_bytes(head) -> int:
    return len(head.to_onnx().SerializeToString())


def outer_fold(X: np.ndarray, y: np.ndarray, train: np.ndarray, held: np.ndarray, kinds: list[str], seed: int) -> dict:
    """Every kind fitted on ``train`` (inner CV), scored on ``held``; plus the kind ``all`` keeps."""
    fitted = fit_candidates(kinds, X[train], y[train], INNER_FOLDS, seed)
    result = {}
    for kind, (head, inner, seconds) in zip(kinds, fitted):
        started = time.process_time()
        predicted = head.predict(X[held])
        result[kind] = {"accuracy": float(np.mean(predicted == y[held])), "inner_cv": float(np.mean(inner)),
                        "fit_seconds": seconds, "cpu_ms_per_image": (time.process_time() - started) / len(held) * 1000,
                        "head": head}
    kept = kinds[choose([result[k]["inner_cv"] for k in kinds])]
    result["all"] = {"accuracy": result[kept]["accuracy"], "kept": kept}
    return result


def evaluate_variant(store: Path, variant: str, kinds: list[str], seed: int, part_ms: dict[str, float]) -> dict:
    features = read_features(store, variant)
    X, y = features.features, features.labels
    started = time.perf_counter()
    folds = [outer_fold(X, y, train, held, kinds, seed) for train, held in stratified_folds(y, OUTER_FOLDS, seed)]
    backbone = sum(part_ms[name] for name in split_names(variant))
    rows = {}
    for kind in [*kinds, "all"]:
        accuracy = [fold[kind]["accuracy"] for fold in folds]
        row = {"accuracy_mean": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy)),
               "accuracy_by_fold": accuracy, "backbone_cpu_ms_per_image": backbone}
        if kind == "all":
            row["kept_by_fold"] = [fold["all"]["kept"] for fold in folds]
        else:
            row["head_cpu_ms_per_image"] = float(np.median([fold[kind]["cpu_ms_per_image"] for fold in folds]))
            row["head_onnx_bytes"] = head_onnx_bytes(folds[-1][kind]["head"])
            row["learned_last_fold"] = folds[-1][kind]["head"].get_learned_info()
        rows[kind] = row
    return {"variant": variant, "images": len(y), "feature_dim": int(X.shape[1]), "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}


def evaluate_data(data: str, store: Path, variants: list[str], kinds: list[str], seed: int, extract: bool) -> dict:
    names = sorted({name for variant in variants for name in split_names(variant)})
    present = {name for name in names if ensure_features(data, store, name, extract)}
    part_ms = {name: backbone_ms(store, name) for name in sorted(present)}
    measured = [v for v in variants if set(split_names(v)) <= present]
    results = []
    for variant in measured:
        results.append(evaluate_variant(store, variant, kinds, seed, part_ms))
        print(f"{Path(data).name} {variant}: " + ", ".join(
            f"{k} {r['accuracy_mean']:.3f}" for k, r in results[-1]["rows"].items()), flush=True)
    features = FeatureStore(store)
    return {"data": shown_path(data), "classes": features.root.classes, "backbone_cpu_ms_per_image": part_ms,
            "variants": results, "not_measured": [v for v in variants if v not in measured],
            "command": command_line(), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": [round(v, 1) for v in os.getloadavg()]}


def recipe_line(result: dict) -> str:
    recipe = next((v for v in result["variants"] if v["variant"] == RECIPE_FEATURES), None)
    if recipe is None:
        return f"Recipe ({RECIPE_FEATURES}): not measured in this run."
    kept = recipe["rows"]["all"]
    return (f"Recipe `fit-head --kind all` recommends ({RECIPE_FEATURES}, `--kind all`): "
            f"{kept['accuracy_mean']:.3f} ± {kept['accuracy_std']:.3f}, "
            f"{kept['backbone_cpu_ms_per_image']:.0f} backbone CPU ms/img.")


def trade_offs(results: list[dict]) -> list[dict]:
    """Per variant measured on every data set: backbone CPU ms (mean over the sets), the ``all`` row's
    accuracy on each set and its mean, and whether it is on the front: no other variant at most as
    costly is at least as accurate on every set (and better somewhere or cheaper). Cheapest first."""
    by_set = [{v["variant"]: v for v in r["variants"]} for r in results]
    common = [name for name in by_set[0] if all(name in variants for variants in by_set)] if by_set else []
    rows = [{"variant": name, "backbone_cpu_ms_per_image": float(np.mean(
                 [s[name]["rows"]["all"]["backbone_cpu_ms_per_image"] for s in by_set])),
             "accuracy": [s[name]["rows"]["all"]["accuracy_mean"] for s in by_set]} for name in common]

    def beaten(row: dict, other: dict) -> bool:
        at_least = all(o >= a for o, a in zip(other["accuracy"], row["accuracy"]))
        no_dearer = other["backbone_cpu_ms_per_image"] <= row["backbone_cpu_ms_per_image"]
        strictly = other["accuracy"] != row["accuracy"] or other["backbone_cpu_ms_per_image"] < row[
            "backbone_cpu_ms_per_image"]
        return other is not row and at_least and no_dearer and strictly

    for row in rows:
        row["mean_accuracy"] = float(np.mean(row["accuracy"]))
        row["on_front"] = not any(beaten(row, other) for other in rows)
    return sorted(rows, key=lambda row: row["backbone_cpu_ms_per_image"])


def trade_off_section(results: list[dict]) -> list[str]:
    rows = trade_offs(results)
    if not rows:
        return []
    names = [Path(r["data"]).name for r in results]
    best = max(rows, key=lambda row: row["mean_accuracy"])
    recipe = next((row for row in rows if row["variant"] == RECIPE_FEATURES), None)
    verdict = ("not measured on every set" if recipe is None else
               f"{'on' if recipe['on_front'] else 'not on'} the front, "
               f"{'the' if recipe is best else 'not the'} most accurate on average")
    return ["### Trade-off: `all` accuracy against backbone cost, on every set\n",
            "Front: no other row at most as costly is at least as accurate on every set. Differences "
            "smaller than the folds' std (above) are within noise.\n",
            f"| features | backbone CPU ms/img (mean over sets) | {' | '.join(names)} | mean | front |",
            "|---|--:|" + "--:|" * len(names) + "--:|---|",
            *[f"| {row['variant']} | {row['backbone_cpu_ms_per_image']:.1f} | "
              + " | ".join(f"{a:.3f}" for a in row["accuracy"])
              + f" | {row['mean_accuracy']:.3f} | {'yes' if row['on_front'] else ''} |" for row in rows],
            "", f"Most accurate on average: {best['variant']}. The recipe ({RECIPE_FEATURES}): {verdict}.", ""]


def to_markdown(results: list[dict]) -> str:
    parts = [header("Head accuracy: 5-fold cross-validation on stored features, per backbone and combination"),
             f"Each data set's images in {OUTER_FOLDS} stratified folds (train, validation and test together), the "
             f"same folds for every row; each head fitted on four folds, its hyper-parameters chosen by an inner "
             f"{INNER_FOLDS}-fold CV as `fit-head` does, scored on the fifth. `all`: the kind `fit-head --kind all` "
             f"keeps on those four folds. `a+b`: features concatenated (`fit-head --backbone a+b`); `@flip`: averaged "
             f"with the mirror image (`extract --tta flip`). Backbone CPU ms: onnxruntime on one thread, batch 8, "
             f"CPU time of the process on {TIMING_IMAGES} of the set's images (mirror-averaged: both passes); head "
             f"CPU ms: numpy on one BLAS thread. ONNX: the head graph alone.\n"]
    for r in results:
        if "command" in r:
            load = f" (load average {r['load_average'][1]:g} over the last 5 minutes at the end)" if "load_average" in r else ""
            parts.append(f"`{Path(r['data']).name}` measured {r['measured']}{load} by `{r['command']}`; head kinds "
                         f"{', '.join(k for k in r['variants'][0]['rows'] if k != 'all') if r['variants'] else '-'}.\n")
    for r in results:
        parts += [f"### {Path(r['data']).name}: {r['variants'][0]['images'] if r['variants'] else 0} images, "
                  f"{len(r['classes'])} classes\n",
                  "| features | head | accuracy (mean ± std, 5 folds) | backbone CPU ms/img | head CPU ms/img | head ONNX |",
                  "|---|---|---|--:|--:|--:|"]
        for v in r["variants"]:
            for kind, row in v["rows"].items():
                name = f"all (kept: {', '.join(row['kept_by_fold'])})" if kind == "all" else kind
                head = ["", ""] if kind == "all" else [f"{row['head_cpu_ms_per_image']:.3f}",
                                                       f"{row['head_onnx_bytes'] / 1e6:.2f} MB"]
                parts.append(f"| {v['variant']} ({v['feature_dim']}) | {name} | {row['accuracy_mean']:.3f} ± "
                             f"{row['accuracy_std']:.3f} | {row['backbone_cpu_ms_per_image']:.1f} | " + " | ".join(head)
                             + " |")
        if r["not_measured"]:
            parts.append(f"\nNot measured (features not in the store, run without --no-extract): "
                         f"{', '.join(r['not_measured'])}.")
        parts += ["", recipe_line(r), ""]
    return "\n".join(parts + trade_off_section(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", help="image folder (repeatable; default: ../shared trashnet and fruits)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated features to compare, as fit-head --backbone takes them")
    parser.add_argument("--kinds", default=",".join(HEAD_KINDS), help="comma-separated head kinds")
    parser.add_argument("--store-dir", default=str(Path(tempfile.gettempdir()) / "transferkit-bench-stores"),
                        help="where the feature stores are kept between runs (DATA_NAME.h5, one per data set)")
    parser.add_argument("--no-extract", action="store_true", help="measure only the features already in the stores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "accuracy.md"))
    parser.add_argument("--from-json", nargs="+", metavar="JSON",
                        help="measure nothing: write --out from the JSON files of earlier runs (e.g. one per data set, "
                             "measured in parallel); each data set's section names the command that measured it")
    args = parser.parse_args()
    if args.from_json:
        results = [r for path in args.from_json for r in json.loads(Path(path).read_text())]
        write_results(args.out, to_markdown(results), results)
        return
    data = args.data or [d for d in (default_data("trashnet"), default_data("fruits")) if d]
    if not data:
        parser.error("--data is required when ../shared/datasets is absent")
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(HEAD_KINDS))
    if unknown:
        parser.error(f"unknown head kinds {unknown}; choose among {', '.join(HEAD_KINDS)}")
    variants = [v for v in args.variants.split(",") if v]
    results = [evaluate_data(folder, Path(args.store_dir) / f"{Path(folder).name}.h5", variants, kinds, args.seed,
                             not args.no_extract) for folder in data]
    write_results(args.out, to_markdown(results), results)


if __name__ == "__main__":
    main()
