"""How well the unknown score separates a folder of images of no class from the in-class test images.

``evaluate --ood DIR`` adds ``metrics["ood"]``: the AUROC of the score (in-class test images as
negatives, DIR's images as positives), the share of DIR's images flagged at the model's calibrated
threshold and the share of in-class test images flagged at it (about ``1 - quantile`` if the
calibration holds). For an exported model the score and threshold are the graph's ``ood_score`` and
its ``ood`` metadata; for a head they are the scorer ``export-onnx`` would add
(``classify.ood.unknown_scorer`` on the store's train and validation rows), so the figures are
those of the model the head would export to.

    >>> summary = ood_summary(in_class_scores, unknown_scores, threshold)
    >>> summary["auroc"], summary["unknown_flagged"], summary["in_class_flagged"]
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from classify.classifiers import Classifier
from extract.errors import TransferKitError
from extract.inputs import collect_images


def ood_summary(in_class: np.ndarray, unknown: np.ndarray, threshold: float) -> dict:
    """AUROC and flagged shares of the scores (higher = farther from every class)."""
    in_class, unknown = np.asarray(in_class, float), np.asarray(unknown, float)
    truth = np.r_[np.zeros(len(in_class)), np.ones(len(unknown))]
    return {
        "auroc": float(roc_auc_score(truth, np.r_[in_class, unknown])),
        "threshold": float(threshold),
        "unknown_images": len(unknown), "unknown_flagged": float(np.mean(unknown > threshold)),
        "in_class_images": len(in_class), "in_class_flagged": float(np.mean(in_class > threshold)),
    }


def with_scorer(classifier: Classifier, scorer) -> Classifier:
    """A head's classifier that also returns ``scorer``'s score of the backbone features, as an export would."""
    head, backbone = classifier.head, classifier.features
    if head is None or backbone is None:
        raise TransferKitError("only a head's classifier can take a scorer on its features")

    def run_with_ood(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = backbone(batch)
        return head.predict_proba(features), scorer.score_samples(features)

    return replace(classifier, run_with_ood=run_with_ood, ood=scorer.calibration_)


def folder_scores(classifier: Classifier, folder: str | Path, progress: bool = False) -> tuple[np.ndarray, dict]:
    """The unknown score of every image under ``folder`` (recursively), and ``{path: reason}`` of unreadable ones."""
    from classify.predict import predict_images

    if classifier.ood is None:
        raise TransferKitError(f"{classifier.name} has no unknown score (ood_score output and ood metadata): "
                               f"export it with `python cli.py export-onnx`, or evaluate the head with --store")
    files, _ = collect_images([str(folder)])
    rows = predict_images(classifier, files, progress=progress)
    scores = np.asarray([row["ood_score"] for row in rows if "ood_score" in row], float)
    if not len(scores):
        raise TransferKitError(f"--ood {folder}: no image there could be read (expected image files of no class)")
    return scores, {row["image"]: row["error"] for row in rows if "error" in row}


def ood_metrics(classifier: Classifier, in_class: np.ndarray, folder: str | Path, progress: bool = False) -> dict:
    """``ood_summary`` of ``in_class`` scores against ``folder``'s, at the classifier's threshold."""
    unknown, unreadable = folder_scores(classifier, folder, progress)
    return {**ood_summary(in_class, unknown, float(classifier.ood["threshold"])), "folder": str(folder),
            "calibration": classifier.ood, "unreadable": unreadable}


def ood_line(ood: dict) -> str:
    """One line for the terminal."""
    return (f"unknown images ({ood['folder']}): AUROC {ood['auroc']:.3f}; {100 * ood['unknown_flagged']:.1f}% of "
            f"{ood['unknown_images']} flagged and {100 * ood['in_class_flagged']:.1f}% of {ood['in_class_images']} "
            f"in-class images flagged at the calibrated threshold {ood['threshold']:.4g}")
