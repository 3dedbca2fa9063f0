"""Fine-tune an exported network: the linear-probe-then-fine-tune recipe.

The head starts where scikit-learn left it (``featstack export``), so fine-tuning begins from a
good classifier instead of a random one, which is what keeps the pretrained features from being
distorted early on. Then:

* freeze policy: ``head-only`` (backbones frozen), ``top-N`` (the top N parameter groups of each
  backbone trainable: timm's coarse grouping, i.e. stages of a CNN, blocks of a ViT, the final
  norm going with the last block), ``none`` (everything trains);
* frozen modules stay in eval mode during training, so their BatchNorm statistics (and dropout)
  stay what extraction used; by default (``bn="frozen"``) every BatchNorm layer keeps its
  running statistics, trainable ones included (their affine parameters still train), so the
  features keep the statistics the head was fitted on (``bn="train"`` lets trainable groups
  update theirs; with small batches, or backbones whose statistics were never estimated,
  batch statistics shift the features away from the head);
* AdamW with two learning rates: the head's, and ``lr * backbone_lr_scale`` (default 10x lower)
  for the backbones; cosine schedule over all steps (optionally after a linear warm-up);
* cross-entropy on the head's logits (decision values for SVM heads);
* AMP (bf16, or fp16 with a gradient scaler) on a GPU;
* evaluation each epoch on the ``val`` split, or a seeded held-out part of ``train``, with the
  head's own prediction rule; the best epoch (the exported network itself counts as epoch 0) is
  saved as a network folder (safetensors + JSON, the format ``load_network`` reads).

Optional: ``init_from_source_classifier`` copies rows of the backbone's own pretrained ImageNet
classifier into a linear head for the classes whose names match ImageNet's.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import AUGMENTS, BN_MODES, PRECISIONS, SELECT_MODES, default_finetune_workers  # noqa: F401 - PRECISIONS re-exported
from .errors import BackboneError, ConfigError, DataError
from .export import (NETWORK_JSON, NETWORK_TENSORS, FeatstackNet, LinearHead, _spec_from_info, decode_squares,
                     head_C, load_network, read_network_config, save_network)

_FREEZE_RE = re.compile(r"^(head-only|none|top-(\d+))$")


# ============================================================================================
# Freezing and parameter groups
# ============================================================================================

def parse_freeze(policy: str) -> int | None:
    """Number of top groups each backbone trains: ``head-only`` → 0, ``top-N`` → N, ``none`` →
    None (all of them)."""
    m = _FREEZE_RE.match(str(policy).strip())
    if not m:
        raise ConfigError(f"--freeze {policy!r}: use head-only, top-N (e.g. top-2) or none")
    if m.group(1) == "head-only":
        return 0
    if m.group(1) == "none":
        return None
    return int(m.group(2))


def backbone_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names of a backbone in groups, bottom (stem) to top, from timm's coarse
    grouping (``model.group_matcher(coarse=True)``); models without one are grouped by their
    top-level children."""
    names = [n for n, _ in model.named_parameters()]
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        try:
            grouped = group_parameters(model, model.group_matcher(coarse=True))
        except Exception:  # noqa: BLE001 - a matcher that does not fit: fall back below
            grouped = None
        if grouped:
            return [list(grouped[k]) for k in sorted(grouped)]
    groups: dict = {}
    for n in names:
        groups.setdefault(n.split(".", 1)[0], []).append(n)
    return list(groups.values())


def apply_freeze(net: FeatstackNet, policy: str) -> dict:
    """Set ``requires_grad`` per the freeze policy (the head always trains). Returns, per
    backbone key, how many groups it has, which train, and the parameter counts."""
    top = parse_freeze(policy)
    summary = {}
    for p in net.head.parameters():
        p.requires_grad_(True)
    for key, model in zip(net.keys, net.backbones):
        groups = backbone_groups(model)
        n = len(groups)
        k = n if top is None else min(top, n)
        trainable = set(name for g in groups[n - k:] for name in g) if k else set()
        counts = {"trainable": 0, "frozen": 0}
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
            counts["trainable" if name in trainable else "frozen"] += p.numel()
        summary[key] = {"groups": n, "trainable_groups": list(range(n - k, n)),
                        "trainable_params": counts["trainable"], "frozen_params": counts["frozen"]}
    return summary


def _eval_frozen(module: nn.Module) -> None:
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()  # BatchNorm statistics and dropout of frozen parts stay as extracted
        elif params:
            _eval_frozen(child)




def set_train_mode(net: FeatstackNet, bn: str = "frozen") -> None:
    """``net.train()``, except frozen modules, which stay in eval mode; with ``bn="frozen"``
    every BatchNorm layer also stays in eval mode (its affine parameters still train where its
    group does), so the features keep the statistics the head was fitted on."""
    if bn not in BN_MODES:
        raise ConfigError(f"--bn {bn!r}: choose one of {', '.join(BN_MODES)}")
    net.train()
    for model in net.backbones:
        params = list(model.parameters())
        if params and not any(p.requires_grad for p in params):
            model.eval()
        else:
            _eval_frozen(model)
        if bn == "frozen":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def make_optimizer(net: FeatstackNet, lr: float, backbone_lr_scale: float = 0.1,
                   weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with the head at ``lr`` and each backbone's trainable parameters at
    ``lr * backbone_lr_scale``; frozen parameters are left out. Groups carry a ``name``
    ("head", "backbone:KEY")."""
    if not lr > 0:
        raise ConfigError(f"--lr must be > 0, got {lr}")
    if not backbone_lr_scale > 0:
        raise ConfigError(f"--backbone-lr-scale must be > 0, got {backbone_lr_scale}")
    groups = [{"name": "head", "params": [p for p in net.head.parameters() if p.requires_grad],
               "lr": lr, "weight_decay": weight_decay}]
    for key, model in zip(net.keys, net.backbones):
        ps = [p for p in model.parameters() if p.requires_grad]
        if ps:
            groups.append({"name": f"backbone:{key}", "params": ps, "lr": lr * backbone_lr_scale,
                           "weight_decay": weight_decay})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


# ============================================================================================
# Head rows from the backbone's own classifier
# ============================================================================================

def _norm_name(s: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(s).strip().lower())


def _label_index(names: Sequence[Sequence[str]]) -> dict:
    """Normalised names → class index; each class has several names (the description and each
    comma-separated synonym, a synset id); the first class wins a shared name."""
    index: dict = {}
    for i, row in enumerate(names):
        for name in row:
            for part in [name, *str(name).split(",")]:
                if _norm_name(part):
                    index.setdefault(_norm_name(part), i)
    return index


def _imagenet_names(subset: str) -> list[list[str]]:
    import timm.data

    info = timm.data.ImageNetInfo(subset)
    return [[info.index_to_label_name(i), info.index_to_description(i)] for i in range(info.num_classes())]


def read_source_classes(path: str | os.PathLike) -> list[str]:
    """The source label list: one class name per line (row i of the classifier = line i; a line
    may list synonyms separated by commas). Trailing empty lines are ignored."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--source-classes {path}: cannot read ({e.strerror or e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    empty = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
    if not lines or empty:
        raise ConfigError(f"--source-classes {path}: " + (f"line {empty[0]} is empty; one class name a line"
                                                          if empty else "no class names"))
    return [ln.strip() for ln in lines]


def source_classifier(info: dict, known_label_set: bool = True) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """(weight (K, D), bias (K,), label set) of the pretrained classifier that comes with a
    backbone's weights: the hub checkpoint or the weights file the cache names, checked to hold
    the very backbone the cache was extracted with. A random-init backbone has none
    (BackboneError)."""
    from .backbones import build_backbone

    key = info.get("key")
    spec = _spec_from_info(info)
    if spec.weights == "none":
        raise BackboneError(f"backbone {key!r} was random-initialised (--weights none): it has no "
                            "pretrained classifier to initialise the head from")
    if spec.layer:
        raise BackboneError(f"backbone {key!r} gives layer {spec.layer} features; the pretrained "
                            "classifier reads the final embedding")
    try:
        lb = build_backbone(spec, classifier=True)
    except BackboneError as e:
        raise BackboneError(f"backbone {key!r}: cannot load its pretrained classifier ({e})") from e
    want = info.get("source_weights_sha256") or info.get("weights_sha256")
    if lb.weights_sha256 != want:
        raise BackboneError(f"backbone {key!r}: the weights' backbone differs from the one the cache was "
                            "extracted with; their classifier does not belong to these features")
    clf = lb.classifier or {}
    w = clf.get("weight")
    if w is None or w.ndim != 2:
        where = spec.weights_file if spec.weights == "file" else "the hub checkpoint"
        raise BackboneError(f"backbone {key!r}: {where} holds no linear classifier; it cannot initialise the head")
    b = clf.get("bias")
    if b is None:
        b = torch.zeros(w.shape[0])
    subset = {1000: "imagenet-1k", 11821: "imagenet-12k", 21841: "imagenet-22k"}.get(int(w.shape[0]))
    if subset is None and known_label_set:
        raise BackboneError(f"backbone {key!r}: its classifier has {w.shape[0]} classes, not a known "
                            "ImageNet label set; cannot match class names")
    return w.float(), b.float(), subset


def _rescale(rows: torch.Tensor, bias: torch.Tensor, like_w: torch.Tensor, like_b: torch.Tensor):
    """Source classifier rows brought to the scale of the head's own rows: norms scaled to the
    head's median row norm, biases then shifted to the head's mean bias (the order of the copied
    rows' logits among themselves is the source model's)."""
    scale = like_w.norm(dim=1).median() / rows.norm(dim=1).median().clamp_min(1e-12)
    w, b = rows * scale, bias * scale
    return w, b - b.mean() + like_b.mean(), float(scale)


def init_from_source_classifier(net: FeatstackNet, source_classes: str | os.PathLike | None = None) -> dict:
    """Overwrite the rows of a single-backbone linear head (logreg / linear-svm) for classes
    whose names match the backbone's source label set with the pretrained classifier's rows,
    rescaled to the head's scale (see :func:`_rescale`) so they mix with the rows scikit-learn
    fitted for the other classes. The label set is ImageNet's (synset id, description or one of
    its comma-separated names) or, with ``source_classes``, a file of class names, one a line, in
    the classifier's row order. Case, spaces, '_' and '-' are ignored. The head's linear map acts
    on the raw backbone features (the scaler is folded in), the same vectors the pretrained
    classifier reads. Returns the matches."""
    if len(net.backbones) != 1:
        raise ConfigError(f"--init-from-source-classifier needs a single-backbone network; this one has "
                          f"{len(net.backbones)} ({', '.join(net.keys)})")
    head = net.head
    if not isinstance(head, LinearHead) or head.kind not in ("logreg", "linear-svm") or len(head.pre):
        kind = getattr(head, "kind", head.type_name)
        raise ConfigError(f"--init-from-source-classifier needs a logreg or linear-svm head; this network's "
                          f"head is {kind!r}")
    w, b, subset = source_classifier(net.backbone_info[0], known_label_set=source_classes is None)
    if w.shape[1] != head.n_features:
        raise BackboneError(f"the pretrained classifier reads {w.shape[1]} features, the head {head.n_features}")
    if source_classes is not None:
        labels = read_source_classes(source_classes)
        if len(labels) != w.shape[0]:
            raise ConfigError(f"--source-classes {source_classes} names {len(labels)} classes, the pretrained "
                              f"classifier has {w.shape[0]} rows")
        names, subset = [[n] for n in labels], str(source_classes)
    else:
        names = _imagenet_names(subset)
    index = _label_index(names)
    matched = {c: index[_norm_name(c)] for c in net.classes if _norm_name(c) in index}
    if not matched:
        raise ConfigError(f"none of the classes ({', '.join(net.classes[:10])}) matches a class name of "
                          f"{subset}; nothing to initialise")
    with torch.no_grad():
        if head.binary:
            c0, c1 = net.classes
            if c0 not in matched or c1 not in matched:
                raise ConfigError(f"a binary head has one decision row: both classes must match {subset} "
                                  f"names (matched: {', '.join(matched) or 'none'})")
            k0, k1 = matched[c0], matched[c1]
            rw, rb, scale = _rescale((w[k1] - w[k0])[None], (b[k1] - b[k0])[None], head.weight.float(),
                                     head.bias.float())
            head.weight[0], head.bias[0] = rw[0].to(head.weight.dtype), rb[0].to(head.bias.dtype)
        else:
            rows = [net.classes.index(c) for c in matched]
            ks = list(matched.values())
            rw, rb, scale = _rescale(w[ks], b[ks], head.weight.float(), head.bias.float()[rows])
            for i, row in enumerate(rows):
                head.weight[row] = rw[i].to(head.weight.dtype)
                head.bias[row] = rb[i].to(head.bias.dtype)
    return {"label_set": subset, "scale": scale,
            "matched": {c: {"index": k, "description": names[k][-1]} for c, k in matched.items()},
            "unmatched": [c for c in net.classes if c not in matched]}


# ============================================================================================
# Data
# ============================================================================================

def check_augment(name: str) -> str:
    if name not in AUGMENTS:
        raise ConfigError(f"--augment {name!r}: choose one of {', '.join(AUGMENTS)}")
    return name


def make_augmenter(name: str, side: int):
    """timm's training transforms for ``name`` up to (not including) its ToTensor/Normalize, so
    the result is a PIL image of ``side`` x ``side`` pixels: what the network's forward takes
    (it normalises per backbone itself). None for ``none``."""
    cfg = AUGMENTS[check_augment(name)]
    if cfg is None:
        return None
    from timm.data.transforms_factory import transforms_imagenet_train
    from torchvision import transforms

    primary, secondary, _ = transforms_imagenet_train(side, interpolation="bicubic", separate=True, **cfg)
    return transforms.Compose([primary, secondary])


class _Squares(Dataset):
    """(uint8 square, class index) per row, decoded exactly as extraction decodes it (or, with an
    augmentation, the whole image through timm's training transforms to the same square size); a
    row that fails to decode yields None (dropped by the collate function, counted)."""

    def __init__(self, source, rows: np.ndarray, targets: np.ndarray, side: int, augment: str = "none"):
        self.source, self.rows, self.targets, self.side = source, rows, targets, side
        self.augment = make_augmenter(augment, side)

    def __len__(self) -> int:
        return len(self.rows)

    def _augmented(self, row: int) -> torch.Tensor:
        from PIL import Image

        img = self.augment(Image.fromarray(self.source.load(int(row))))
        return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy())

    def __getitem__(self, i: int):
        try:
            if self.augment is not None:
                sq = self._augmented(self.rows[i])
            else:
                sq = decode_squares(self.source, [self.rows[i]], self.side)[0]
        except Exception:  # noqa: BLE001 - a bad image is skipped, not fatal
            return None, int(self.targets[i])
        return sq, int(self.targets[i])


def _collate(items):
    good = [(x, y) for x, y in items if x is not None]
    bad = len(items) - len(good)
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.long), bad


def split_rows(source, classes: Sequence[str], val_fraction: float = 0.1, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(train rows, val rows, target index per row of the source, where val came from).

    Targets are indices into the network's ``classes``, matched by name; a labelled class the
    network does not know is a DataError. Val = the source's ``val`` split, else a seeded
    ``val_fraction`` of the labelled train rows.
    """
    s = source.samples
    names = list(s.classes)
    pos = {c: i for i, c in enumerate(classes)}
    labelled = s.labels >= 0
    used = sorted({names[int(l)] for l in s.labels[labelled]})
    unknown = [c for c in used if c not in pos]
    if unknown:
        raise DataError(f"{source}: class(es) {', '.join(map(repr, unknown[:5]))} are not among the "
                        f"network's classes ({', '.join(classes[:10])}{'...' if len(classes) > 10 else ''})")
    targets = np.full(len(s), -1, dtype=np.int64)
    targets[labelled] = [pos[names[int(l)]] for l in s.labels[labelled]]
    train, val = s.rows("train"), s.rows("val")
    where = "val split"
    if not len(val):
        if not 0 < val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {val_fraction}")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(train)
        n_val = max(1, int(round(len(train) * val_fraction)))
        if len(train) - n_val < 1:
            raise DataError(f"{source}: {len(train)} labelled train row(s) cannot be split into train and val")
        val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        where = f"seeded {val_fraction:.0%} of train (seed {seed})"
    if not len(train):
        raise DataError(f"{source}: no labelled train rows to fine-tune on")
    return train, val, targets, where


# ============================================================================================
# Training
# ============================================================================================

@dataclass
class FinetuneResult:
    out: Path
    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    freeze: dict = field(default_factory=dict)
    init: dict | None = None
    seconds: float = 0.0
    #: the network after the last epoch (the selected one is in ``out``)
    net: FeatstackNet | None = None
    selected_epoch: int = 0
    test_accuracy: float | None = None
    weight_decay: float = 0.0
    warnings: list = field(default_factory=list)


def _autocast(device: torch.device, precision: str):
    from .device import autocast_context
    return autocast_context(device, precision)


def cosine_schedule(optimizer, steps: int, warmup: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay to 0 over ``steps`` optimizer steps, after a linear warm-up over the first
    ``warmup`` fraction of them (0 = none). Every group keeps its own base learning rate."""
    if not 0 <= warmup < 1:
        raise ConfigError(f"--warmup must be in [0, 1), got {warmup}")
    steps = max(1, int(steps))
    warm = int(round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        t = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_steps(net: FeatstackNet, batches, optimizer, scheduler=None, *, device="cpu", precision="fp32",
                scaler=None, bar=None, bn: str = "frozen") -> dict:
    """One pass of training steps over ``batches`` of (uint8 images, class indices): frozen
    modules in eval mode, cross-entropy on the logits. Returns mean loss and accuracy (argmax of
    the logits) over the images seen."""
    device = torch.device(device)
    set_train_mode(net, bn)
    total, loss_sum, correct, skipped = 0, 0.0, 0, 0
    for batch in batches:
        x, y = batch[0], batch[1]
        if len(batch) > 2:
            skipped += batch[2]
        if x is None:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, precision):
            logits = net(x)
        loss = F.cross_entropy(logits.float() if logits.dtype == torch.float16 else logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = len(y)
        total += n
        loss_sum += float(loss.detach()) * n
        correct += int((logits.detach().argmax(1) == y).sum())
        if bar is not None:
            bar.update(n)
            bar.set_postfix(loss=f"{loss_sum / total:.4f}", acc=f"{correct / total:.3f}")
    return {"loss": loss_sum / total if total else float("nan"),
            "accuracy": correct / total if total else float("nan"), "images": total, "skipped": skipped}


@torch.no_grad()
def evaluate(net: FeatstackNet, batches, *, device="cpu", precision="fp32") -> dict:
    """Loss and accuracy in eval mode; accuracy uses the head's own prediction rule."""
    device = torch.device(device)
    net.eval()
    total, loss_sum, correct = 0, 0.0, 0
    for batch in batches:
        x, y = batch[0], batch[1]
        if x is None:
            continue
        x, y = x.to(device), y.to(device)
        with _autocast(device, precision):
            feats = net.features(x)
        logits = net.head(feats)
        loss_sum += float(F.cross_entropy(logits, y)) * len(y)
        correct += int((net.head.predict_index(feats) == y).sum())
        total += len(y)
    return {"loss": loss_sum / total if total else float("nan"),
            "accuracy": correct / total if total else float("nan"), "images": total}


def _update_json(folder: Path, **sections) -> None:
    jfile = folder / NETWORK_JSON
    cfg = json.loads(jfile.read_text())
    cfg.update(sections)
    _write_json(jfile, cfg)


HISTORY_JSON = "history.json"
HISTORY_FORMAT = "featstack-finetune-history"
#: below this many validation images one image moves val accuracy by more than 2 points, so the
#: per-epoch comparison that picks the kept network is mostly noise: finetune warns.
MIN_VAL_IMAGES = 50


def select_epoch(val_accuracies: Sequence[float], select: str = "best", min_improvement: float = 0.0) -> int:
    """Which epoch to keep (0 = the exported network, before any training step).

    ``last``: the final epoch. ``best``: the fine-tuned epoch with the highest validation
    accuracy, ties going to the LATER epoch (equal accuracy after more training on the train
    split is the better-fitted network, and a saturated val set, every epoch at 1.0, must not
    throw the training away); it replaces the export only when it reaches the export's accuracy
    plus ``min_improvement`` (0 by default: a tie already goes to the fine-tuned network).
    """
    if select not in SELECT_MODES:
        raise ConfigError(f"--select {select!r}: choose one of {', '.join(SELECT_MODES)}")
    if not min_improvement >= 0:
        raise ConfigError(f"--min-improvement must be >= 0, got {min_improvement}")
    accs = [float(a) for a in val_accuracies]
    if not accs:
        raise ConfigError("no epoch to select from")
    last = len(accs) - 1
    if select == "last" or last == 0:
        return last
    best_tuned = max(range(1, len(accs)), key=lambda e: (accs[e], e))
    return best_tuned if accs[best_tuned] >= accs[0] + min_improvement else 0


def head_regularization(net: FeatstackNet) -> float | None:
    """C of the scikit-learn head the network was exported from: the value export recorded
    (``meta.head_C``), else the saved model's, else the head registry's default; None when the
    head has no C (naive Bayes)."""
    meta = net.meta or {}
    if "head_C" in meta:
        return None if meta["head_C"] is None else float(meta["head_C"])
    model_path = meta.get("model_path")
    if model_path and Path(model_path).is_dir():
        try:
            from .models import load_model
            return head_C(load_model(model_path).estimator)
        except Exception:  # noqa: BLE001 - an unreadable model: fall back to the registry default
            pass
    head = meta.get("head")
    if not head:
        return None
    from .heads import create_head
    return create_head(head).get_params().get("clf__C")


def derived_weight_decay(net: FeatstackNet, n_train: int) -> tuple[float, str]:
    """AdamW weight decay equivalent to the head's own L2 penalty, and why.

    scikit-learn minimises ``C * sum(loss) + ||w||^2 / 2``; divided by ``C * n`` that is the mean
    loss fine-tuning minimises plus ``||w||^2 / (2 C n)``, whose gradient is ``w / (C n)``: the
    decoupled decay that matches it is ``1 / (C n)`` over the ``n`` training images. Heads without
    a weight penalty (naive Bayes) get 0.
    """
    c = head_regularization(net)
    if c is None or not c > 0:
        return 0.0, f"0: the {(net.meta or {}).get('head', 'exported')} head has no L2 penalty"
    wd = 1.0 / (c * max(1, int(n_train)))
    return wd, f"1 / (C x n) = 1 / ({c:g} x {int(n_train)}) from the head's regularisation"


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish_selected(out: Path, chosen: Path, section: dict) -> None:
    """Make ``out`` itself the chosen network (``out/best`` or ``out/last``): its tensors hard
    linked (copied where links are not possible), its JSON with ``section`` as ``finetune``.
    ``load_network(out)`` keeps loading the selected network, as before."""
    from .atomic import atomic_paths

    cfg = json.loads((chosen / NETWORK_JSON).read_text())
    cfg["finetune"] = section
    with atomic_paths(out / NETWORK_TENSORS, out / NETWORK_JSON) as (tmp_t, tmp_j):
        _link_or_copy(chosen / NETWORK_TENSORS, tmp_t)
        tmp_j.write_text(json.dumps(cfg, indent=1, default=str) + "\n")


def _write_json(path: Path, data: dict) -> None:
    from .atomic import atomic_paths

    with atomic_paths(path) as (tmp,):
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")


def score_on_test(net: FeatstackNet, source, rows: np.ndarray, targets: np.ndarray, batch_size: int,
                  device) -> dict:
    """Accuracy, macro-F1, per-class figures and confusion matrix of ``net`` on the test rows (the
    report draws the network's confusion matrix from these, without torch)."""
    from .inference import predict_source
    from .metrics import classification_metrics

    true, pred = [], []
    for batch in predict_source(net, source, rows, batch_size=batch_size, device=str(device), progress=False):
        true += [net.classes[int(t)] for t in targets[batch.rows]]
        pred += [net.classes[int(i)] for i in batch.pred]
    return classification_metrics(true, pred, net.classes)


def finetune(network, data, *, out, epochs: int = 5, freeze: str = "top-2", lr: float = 1e-3,
             backbone_lr_scale: float = 0.1, weight_decay: float | None = None, batch_size: int = 32,
             device: str = "auto", precision: str = "auto", init_from_source: bool = False,
             source_classes: str | os.PathLike | None = None,
             val_fraction: float = 0.1, seed: int = 0, workers: int | None = None, bn: str = "frozen",
             warmup: float = 0.0, select: str = "best", min_improvement: float = 0.0, augment: str = "none",
             progress: bool = True, train_rows: Sequence[int] | None = None) -> FinetuneResult:
    """Fine-tune a network folder (or FeatstackNet) on a data source and save, in ``out``:

    * ``out/best/`` and ``out/last/``: the best epoch (:func:`select_epoch`) and the last one,
      each a network folder;
    * ``out/network.*``: the selected one of the two (``select``), so ``out`` loads as before;
    * ``out/history.json``: per epoch the train loss, val accuracy and learning rates, the
      selection, and the test accuracy of the selected network when the data has a test split.

    ``data``: anything :func:`featstack.data.open_source` takes (folder, manifest, "demo") or a
    Source. ``weight_decay=None`` derives it from the head's regularisation
    (:func:`derived_weight_decay`). ``augment``: a name of :data:`AUGMENTS`. ``train_rows``
    optionally restricts the training rows (for quick runs).
    """
    from tqdm.auto import tqdm

    from .data import open_source
    from .device import resolve_device, resolve_precision

    t0 = time.perf_counter()
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"--epochs must be an integer >= 1, got {epochs!r}")
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    parse_freeze(freeze)
    select_epoch([0.0], select, min_improvement)
    check_augment(augment)
    if bn not in BN_MODES:
        raise ConfigError(f"--bn {bn!r}: choose one of {', '.join(BN_MODES)}")
    if weight_decay is not None and not weight_decay >= 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {weight_decay}")
    src_path = None
    if isinstance(network, FeatstackNet):
        net = network
    else:
        src_path, _ = read_network_config(network)
        net = load_network(src_path)
    out = Path(out)
    if src_path is not None and out.resolve() == src_path.resolve():
        raise ConfigError(f"--out {out} is the input network; write the fine-tuned one elsewhere")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / NETWORK_JSON).exists():
        raise ConfigError(f"--out {out}: folder is not empty and holds no {NETWORK_JSON}; pick a new folder")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    source = open_source(data) if isinstance(data, (str, os.PathLike)) else data

    train, val, targets, val_from = split_rows(source, net.classes, val_fraction, seed)
    if train_rows is not None:
        keep = set(int(r) for r in train_rows)
        train = np.asarray([r for r in train if r in keep], dtype=np.int64)
        if not len(train):
            raise DataError("train_rows selects no labelled train row")
    test = source.samples.rows("test")
    if weight_decay is None:
        weight_decay, wd_from = derived_weight_decay(net, len(train))
    else:
        wd_from = "--weight-decay"

    torch.manual_seed(seed)
    random.seed(seed)
    init = init_from_source_classifier(net, source_classes) if init_from_source or source_classes else None
    net.to(dev)
    freeze_summary = apply_freeze(net, freeze)
    optimizer = make_optimizer(net, lr, backbone_lr_scale, weight_decay)
    workers = default_finetune_workers() if workers is None else int(workers)
    gen = torch.Generator().manual_seed(seed)
    kw = dict(batch_size=batch_size, num_workers=workers, collate_fn=_collate,
              pin_memory=dev.type == "cuda", persistent_workers=workers > 0)
    train_loader = DataLoader(_Squares(source, train, targets[train], net.input_side, augment=augment),
                              shuffle=True, generator=gen, drop_last=False, **kw)
    val_loader = DataLoader(_Squares(source, val, targets[val], net.input_side), shuffle=False, **kw)
    steps = epochs * len(train_loader)
    scheduler = cosine_schedule(optimizer, steps, warmup)
    scaler = torch.amp.GradScaler("cuda") if prec == "fp16" else None

    settings = {"source_network": str(src_path) if src_path else None, "data": str(getattr(source, "description", data)),
                "epochs": epochs, "freeze": freeze, "lr": lr, "backbone_lr_scale": backbone_lr_scale,
                "weight_decay": weight_decay, "weight_decay_from": wd_from, "batch_size": batch_size,
                "seed": seed, "bn": bn, "warmup": warmup, "augment": augment, "select": select,
                "min_improvement": min_improvement,
                "device": str(dev), "precision": prec, "val": val_from,
                "train_rows": int(len(train)), "val_rows": int(len(val)), "test_rows": int(len(test)),
                "freeze_summary": freeze_summary, "init_from_source_classifier": init}
    history: list = []
    notes: list = []

    def say(msg: str) -> None:
        if progress:
            print(f"featstack finetune: {msg}", file=sys.stderr, flush=True)

    def warn(msg: str) -> None:
        notes.append(msg)
        print(f"featstack finetune: warning: {msg}", file=sys.stderr, flush=True)

    say(f"device {dev}, precision {prec}, {len(train)} train / {len(val)} val rows ({val_from}), "
        f"freeze {freeze}, lr {lr:g} (backbones {lr * backbone_lr_scale:g}), weight decay {weight_decay:.3g} "
        f"({wd_from}), augment {augment}")
    if len(val) < MIN_VAL_IMAGES:
        warn(f"val has {len(val)} images (< {MIN_VAL_IMAGES}): one image moves val accuracy by "
             f"{1 / len(val):.1%}, so choosing the epoch on it is mostly noise; give the data a larger val "
             "split, or keep the last epoch (--select last)")
    if val_from != "val split":
        say("note: the val rows are held out of this run's training, but the exported head was fitted on "
            "the cache's whole train split, so epoch 0's val accuracy is optimistic; give the data a val "
            "split for an honest comparison")
    base = evaluate(net, val_loader, device=dev, precision=prec)
    history.append({"epoch": 0, "train_loss": None, "train_accuracy": None, "val_loss": base["loss"],
                    "val_accuracy": base["accuracy"], "lr": None, "seconds": 0.0})

    def record(best: int) -> dict:
        return dict(settings, history=history, best_epoch=best,
                    best_val_accuracy=history[best]["val_accuracy"])

    best_dir, last_dir = out / "best", out / "last"
    save_network(net, best_dir, extra={"finetune": record(0)})
    best_epoch = 0
    say(f"epoch 0 (exported head): val accuracy {base['accuracy']:.4f}, val loss {base['loss']:.4f}")
    for epoch in range(1, epochs + 1):
        te = time.perf_counter()
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        bar = tqdm(total=len(train), unit="img", desc=f"finetune epoch {epoch}/{epochs}",
                   disable=not progress, dynamic_ncols=True, file=sys.stderr, leave=False)
        try:
            tr = train_steps(net, train_loader, optimizer, scheduler, device=dev, precision=prec,
                             scaler=scaler, bar=bar, bn=bn)
        finally:
            bar.close()
        ev = evaluate(net, val_loader, device=dev, precision=prec)
        history.append({"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                        "val_loss": ev["loss"], "val_accuracy": ev["accuracy"], "lr": lrs,
                        "skipped": tr["skipped"], "seconds": round(time.perf_counter() - te, 3)})
        improved = select_epoch([h["val_accuracy"] for h in history], "best", min_improvement) == epoch
        if improved:
            best_epoch = epoch
            save_network(net, best_dir, extra={"finetune": record(epoch)})
        say(f"epoch {epoch}: train loss {tr['loss']:.4f} acc {tr['accuracy']:.4f} | val loss "
            f"{ev['loss']:.4f} acc {ev['accuracy']:.4f}{'  (best, saved)' if improved else ''}")
    save_network(net, last_dir, extra={"finetune": record(best_epoch)})
    _update_json(best_dir, finetune=record(best_epoch))
    selected = select_epoch([h["val_accuracy"] for h in history], select, min_improvement)
    final = dict(record(best_epoch), selected=select, selected_epoch=selected, warnings=notes)
    publish_selected(out, best_dir if select == "best" else last_dir, final)

    test_acc, test_metrics = None, None
    if len(test):
        test_metrics = score_on_test(load_network(out, device=dev), source, test, targets, batch_size, dev)
        test_acc = test_metrics["accuracy"]
        say(f"selected epoch {selected}: test accuracy {test_acc:.4f} on {test_metrics['n']} images")
    _update_json(out, finetune=dict(final, test_accuracy=test_acc))
    _write_json(out / HISTORY_JSON, {
        "format": HISTORY_FORMAT, "format_version": 1, **settings,
        "epochs": history, "best_epoch": best_epoch, "last_epoch": epochs, "selected": select,
        "selected_epoch": selected, "selected_val_accuracy": history[selected]["val_accuracy"],
        "test_accuracy": test_acc, "test_metrics": test_metrics, "warnings": notes, "seconds": round(time.perf_counter() - t0, 3)})
    return FinetuneResult(out=out, history=history, best_epoch=best_epoch,
                          best_val_accuracy=history[best_epoch]["val_accuracy"], freeze=freeze_summary,
                          init=init, seconds=time.perf_counter() - t0, net=net, selected_epoch=selected,
                          test_accuracy=test_acc, weight_decay=weight_decay, warnings=notes)
