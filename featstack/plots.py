"""PNG plots of bench results and of a model's test predictions.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never
through pyplot: no GUI backend, no global state, safe in worker processes and on headless
machines. This module (like the whole CPU side) never imports torch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

METRIC = "cv_accuracy_mean"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _value(row: dict, metric: str) -> float:
    v = row.get(metric)
    return float("nan") if v in (None, "") else float(v)


def _heads(rows: Sequence[dict]) -> list[str]:
    """Heads in registry order (stable across runs and plots), unknown names last."""
    from .heads import list_heads

    order = {h: i for i, h in enumerate(list_heads())}
    return sorted(dict.fromkeys(r["head"] for r in rows), key=lambda h: (order.get(h, len(order)), h))


def heatmap(rows: Sequence[dict], path: str | os.PathLike, metric: str = METRIC) -> Path:
    """Score by backbone combination (rows) × head (columns): each cell shows the best fusion's
    score and names that fusion, so one picture answers "which backbones, which head"."""
    combos = list(dict.fromkeys(sorted((r["backbones"] for r in rows),
                                       key=lambda b: (b.count("+"), b))))
    heads = _heads(rows)
    grid = np.full((len(combos), len(heads)), np.nan)
    label = [["" for _ in heads] for _ in combos]
    for r in rows:
        i, j = combos.index(r["backbones"]), heads.index(r["head"])
        v = _value(r, metric)
        if np.isfinite(v) and not (grid[i, j] >= v):
            grid[i, j] = v
            label[i][j] = f"{v:.3f}\n{r['fusion']}"
    fig = _figure(max(4.5, 1.6 * len(heads) + 3.0), max(2.5, 0.5 * len(combos) + 1.5))
    ax = fig.add_subplot()
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto",
                   vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    ax.set_xticks(range(len(heads)), heads)
    ax.set_yticks(range(len(combos)), combos)
    ax.set_xlabel("head")
    ax.set_ylabel("backbones")
    mid = (lo + hi) / 2
    for i in range(len(combos)):
        for j in range(len(heads)):
            if label[i][j]:
                ax.text(j, i, label[i][j], ha="center", va="center", fontsize=7,
                        color="black" if grid[i, j] > mid else "white")
    ax.set_title(f"{metric} (best fusion per cell)")
    fig.colorbar(im, ax=ax, label=metric)
    return _save(fig, path)


def best_by_size(rows: Sequence[dict], path: str | os.PathLike, metric: str = METRIC) -> Path:
    """Best score per combination size, one line per head and one for the best overall, with
    the winning combination named: does adding backbones still pay?"""
    sizes = sorted({int(r["size"]) for r in rows})
    heads = _heads(rows)
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    for h in heads:
        ys = []
        for s in sizes:
            vals = [_value(r, metric) for r in rows if r["head"] == h and int(r["size"]) == s]
            vals = [v for v in vals if np.isfinite(v)]
            ys.append(max(vals) if vals else np.nan)
        ax.plot(sizes, ys, marker="o", linewidth=1, alpha=0.7, label=h)
    best_y, best_txt = [], []
    for s in sizes:
        cand = [r for r in rows if int(r["size"]) == s and np.isfinite(_value(r, metric))]
        if cand:
            b = max(cand, key=lambda r: _value(r, metric))
            best_y.append(_value(b, metric))
            best_txt.append(f"{b['backbones']}\n{b['head']}/{b['fusion']}")
        else:
            best_y.append(np.nan)
            best_txt.append("")
    ax.plot(sizes, best_y, marker="s", color="black", linewidth=2.2, label="best")
    for x, y, t in zip(sizes, best_y, best_txt):
        if np.isfinite(y):
            ax.annotate(t, (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=6)
    ax.margins(x=0.2, y=0.25)
    ax.set_xticks(sizes)
    ax.set_xlabel("number of backbones combined")
    ax.set_ylabel(metric)
    ax.set_title(f"best {metric} per combination size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, path)


def confusion(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str],
              path: str | os.PathLike) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), counts annotated."""
    from sklearn.metrics import confusion_matrix

    n = len(classes)
    cm = confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=np.arange(n))
    side = min(16.0, max(4.0, 0.45 * n + 2.5))
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), list(classes), rotation=90 if n > 6 else 0, fontsize=7 if n > 20 else 9)
    ax.set_yticks(range(n), list(classes), fontsize=7 if n > 20 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > thresh else "black")
    acc = np.trace(cm) / max(1, cm.sum())
    ax.set_title(f"confusion matrix (accuracy {acc:.3f}, {int(cm.sum())} samples)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def per_class_f1(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str],
                 path: str | os.PathLike) -> Path:
    """F1 per class as horizontal bars (worst at the top), with the macro average marked."""
    from sklearn.metrics import f1_score

    n = len(classes)
    f1 = f1_score(np.asarray(y_true), np.asarray(y_pred), labels=np.arange(n), average=None,
                  zero_division=0)
    order = np.argsort(f1)[::-1]
    fig = _figure(6.5, min(30.0, max(2.5, 0.3 * n + 1.2)))
    ax = fig.add_subplot()
    ax.barh(range(n), f1[order], color="tab:blue")
    ax.set_yticks(range(n), [classes[i] for i in order], fontsize=7 if n > 20 else 9)
    present = np.isin(np.arange(n), np.concatenate([np.asarray(y_true), np.asarray(y_pred)]))
    macro = float(f1[present].mean()) if present.any() else 0.0
    ax.axvline(macro, color="black", linestyle="--", linewidth=1, label=f"macro F1 {macro:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.set_title("per-class F1")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)
