"""What to do next: the fine-tuning recommendation at the end of the report.

The classic transfer-learning guidance, applied to what the cache and the bench measured:

* dataset size: labelled training images per class (the median over classes): small below
  ``SMALL_PER_CLASS``, large from ``LARGE_PER_CLASS``, medium between;
* domain similarity: how much the pretrained features carry. With a random-init backbone in the
  bench, the gap between the best pretrained and the best random-init single backbone (similar
  when the pretrained one wins by at least ``SIMILAR_GAP``); without one, the best
  single-backbone linear-probe accuracy (similar from ``SIMILAR_PROBE``), the best-vs-worst
  backbone gap being reported beside it;
* small + similar → train the head only; small + different → unfreeze the top stages (top-2);
  medium → top-2 (similar) or top-4 (different); large → unfreeze everything; backbones always at a
  ~10x smaller learning rate than the head. Small data also gets light augmentation.

A measurement within two standard errors of a threshold is called borderline, and the text says
so: the rule is a starting point, not a verdict. CPU side: never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SMALL_PER_CLASS = 100
LARGE_PER_CLASS = 1000
SIMILAR_GAP = 0.10
SIMILAR_PROBE = 0.85


@dataclass
class Advice:
    size: str            # small | medium | large
    similarity: str      # similar | different
    borderline: bool
    freeze: str
    epochs: int
    augment: str
    per_class: float
    evidence: str
    command: str
    caveats: list


def size_class(per_class: float) -> str:
    """small / medium / large by labelled training images per class."""
    return "small" if per_class < SMALL_PER_CLASS else "large" if per_class >= LARGE_PER_CLASS else "medium"


def choose_freeze(size: str, similar: bool) -> str:
    """The freeze policy of the classic guidance for a data size and domain similarity."""
    if size == "large":
        return "none"
    if size == "medium":
        return "top-2" if similar else "top-4"
    return "head-only" if similar else "top-2"


def _single_best(rows: list[dict], keys: list[str]) -> dict | None:
    cand = [r for r in rows if int(r["size"]) == 1 and r["backbones"] in keys]
    return max(cand, key=lambda r: r["cv_accuracy_mean"]) if cand else None


def _se(r: dict | None) -> float:
    v = (r or {}).get("cv_accuracy_se")
    return float(v) if v is not None else 0.0


def advise(cache, rows: list[dict], ctx: dict | None = None) -> Advice:
    """The recommendation for this cache and bench (see the module docstring for the rule)."""
    ctx = ctx or {}
    train = cache.labels[cache.rows("train")]
    counts = [int(np.sum(train == i)) for i in range(len(cache.classes))]
    counts = [c for c in counts if c] or [0]
    per_class = float(np.median(counts))
    size = size_class(per_class)

    weights = {b["key"]: str(b.get("weights")) for b in cache.summary()["backbones"]}
    pretrained = [k for k, w in weights.items() if w != "none"]
    random_init = [k for k, w in weights.items() if w == "none"]
    bp, br = _single_best(rows, pretrained), _single_best(rows, random_init)
    caveats = []
    if bp is not None and br is not None:
        gap = bp["cv_accuracy_mean"] - br["cv_accuracy_mean"]
        noise = 2 * np.hypot(_se(bp), _se(br))
        similar = gap >= SIMILAR_GAP
        borderline = abs(gap - SIMILAR_GAP) < noise
        evidence = (f"the best pretrained backbone ({bp['backbones']}, CV accuracy {bp['cv_accuracy_mean']:.3f}) "
                    f"beats the best random-init one ({br['backbones']}, {br['cv_accuracy_mean']:.3f}) by "
                    f"{gap:+.3f} (±{noise:.3f}, 2 SE); similar domain when the gap is >= {SIMILAR_GAP}")
    else:
        singles = [r for r in rows if int(r["size"]) == 1]
        best = max(singles or rows, key=lambda r: r["cv_accuracy_mean"])
        worst = min(singles or rows, key=lambda r: r["cv_accuracy_mean"])
        probe = best["cv_accuracy_mean"]
        similar = probe >= SIMILAR_PROBE
        borderline = abs(probe - SIMILAR_PROBE) < 2 * _se(best)
        evidence = (f"the best single-backbone linear probe ({best['backbones']} / {best['head']}) reaches CV "
                    f"accuracy {probe:.3f} (similar domain from {SIMILAR_PROBE}); best vs worst backbone gap "
                    f"{probe - worst['cv_accuracy_mean']:+.3f}")
        if not pretrained:
            caveats.append("every backbone here is random-init: the guidance assumes pretrained weights; "
                           "extract with pretrained weights before acting on it")
        elif not random_init:
            caveats.append("no random-init backbone was benched, so domain similarity is judged from the "
                           "probe accuracy alone (add one with --weights none for a sharper estimate)")
    similarity = "similar" if similar else "different"
    freeze = choose_freeze(size, similar)
    augment = "light" if size == "small" else "none"
    epochs = 10 if size != "large" else 5
    n_val = len(cache.rows("val"))
    if n_val < 50:
        caveats.append(f"the data has {n_val} val images: give it a val split of 50+ images, or keep the last epoch "
                       "(--select last), since picking epochs on a tiny val set is noise")
    if borderline:
        caveats.append("the domain-similarity measurement is within noise of its threshold: the other "
                       "choice is as defensible; try both if fine-tuning is cheap")
    net = ctx.get("network") or "NETWORK"
    source_net = _source_network(net)
    data = ctx.get("data") or "SRC"
    command = (f"featstack finetune {source_net} --data {data} --freeze {freeze} --epochs {epochs} --lr 1e-3 "
               f"--backbone-lr-scale 0.1" + (f" --augment {augment}" if augment != "none" else "")
               + f" --out {source_net}-ft")
    if net == "NETWORK":
        command = f"featstack export MODEL --out NETWORK && {command}"
    return Advice(size, similarity, borderline, freeze, epochs, augment, per_class, evidence, command, caveats)


def _source_network(net: str) -> str:
    """The exported network a fine-tuned one started from (fine-tuning starts from the export)."""
    import json
    from pathlib import Path

    try:
        ft = json.loads((Path(net) / "network.json").read_text()).get("finetune") or {}
    except (OSError, ValueError):
        return net
    return ft.get("source_network") or net


def recommendation_section(cache, rows: list[dict], ctx: dict | None = None):
    """The report's last section: the advice, its evidence and the exact command."""
    from .report import Pre, Section

    a = advise(cache, rows, ctx)
    what = {"head-only": "train the head only (backbones frozen)",
            "top-2": "unfreeze the top 2 stages of each backbone",
            "top-4": "unfreeze the top 4 stages of each backbone",
            "none": "unfreeze every layer"}[a.freeze]
    text = (f"Recommendation: {what}, backbones at a 10x smaller learning rate than the head. Why: "
            f"{a.per_class:.0f} labelled training images per class (median) is {a.size} data "
            f"(small < {SMALL_PER_CLASS}, large >= {LARGE_PER_CLASS}), and the domain looks {a.similarity} to "
            f"the backbones' pretraining: {a.evidence}.")
    blocks: list = [text, Pre(a.command)]
    blocks += [f"Caveat: {c}." for c in a.caveats]
    blocks.append("This follows the classic transfer-learning guidance (small data + similar domain: head only; "
                  "small data + different domain: unfreeze the top stages; large data: unfreeze more or all), "
                  "applied to these measurements; it is a starting point to check on the val split, not a "
                  "guarantee.")
    return Section("What to do next", blocks)
