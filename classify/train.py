"""Fit heads on a feature store and keep the best one.

    >>> rows = fit_heads("features.h5", kind="all", backbone=None, out="head/", seed=0)
    >>> [(r["kind"], r["val_accuracy"], r["saved"]) for r in rows]

The best head is the one with the highest validation accuracy (ties: the first in ``HEAD_KINDS``);
test accuracy is reported, never used to choose.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from classify.data import check_trainable, fingerprint, split_counts
from classify.heads import HEAD_KINDS, KIND_CHOICES, make_head
from classify.persist import TrainedHead, save_head
from extract.store import FeatureStore


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes present in the split or predicted (an absent class
    would count as F1 0 and pull a perfect split below 1)."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def fit_heads(store: str | Path, kind: str = "all", backbone: str | None = None, out: str | Path = "head",
              seed: int = 0, progress: bool = False) -> list[dict]:
    """Fit ``kind`` (or every kind for ``"all"``), save the best to ``out``; one metrics dict per head.

    ``progress``: a bar over the kinds on stderr, naming the one being fitted."""
    from tqdm import tqdm

    if kind not in KIND_CHOICES:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(KIND_CHOICES)}")
    features = FeatureStore(store).read(backbone)
    check_trainable(features, store)
    X, y = features.subset("train")
    X_val, y_val = features.subset("validation")
    X_test, y_test = features.subset("test")
    fitted = []
    kinds = tqdm(HEAD_KINDS if kind == "all" else (kind,), unit="head", desc="fit-head", disable=not progress,
                 leave=False)
    for name in kinds:
        kinds.set_postfix_str(f"fitting {name} on {len(y)} images")
        started = time.perf_counter()
        head = make_head(name, seed).fit(X, y, X_val, y_val)
        seconds = time.perf_counter() - started
        val = scores(y_val, head.predict(X_val))
        test = scores(y_test, head.predict(X_test)) if len(y_test) else {}
        fitted.append((head, {
            "kind": name,
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "test_accuracy": test.get("accuracy"),
            "test_macro_f1": test.get("macro_f1"),
            "fit_seconds": round(seconds, 3),
            "n_train": len(y), "n_val": len(y_val), "n_test": len(y_test),
            "backbone": features.backbone["name"],
            "seed": seed,
            "params": head.get_params(),
            "learned": head.get_learned_info(),
        }))
    best = max(range(len(fitted)), key=lambda i: (fitted[i][1]["val_accuracy"], -i))
    head, metrics = fitted[best]
    saved = save_head(TrainedHead(
        head=head, class_names=features.class_names, backbone=features.backbone,
        store={"path": str(Path(store).resolve()), "fingerprint": fingerprint(features),
               "splits": split_counts(features)},
        metrics=metrics,
    ), out)
    return [{**m, "saved": i == best, "head": str(saved) if i == best else None} for i, (_, m) in enumerate(fitted)]
