"""Head accuracy on one backbone's stored features: 5-fold cross-validation over the whole data set.

For each data set, the features of one backbone (extracted into ``--store-dir`` with
``python cli.py extract`` when not there yet) are split into 5 stratified folds over all images
(train, validation and test together); on each fold every head kind is fitted on the other four,
choosing its own hyper-parameters by an inner 3-fold CV exactly as ``fit-head`` does, and scored on
the held-out fold. ``all`` is what ``fit-head --kind all`` would keep on those four folds (best
inner CV accuracy). Also measured: the head's CPU time per image in numpy (BLAS on one thread),
its ONNX graph size and onnxruntime time per image at batch 1 on one thread (its edge cost, on top
of the backbone's).

Example:
    python bench/accuracy.py --data ../shared/datasets/trashnet --data ../shared/datasets/fruits
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

from bench.common import ROOT, default_data, header, write_section  # noqa: E402
from classify.heads import HEAD_KINDS  # noqa: E402
from classify.selection import stratified_folds  # noqa: E402
from classify.train import choose, fit_candidates  # noqa: E402
from extract.store import FeatureStore  # noqa: E402

OUTER_FOLDS, INNER_FOLDS = 5, 3


def ensure_store(data: str, store: Path, backbone: str) -> None:
    """Extract ``data`` into ``store`` with ``backbone`` (a fresh ``cli.py extract``), unless done."""
    if store.exists() and backbone in FeatureStore(store).backbones:
        return
    store.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "extract", data, "--store", str(store),
                           "--backbone", backbone, "--quiet"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"extract failed: {(done.stderr or done.stdout).strip()[-2000:]}")


def edge_cost(head, n_features: int) -> tuple[int, float]:
    """ONNX bytes of the head graph, and onnxruntime ms per image at batch 1 on one thread."""
    import onnxruntime as ort

    model = head.to_onnx().SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, n_features)).astype(np.float32)
    for _ in range(20):
        session.run(None, {"features": x})
    started, runs = time.perf_counter(), 200
    for _ in range(runs):
        session.run(None, {"features": x})
    return len(model), (time.perf_counter() - started) / runs * 1000


def outer_fold(X: np.ndarray, y: np.ndarray, train: np.ndarray, held: np.ndarray, seed: int) -> dict:
    """Every kind fitted on ``train`` (inner CV), scored on ``held``; plus the kind ``all`` keeps."""
    kinds = list(HEAD_KINDS)
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


def evaluate_data(data: str, store: Path, backbone: str, seed: int) -> dict:
    ensure_store(data, store, backbone)
    features = FeatureStore(store).read(backbone)
    X, y = features.features, features.labels
    folds = [outer_fold(X, y, train, held, seed) for train, held in stratified_folds(y, OUTER_FOLDS, seed)]
    rows = {}
    for kind in [*HEAD_KINDS, "all"]:
        accuracy = [fold[kind]["accuracy"] for fold in folds]
        row = {"accuracy_mean": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy)),
               "accuracy_by_fold": accuracy}
        if kind == "all":
            row["kept_by_fold"] = [fold["all"]["kept"] for fold in folds]
        else:
            row["cpu_ms_per_image"] = float(np.median([fold[kind]["cpu_ms_per_image"] for fold in folds]))
            row["onnx_bytes"], row["onnx_ms_per_image"] = edge_cost(folds[-1][kind]["head"], X.shape[1])
            row["learned_last_fold"] = folds[-1][kind]["head"].get_learned_info()
        rows[kind] = row
    return {"data": os.path.relpath(data, ROOT), "backbone": backbone, "images": len(y), "classes": features.class_names,
            "feature_dim": int(X.shape[1]), "rows": rows}


def to_markdown(results: list[dict]) -> str:
    parts = [header("Head accuracy: 5-fold cross-validation on stored features"),
             f"Each data set's images in {OUTER_FOLDS} stratified folds (train, validation and test together); each "
             f"head fitted on four folds, its hyper-parameters chosen by an inner {INNER_FOLDS}-fold CV as "
             f"`fit-head` does, scored on the fifth. `all`: the kind `fit-head --kind all` keeps on those four folds. "
             f"CPU ms: the head alone in numpy on one BLAS thread; ONNX: the head graph alone, onnxruntime, batch 1, "
             f"one thread (the backbone's cost comes on top).\n"]
    for r in results:
        parts += [f"### {Path(r['data']).name}: {r['images']} images, {len(r['classes'])} classes, "
                  f"{r['backbone']} features ({r['feature_dim']})\n",
                  "| head | accuracy (mean ± std over 5 folds) | CPU ms/img | ONNX size | ONNX ms/img |",
                  "|---|---|--:|--:|--:|"]
        for kind, row in r["rows"].items():
            cells = (["", "", ""] if kind == "all" else
                     [f"{row['cpu_ms_per_image']:.3f}", f"{row['onnx_bytes'] / 1e6:.2f} MB", f"{row['onnx_ms_per_image']:.3f}"])
            name = f"all (kept: {', '.join(row['kept_by_fold'])})" if kind == "all" else kind
            parts.append(f"| {name} | {row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", help="image folder (repeatable; default: ../shared trashnet and fruits)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--store-dir", default=str(Path(tempfile.gettempdir()) / "transferkit-bench-stores"),
                        help="where the feature stores are kept between runs (one per data set and backbone)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "accuracy.md"))
    args = parser.parse_args()
    data = args.data or [d for d in (default_data("trashnet"), default_data("fruits")) if d]
    if not data:
        parser.error("--data is required when ../shared/datasets is absent")
    results = []
    for folder in data:
        store = Path(args.store_dir) / f"{Path(folder).name}-{args.backbone}.h5"
        results.append(evaluate_data(folder, store, args.backbone, args.seed))
    write_section(args.out, to_markdown(results))
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
