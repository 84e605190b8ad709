"""Standard classification metrics from scikit-learn (evaluate's metric scripts live on the Hub, unreachable here)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, names: list[str]) -> dict:
    label_ids = list(range(len(names)))
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=label_ids, average="macro", zero_division=0)),
        "n": int(len(truth)),
        "per_class": classification_report(truth, predicted, labels=label_ids, target_names=names,
                                           output_dict=True, zero_division=0),
        "confusion_matrix": confusion_matrix(truth, predicted, labels=label_ids).tolist(),
    }
