"""The data set's report card from a feature store: duplicates, leaks, label conflicts, likely
mislabels, outliers and class balance.

    >>> report = run_audit("features.h5", report_dir="audit/")
    >>> report["summary"]["leak_groups"], report["mislabel_suspects"][0]["suggested"]

Writes ``audit.json`` and ``audit.html`` into ``report_dir`` (``classify/audit_report.py``). The
features come from the store; the image files, when the folder the store was made from is still
there (or ``images`` says where it went), add exact and near-exact copies and the thumbnails.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from classify import audit_words, duplicates, label_checks
from classify.audit_alignment import ALIGNED_THRESHOLD, CANDIDATE_COSINE
from classify.audit_images import images_reachable
from classify.audit_keypoints import KEYPOINT_COSINE, KEYPOINT_INLIERS, KEYPOINT_PX, MAX_PARTNERS, MIN_FILL
from extract.splits import SPLITS
from extract.store import FeatureSet, FeatureStore

TOP_SUSPECTS = 40


def _group_ids(n: int, groups: list[duplicates.DuplicateGroup]) -> np.ndarray:
    """One id per row: its duplicate group's, or its own (for group-aware folds)."""
    ids = np.arange(n)
    for group in groups:
        ids[group.rows] = group.rows[0]
    return ids


def _counting(bar: tqdm, total: int):
    bar.reset(total=total)
    return bar.update


def _row(features: FeatureSet, row: int) -> dict:
    return {"path": features.paths[row], "split": str(features.splits[row]),
            "label": features.class_names[int(features.labels[row])]}


def _balance(features: FeatureSet) -> list[dict]:
    counts = Counter(zip(features.labels.tolist(), features.splits.tolist()))
    return [{"class": name, "total": sum(counts[(c, s)] for s in SPLITS), **{s: counts[(c, s)] for s in SPLITS}}
            for c, name in enumerate(features.class_names)]


def _group_dict(features: FeatureSet, group: duplicates.DuplicateGroup) -> dict:
    return {"images": [_row(features, r) for r in group.rows], "evidence": group.kinds,
            "max_similarity": group.max_similarity, "similarity_by_evidence": group.similarity_by_kind,
            "splits": group.splits, "labels": group.labels,
            "leak": group.leak, "label_conflict": group.conflict}


def _mislabels(features: FeatureSet, probabilities: np.ndarray | None, top: int) -> list[dict]:
    if probabilities is None:  # too few distinct images to cross-validate
        return []
    names = features.class_names
    return [{**_row(features, row), "suggested": names[suggested], "p_label": round(p_label, 4),
             "p_suggested": round(p_suggested, 4)}
            for row, suggested, p_label, p_suggested in
            label_checks.mislabel_suspects(probabilities, features.labels)[:top]]


def _settings(pixels_used: bool, feature_threshold: float, thorough: bool = False) -> dict:
    return {"feature_threshold": feature_threshold, "mutual_nearest_cosine": duplicates.MUTUAL_COSINE,
            "pixel_threshold": duplicates.PIXEL_THRESHOLD if pixels_used else None,
            "aligned": {"candidate_cosine": CANDIDATE_COSINE, "candidates_per_image": duplicates.CANDIDATES_PER_IMAGE,
                        "threshold": ALIGNED_THRESHOLD} if pixels_used else None,
            "keypoints": {"candidate_cosine": KEYPOINT_COSINE, "inliers": KEYPOINT_INLIERS, "min_fill": MIN_FILL,
                          "max_partners_without_fill": MAX_PARTNERS,
                          "px": KEYPOINT_PX} if pixels_used else None,
            "visual_words": {"words": audit_words.WORDS, "vocabulary_images": audit_words.VOCABULARY_IMAGES,
                             "candidates_per_image": audit_words.WORD_CANDIDATES} if pixels_used and thorough else None,
            "mislabel_head": f"logistic regression C={label_checks.MISLABEL_C}, {label_checks.FOLDS}-fold out-of-fold",
            "outlier_mads": label_checks.OUTLIER_MADS}


def audit_features(features: FeatureSet, images_root: str | Path | None, feature_threshold: float,
                   top: int = TOP_SUSPECTS, seed: int = 0, progress: bool = True, thorough: bool = False) -> dict:
    """Everything the report shows, as one JSON-ready dict (no files written); ``thorough``: look for
    copies through visual words too (``classify/audit_words.py``)."""
    started = time.perf_counter()
    n = len(features.paths)
    reading = progress and images_reachable(images_root, features.paths)
    with tqdm(total=n, unit="img", desc="audit: read images", disable=not reading) as read, \
            tqdm(total=n, unit="row", desc="audit: similarities", disable=not progress) as bar, \
            tqdm(unit="pair", desc="audit: align pictures", disable=not progress) as aligning, \
            tqdm(total=n, unit="img", desc="audit: visual words", disable=not (reading and thorough)) as words, \
            tqdm(unit="img", desc="audit: keypoints", disable=not progress) as matching:
        pairs, pixels = duplicates.copy_pairs(features.features, features.paths, features.sha256, images_root,
                                              feature_threshold, read_progress=read.update, progress=bar.update,
                                              align_progress=lambda total: _counting(aligning, total),
                                              keypoint_progress=lambda total: _counting(matching, total),
                                              thorough=thorough, word_progress=words.update)
    groups = duplicates.group_duplicates(pairs, features.splits, features.labels, features.class_names)
    leaked = duplicates.leaked_test_rows(groups, features.splits)
    with tqdm(total=label_checks.FOLDS, unit="fold", desc="audit: mislabels", disable=not progress) as bar:
        probabilities = label_checks.out_of_fold_probabilities(
            features.features, features.labels, _group_ids(n, groups), len(features.class_names), seed, bar.update)
    similarity = label_checks.nearest_class_similarity(features.features, features.labels, len(features.class_names))
    outlier_rows, cut = label_checks.outliers(similarity)
    group_dicts = [_group_dict(features, g) for g in groups]
    return {
        "images": n, "classes": features.class_names, "backbone": features.backbone.name,
        "images_root": str(images_root) if images_root else None,
        "image_files_read": pixels is not None,
        "unreadable_files": pixels.unreadable if pixels else [],
        "settings": _settings(pixels is not None, feature_threshold, thorough),
        "summary": {
            "duplicate_groups": len(groups), "images_in_groups": sum(len(g.rows) for g in groups),
            "pairs": {kind: int(len(found)) for kind, found in pairs.items()},
            "distinct_pairs": len({(int(i), int(j)) for found in pairs.values() for i, j, _ in found}),
            "leak_groups": sum(g.leak for g in groups), "label_conflict_groups": sum(g.conflict for g in groups),
            "test_images_with_train_copy": int(leaked.size),
            "out_of_fold_accuracy": None if probabilities is None else
            float((probabilities.argmax(axis=1) == features.labels).mean()),
            "outliers": int(outlier_rows.size), "seconds": round(time.perf_counter() - started, 2),
        },
        "leak_effect": label_checks.leak_effect(features.features, features.labels, features.splits, leaked, seed),
        "duplicate_groups": group_dicts,
        "mislabel_suspects": _mislabels(features, probabilities, top),
        "outliers": {"similarity_cut": round(cut, 4),
                     "images": [{**_row(features, int(r)), "nearest_class_similarity": round(float(similarity[r]), 4)}
                                for r in outlier_rows[:top]]},
        "class_balance": _balance(features),
    }


def run_audit(store: str | Path, backbone: str | None = None, report_dir: str | Path = "audit",
              images: str | Path | None = None, feature_threshold: float = duplicates.FEATURE_THRESHOLD,
              top: int = TOP_SUSPECTS, thumbnails: bool = True, progress: bool = True, thorough: bool = False) -> dict:
    """Audit the store's features, write ``audit.json`` and ``audit.html``, return the report."""
    from classify.audit_report import write_report

    features = FeatureStore(store).read(backbone)
    root = images or features.store_attrs.get("images_root")
    report = audit_features(features, root, feature_threshold, top=top, progress=progress, thorough=thorough)
    report["store"] = str(store)
    report["files"] = write_report(report, report_dir, thumbnails=thumbnails)
    return report
