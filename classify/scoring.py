"""The one way accuracy and macro-F1 are computed, by heads, reports, fine-tuning and int8 checks.

Accuracy is always a fraction in [0, 1]; messages multiply by 100 when they print a percentage.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy (a fraction) and macro-F1 over the classes present in the split or predicted (an
    absent class would count as F1 0 and pull a perfect split below 1)."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
