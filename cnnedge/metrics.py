"""Classification metrics on numpy arrays (torch-free: predict uses them too)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of every class; NaN for a class with no samples."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def classification_report(cm: np.ndarray, class_names: list[str]) -> dict:
    """The JSON form used by train, export and predict."""
    per_class = per_class_accuracy(cm)
    return {
        "accuracy": accuracy(cm),
        "per_class_accuracy": {
            name: (None if np.isnan(a) else float(a)) for name, a in zip(class_names, per_class)
        },
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }
