"""Unknown images: how well each candidate score separates another data set's photos from the classes.

A head is trained on one data set's stored features (train split) and the other data set's photos
are the unknown images (none of their classes exist in the first). For each candidate score this
reports the AUROC (in-class test images vs unknown images), and, at a threshold that lets 95 % of
in-class images pass, the share of unknown images flagged and of in-class test images flagged.

- ``mahalanobis`` is what ``export-onnx`` puts in every model (``classify/ood.py``), calibrated the
  tool's way: out-of-fold scores of train + validation.
- The others are the usual confidence scores of a logistic-regression head on standardised features
  (max probability, max logit, energy) and the cosine to the nearest class centroid, calibrated on
  the validation split (95 % pass).

Example:
    python bench/ood_bench.py --data ../shared/datasets/fruits --data ../shared/datasets/trashnet
    python bench/ood_bench.py --work /tmp/ood-stores   # keeps the stores: a second run extracts nothing
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, default_data, header, shown_path, write_section  # noqa: E402

PASS_RATE = 0.95


def _features(store: Path, backbone: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from extract.store import FeatureStore

    data = FeatureStore(store).read(backbone)
    return data.features.astype(np.float64), data.labels, np.asarray(data.splits)


def _confidence_scores(X: np.ndarray, y: np.ndarray, train: np.ndarray) -> dict:
    """Candidate scores (higher = more unknown) computed from a logistic-regression head."""
    from scipy.special import logsumexp, softmax
    from sklearn.linear_model import LogisticRegression

    mean, scale = X[train].mean(axis=0), X[train].std(axis=0) + 1e-6
    head = LogisticRegression(C=0.1, max_iter=3000).fit((X[train] - mean) / scale, y[train])
    logits = lambda A: ((A - mean) / scale) @ head.coef_.T + head.intercept_  # noqa: E731
    centre = X[train].mean(axis=0)
    unit = lambda A: (A - centre) / np.linalg.norm(A - centre, axis=1, keepdims=True)  # noqa: E731
    centroids = np.stack([unit(X[train & (y == k)]).mean(axis=0) for k in np.unique(y)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return {
        "max probability": lambda A: -softmax(logits(A), axis=1).max(axis=1),
        "max logit": lambda A: -logits(A).max(axis=1),
        "energy": lambda A: -logsumexp(logits(A), axis=1),
        "nearest class centroid (cosine)": lambda A: -(unit(A) @ centroids.T).max(axis=1),
    }


def _row(name: str, score, threshold: float, test: np.ndarray, unknown: np.ndarray, how: str) -> dict:
    from sklearn.metrics import roc_auc_score

    in_class, other = score(test), score(unknown)
    truth = np.r_[np.zeros(len(in_class)), np.ones(len(other))]
    return {"score": name, "auroc": float(roc_auc_score(truth, np.r_[in_class, other])),
            "unknown_flagged": float(np.mean(other > threshold)),
            "test_flagged": float(np.mean(in_class > threshold)), "calibrated_on": how}


def compare_scores(known: Path, unknown: Path, backbone: str) -> dict:
    from classify.ood import MahalanobisScorer

    X, y, splits = _features(known, backbone)
    other, _, _ = _features(unknown, backbone)
    train, validation, test = (splits == s for s in ("train", "validation", "test"))
    fit_rows = train | validation
    started = time.process_time()
    scorer = MahalanobisScorer(quantile=PASS_RATE).fit(X[fit_rows], y[fit_rows])
    fit_cpu_seconds = time.process_time() - started
    rows = [_row("mahalanobis (the tool's)", scorer.score_samples, scorer.threshold_, X[test], other,
                 scorer.calibration_["calibrated_on"])]
    for name, score in _confidence_scores(X, y, train).items():
        threshold = float(np.quantile(score(X[validation]), PASS_RATE))
        rows.append(_row(name, score, threshold, X[test], other, f"validation split ({int(validation.sum())})"))
    return {"test_images": int(test.sum()), "unknown_images": len(other), "rows": rows,
            "features": int(X.shape[1]), "directions": scorer.calibration_["directions"],
            "fit_cpu_seconds": round(fit_cpu_seconds, 2)}


def _extract(data: str, store: Path, backbone: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "extract", data, "--store", str(store),
                           "--backbone", backbone, "--quiet"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"extract {data} failed: {done.stderr.strip()[-1500:]}")


def to_markdown(result: dict) -> str:
    lines = [header(f"Unknown images: {result['backbone']} features"), "",
             f"Threshold: {PASS_RATE:.0%} of in-class images pass. AUROC: in-class test images vs unknown "
             f"images (1.0 = perfectly separated).", ""]
    for pair in result["pairs"]:
        lines += [f"### Classes of {pair['known_name']}, unknown images from {pair['unknown_name']}", "",
                  f"{pair['test_images']} in-class test images, {pair['unknown_images']} unknown images. "
                  f"The tool's score ({pair['directions']} of {pair['features']} directions + residual) was fitted "
                  f"and calibrated (6 fits) in {pair['fit_cpu_seconds']:.1f} CPU-s.", "",
                  "| score | AUROC | unknown images flagged | in-class test images flagged | threshold from |",
                  "|---|--:|--:|--:|---|"]
        lines += [f"| {r['score']} | {r['auroc']:.4f} | {r['unknown_flagged']:.1%} | {r['test_flagged']:.1%} | "
                  f"{r['calibrated_on']} |" for r in pair["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", type=Path, metavar="DIR",
                        help="two image folders [default: ../shared/datasets/fruits and trashnet]")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "ood.md")
    parser.add_argument("--work", type=Path, default=None, metavar="DIR",
                        help="keep the two feature stores in DIR and reuse them next time (extract is incremental) "
                             "[default: a temporary folder]")
    args = parser.parse_args(argv)
    data = args.data or [Path(d) for d in (default_data("fruits"), default_data("trashnet")) if d]
    if len(data) != 2:
        parser.error("give exactly two --data folders (their classes must not overlap)")
    with tempfile.TemporaryDirectory(prefix="transferkit-ood-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        stores = [work / f"{folder.name}.h5" for folder in data]
        for folder, store in zip(data, stores):
            _extract(str(folder), store, args.backbone)
        pairs = []
        for known, unknown in ((0, 1), (1, 0)):
            pair = compare_scores(stores[known], stores[unknown], args.backbone)
            pairs.append({**pair, "known_name": data[known].name, "unknown_name": data[unknown].name})
    result = {"backbone": args.backbone, "data": [shown_path(d) for d in data], "pairs": pairs}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_section(args.out, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
