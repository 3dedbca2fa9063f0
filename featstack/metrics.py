"""Classification metrics of a set of predictions: what `featstack evaluate` writes and the report
shows.

One function computes them from class names, whatever produced the predictions (a saved model on
cached features, or a network on images), so both are scored the same way. CPU side: no torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    ``classes`` fixes the order of ``per_class`` and of the matrix (rows = true class, columns =
    predicted class). Macro-F1 averages over the classes present in ``y_true`` or ``y_pred`` (a
    class absent from both says nothing about this split); a class never predicted has
    precision 0 (scikit-learn's ``zero_division=0``).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    classes = [str(c) for c in classes]
    y_true = np.asarray([str(v) for v in y_true], dtype=object)
    y_pred = np.asarray([str(v) for v in y_pred], dtype=object)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels for {len(y_pred)} predictions")
    n = int(len(y_true))
    if n == 0:
        return {"n": 0, "accuracy": None, "f1_macro": None, "classes": classes, "per_class": {},
                "confusion": []}
    present = [c for c in classes if c in set(y_true) | set(y_pred)]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    return {
        "n": n,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "classes": classes,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(s[i])} for i, c in enumerate(classes)},
        "confusion": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }


def write_metrics(metrics: dict, path: str | os.PathLike) -> Path:
    """``metrics`` as JSON at ``path`` (written to a temporary name, then renamed)."""
    from .atomic import atomic_paths

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path) as (tmp,):
        tmp.write_text(json.dumps(metrics, indent=1) + "\n")
    return path


def metrics_lines(metrics: dict) -> list[str]:
    """A short human summary: overall figures, then one line per class."""
    if not metrics["n"]:
        return ["no labelled rows to score"]
    lines = [f"accuracy     {metrics['accuracy']:.4f} on {metrics['n']} labelled rows",
             f"macro-F1     {metrics['f1_macro']:.4f}",
             f"{'class':<20} {'precision':>9} {'recall':>9} {'F1':>9} {'support':>8}"]
    for c, m in metrics["per_class"].items():
        lines.append(f"{c[:20]:<20} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f} {m['support']:>8d}")
    return lines
