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
#: what people call the bench columns (plots and the report use these, never the internal names)
LABELS = {"cv_accuracy_mean": "CV accuracy", "cv_accuracy_std": "CV accuracy spread (std)",
          "cv_accuracy_se": "CV accuracy standard error",
          "cv_f1_macro_mean": "CV macro-F1", "cv_f1_macro_std": "CV macro-F1 spread (std)",
          "cv_f1_macro_se": "CV macro-F1 standard error", "tied_with_best": "tied with the best",
          "test_accuracy": "test accuracy", "test_f1_macro": "test macro-F1", "fit_seconds": "fit time (s)"}


def metric_label(metric: str) -> str:
    return LABELS.get(metric, metric.replace("_", " "))


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
    ax.set_title(f"{metric_label(metric)} (best fusion per cell)")
    fig.colorbar(im, ax=ax, label=metric_label(metric))
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
        ax.plot(sizes, ys, marker="o", linewidth=1.4, zorder=3, label=h)
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
    # the best line goes UNDER the head lines, wide and pale, so the winning head's line stays visible on it
    ax.plot(sizes, best_y, marker="s", markersize=11, color="0.75", linewidth=7, alpha=0.6, zorder=1,
            label="best")
    for x, y, t in zip(sizes, best_y, best_txt):
        if np.isfinite(y):
            ax.annotate(t, (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=6)
    ax.margins(x=0.2, y=0.25)
    ax.set_xticks(sizes)
    ax.set_xlabel("number of backbones combined")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"best {metric_label(metric)} per combination size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, path)


def confusion(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str],
              path: str | os.PathLike, title: str = "") -> Path:
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
    ax.set_title(f"{title or 'confusion matrix'} (accuracy {acc:.3f}, {int(cm.sum())} samples)", fontsize=9)
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


def _config_name(r: dict) -> str:
    return f"{r['backbones']} / {r['head']} / {r['fusion']}"


def ranking_errorbars(rows: Sequence[dict], path: str | os.PathLike, top: int = 15) -> Path:
    """CV accuracy of the ``top`` ranked configurations: the mean with two error bars, the
    standard error of the mean (dark, what "how sure are we of the mean" needs) and the spread
    over folds (light, how much one fold varies); configurations tied with the best
    (``tied_with_best``) in orange."""
    rows = list(rows)[:top]
    n = len(rows)
    fig = _figure(9.5, max(2.2, 0.32 * n + 1.0))
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]
    mean = np.array([_value(r, "cv_accuracy_mean") for r in rows])
    std = np.array([_value(r, "cv_accuracy_std") for r in rows])
    se = np.array([_value(r, "cv_accuracy_se") if r.get("cv_accuracy_se") is not None else np.nan for r in rows])
    colors = ["tab:orange" if r.get("tied_with_best") else "tab:blue" for r in rows]
    ax.errorbar(mean, y, xerr=std, fmt="none", ecolor="0.8", elinewidth=6, capsize=0, zorder=1)
    if np.isfinite(se).any():
        ax.errorbar(mean, y, xerr=np.nan_to_num(se), fmt="none", ecolor="0.25", elinewidth=1.5, capsize=3, zorder=2)
    ax.scatter(mean, y, c=colors, zorder=3, s=28)
    ax.set_yticks(y, [_config_name(r) for r in rows], fontsize=7)
    ax.set_xlabel("CV accuracy (dark bar: ± standard error of the mean; light bar: ± spread over folds)")
    ax.set_title("top configurations" + (" (orange: tied with the best within noise)"
                                         if any(r.get("tied_with_best") for r in rows) else ""), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def accuracy_vs_cost(rows: Sequence[dict], speeds: dict, path: str | os.PathLike) -> Path:
    """Left: CV accuracy against head fit time per configuration (log scale), colour = fusion.
    Right: each backbone's best single-backbone CV accuracy against its extraction speed."""
    rows = [r for r in rows if np.isfinite(_value(r, "cv_accuracy_mean"))]
    fig = _figure(9.5, 3.8)
    ax, bx = fig.subplots(1, 2)
    fusions = list(dict.fromkeys(r["fusion"] for r in rows))
    cmap = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, fu in enumerate(fusions):
        sel = [r for r in rows if r["fusion"] == fu]
        ax.scatter([max(1e-4, _value(r, "fit_seconds")) for r in sel], [_value(r, "cv_accuracy_mean") for r in sel],
                   s=18, alpha=0.8, color=cmap[i % len(cmap)], label=fu)
    ax.set_xscale("log")
    ax.set_xlabel("head fit time per fold (s, log scale)")
    ax.set_ylabel("CV accuracy")
    ax.set_title("accuracy vs fit cost", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="fusion", title_fontsize=7)
    pts = []
    for key, ips in speeds.items():
        single = [_value(r, "cv_accuracy_mean") for r in rows if r["backbones"] == key and int(r["size"]) == 1]
        if ips and single:
            pts.append((key, float(ips), max(single)))
    for key, ips, acc in pts:
        bx.scatter([ips], [acc], s=30, color="tab:blue")
        bx.annotate(key, (ips, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if pts:
        bx.set_xscale("log")
        bx.margins(x=0.3, y=0.2)
    else:
        bx.text(0.5, 0.5, "no extraction speed recorded", ha="center", va="center", transform=bx.transAxes)
    bx.set_xlabel("extraction speed (images/s, log scale)")
    bx.set_ylabel("best single-backbone CV accuracy")
    bx.set_title("accuracy vs extraction cost per backbone", fontsize=9)
    bx.grid(alpha=0.3)
    return _save(fig, path)


def fusion_gain(gains: Sequence[dict], path: str | os.PathLike) -> Path:
    """Bars: CV accuracy of each fusion's best combination minus the best single backbone, per
    head (above zero: combining backbones paid)."""
    heads = list(dict.fromkeys(g["head"] for g in gains))
    fusions = list(dict.fromkeys(g["fusion"] for g in gains))
    fig = _figure(9.5, 3.2)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(fusions))
    for j, fu in enumerate(fusions):
        xs, ys = [], []
        for i, h in enumerate(heads):
            g = next((g for g in gains if g["head"] == h and g["fusion"] == fu), None)
            if g is not None:
                xs.append(i + (j - (len(fusions) - 1) / 2) * width)
                ys.append(g["gain"])
        ax.bar(xs, ys, width=width * 0.95, label=fu)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(heads)), heads, fontsize=8)
    ax.set_ylabel("CV accuracy gain")
    ax.set_title("gain of each fusion over the best single backbone (same head)", fontsize=9)
    ax.legend(fontsize=7, title="fusion", title_fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def embedding_maps(maps: Sequence[tuple], classes: Sequence[str], path: str | os.PathLike) -> Path:
    """One 2-D PCA scatter per backbone, points coloured by class: are the classes already
    separated in this backbone's embedding? ``maps``: (title, (n, 2) coordinates, class index)."""
    k = len(maps)
    cols = min(3, k)
    rows_n = int(np.ceil(k / cols))
    fig = _figure(9.5, 3.1 * rows_n + 0.4)
    axes = np.atleast_1d(fig.subplots(rows_n, cols)).ravel()
    cmap = _class_colors(len(classes))
    for ax, (title, xy, y) in zip(axes, maps):
        for c in range(len(classes)):
            sel = y == c
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=cmap[c], label=classes[c])
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[k:]:
        ax.set_visible(False)
    if len(classes) <= 20:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(10, len(classes)),
                   fontsize=7, markerscale=2)
    return _save(fig, path)


def _class_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i if n <= 20 else i / max(1, n - 1)) for i in range(n)]


def finetune_curves(epochs: Sequence[dict], selected: int | None, path: str | os.PathLike) -> Path:
    """Train loss and val accuracy per epoch (epoch 0 = the exported network), the kept epoch marked."""
    fig = _figure(9.5, 3.0)
    ax, bx = fig.subplots(1, 2)
    e = [h["epoch"] for h in epochs if h.get("train_loss") is not None]
    ax.plot(e, [h["train_loss"] for h in epochs if h.get("train_loss") is not None], marker="o", label="train")
    ax.plot([h["epoch"] for h in epochs], [h.get("val_loss") for h in epochs], marker="o", label="val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    bx.plot([h["epoch"] for h in epochs], [h["val_accuracy"] for h in epochs], marker="o", label="val accuracy")
    tr = [(h["epoch"], h["train_accuracy"]) for h in epochs if h.get("train_accuracy") is not None]
    if tr:
        bx.plot(*zip(*tr), marker=".", alpha=0.7, label="train accuracy (training pass)")
    if selected is not None:
        bx.axvline(selected, color="tab:red", linestyle="--", linewidth=1, label=f"kept: epoch {selected}")
    bx.set_xlabel("epoch (0 = exported network)")
    bx.set_ylabel("accuracy")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.suptitle("fine-tuning", fontsize=9)
    return _save(fig, path)


def confusion_from_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike,
                          title: str = "") -> Path:
    """The confusion-matrix figure from a precomputed matrix (e.g. a network's, from history.json)."""
    cm = np.asarray(cm, dtype=int)
    y_true = np.repeat(np.arange(len(classes)), cm.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(len(classes)), row) for row in cm]) if cm.size else []
    return confusion(y_true, y_pred, classes, path, title=title)
