"""Classification metrics in NumPy (no scikit-learn needed)."""
from __future__ import annotations

import numpy as np


def classification_report(y_true, y_pred, label_names) -> dict:
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    per_class = {}
    f1s = []
    for i, name in enumerate(label_names):
        tp = int(np.sum((y_pred == i) & (y_true == i)))
        fp = int(np.sum((y_pred == i) & (y_true != i)))
        fn = int(np.sum((y_pred != i) & (y_true == i)))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        per_class[name] = {"precision": round(precision, 4), "recall": round(recall, 4),
                           "f1": round(f1, 4), "support": int(np.sum(y_true == i))}
    return {
        "accuracy": round(float(np.mean(y_true == y_pred)), 4) if len(y_true) else 0.0,
        "macro_f1": round(float(np.mean(f1s)), 4),
        "per_class": per_class,
        "n": int(len(y_true)),
    }
