"""Evaluate a saved head on one split of a store and write the report files.

    >>> evaluate("features.h5", "head/", split="test", report_dir="report/")["accuracy"]

Writes ``REPORT_FILES`` into the report folder; ``metrics.json`` repeats the numbers for scripts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from classify import plots
from classify.data import features_for_head, fingerprint, split_rows
from classify.persist import head_dir, load_head
from classify.scoring import scores

REPORT_FILES = ("classification_report.txt", "confusion_matrix.png", "per_class.csv", "tsne.png",
                "misclassified.png", "metrics.json")


def _per_class_rows(y: np.ndarray, pred: np.ndarray, class_names: list[str]) -> list[dict]:
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return [
        {"class": name, "support": int(support[i]), "precision": round(float(precision[i]), 4),
         "recall": round(float(recall[i]), 4), "f1": round(float(f1[i]), 4)}
        for i, name in enumerate(class_names)
    ]


def evaluate(store: str | Path, head: str | Path, split: str = "test", report_dir: str | Path = "report",
             seed: int = 0) -> dict:
    """Predict ``split`` with the head, write the report files and return the metrics."""
    trained = load_head(head)
    features = features_for_head(trained, store)
    X, y, paths = split_rows(features, split, store)
    probabilities = trained.predict_proba(X)
    pred = probabilities.argmax(axis=1)
    names = trained.class_names
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{trained.kind} head on {features.backbone.name} features, {split} split ({len(y)} images)"

    labels = list(range(len(names)))
    (out / "classification_report.txt").write_text(
        title + "\n\n" + classification_report(y, pred, labels=labels, target_names=names, digits=3,
                                                zero_division=0),
        encoding="utf-8",
    )
    per_class = _per_class_rows(y, pred, names)
    with open(out / "per_class.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(per_class[0]))
        writer.writeheader()
        writer.writerows(per_class)
    matrix = confusion_matrix(y, pred, labels=labels)
    plots.confusion_matrix_png(matrix, names, out / "confusion_matrix.png", title)
    plots.tsne_png(X, y, names, out / "tsne.png", f"t-SNE of {features.backbone.name} features, {split} split",
                   seed=seed)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probabilities[wrong, pred[wrong]], kind="stable")]
    errors = [{"path": paths[i], "true": names[y[i]], "predicted": names[pred[i]],
               "probability": float(probabilities[i, pred[i]])} for i in wrong]
    plots.misclassified_png(errors, features.store_attrs.get("images_root"), out / "misclassified.png",
                            f"{len(errors)} misclassified of {len(y)} ({split})")
    metrics = {
        "split": split,
        "n": len(y),
        **scores(y, pred),
        "head": str(head_dir(head)),
        "kind": trained.kind,
        "store": str(store),
        "same_store_as_training": fingerprint(features) == trained.store.get("fingerprint"),
        "backbone": features.backbone.name,
        "class_names": names,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "misclassified": errors,
        "files": [str(out / name) for name in REPORT_FILES],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return metrics
