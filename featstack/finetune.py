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
import re
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import BN_MODES, PRECISIONS, default_finetune_workers
from .errors import BackboneError, ConfigError, DataError
from .export import (NETWORK_JSON, FeatstackNet, LinearHead, _spec_from_info, decode_squares, load_network,
                     read_network_config, save_network)

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


def _imagenet_index(subset: str) -> dict:
    """Normalised synset ids, descriptions and each comma-separated synonym → class index
    (the first class wins a shared synonym)."""
    import timm.data

    info = timm.data.ImageNetInfo(subset)
    index: dict = {}
    for i in range(info.num_classes()):
        desc = info.index_to_description(i)
        for name in [info.index_to_label_name(i), desc, *desc.split(",")]:
            index.setdefault(_norm_name(name), i)
    return index


def _full_model(spec):
    import timm

    kwargs = dict(spec.model_kwargs)
    if spec.input_size:
        try:
            return timm.create_model(spec.timm_name, pretrained=False, img_size=spec.input_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(spec.timm_name, pretrained=False, **kwargs)


def source_classifier(info: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(weight (K, D), bias (K,), label set) of the pretrained classifier that comes with a
    backbone's weights: the hub checkpoint or the weights file the cache names. A random-init
    backbone has none (BackboneError)."""
    import timm.data
    from .backbones import state_dict_sha256

    key = info.get("key")
    spec = _spec_from_info(info)
    if spec.weights == "none":
        raise BackboneError(f"backbone {key!r} was random-initialised (--weights none): it has no "
                            "pretrained classifier to initialise the head from")
    with torch.random.fork_rng(devices=[]):
        full = _full_model(spec)
    cls_name = full.pretrained_cfg.get("classifier")
    cls_name = cls_name[0] if isinstance(cls_name, (list, tuple)) else cls_name
    if spec.weights == "file":
        from timm.models import load_state_dict

        state = load_state_dict(spec.weights_file, use_ema=True, weights_only=True)
        w, b = state.get(f"{cls_name}.weight"), state.get(f"{cls_name}.bias")
        if w is None:
            raise BackboneError(f"backbone {key!r}: weights file {spec.weights_file} holds no classifier "
                                f"({cls_name}.weight); it cannot initialise the head")
        if b is None:
            b = torch.zeros(w.shape[0])
    else:  # hub: the full pretrained model, checked to be the backbone the cache used
        import huggingface_hub.constants as hf_constants
        from .backbones import _hub_reachable

        old = hf_constants.HF_HUB_OFFLINE
        if not _hub_reachable():
            hf_constants.HF_HUB_OFFLINE = True
        try:
            import timm
            full = timm.create_model(spec.timm_name, pretrained=True, **dict(spec.model_kwargs),
                                     **({"img_size": spec.input_size} if spec.input_size else {}))
        except Exception as e:  # noqa: BLE001
            raise BackboneError(f"backbone {key!r}: cannot load its pretrained classifier from the hub "
                                f"({type(e).__name__}: {str(e)[:200]})") from e
        finally:
            hf_constants.HF_HUB_OFFLINE = old
        clf = full.get_classifier()
        if not isinstance(clf, nn.Linear):
            raise BackboneError(f"backbone {key!r}: its classifier is a {type(clf).__name__}, not a linear layer")
        w, b = clf.weight.detach().clone(), (clf.bias.detach().clone() if clf.bias is not None
                                             else torch.zeros(clf.out_features))
        full.reset_classifier(0)
        want = info.get("source_weights_sha256") or info.get("weights_sha256")
        if state_dict_sha256(full) != want:
            raise BackboneError(f"backbone {key!r}: the hub checkpoint's backbone differs from the one the "
                                "cache was extracted with; its classifier does not belong to these features")
    subset = timm.data.infer_imagenet_subset(full) if w.shape[0] == full.num_classes else None
    if subset is None:
        subset = {1000: "imagenet-1k", 11821: "imagenet-12k", 21841: "imagenet-22k"}.get(int(w.shape[0]))
    if subset is None:
        raise BackboneError(f"backbone {key!r}: its classifier has {w.shape[0]} classes, not a known "
                            "ImageNet label set; cannot match class names")
    return w.float(), b.float(), subset


def init_from_source_classifier(net: FeatstackNet) -> dict:
    """Overwrite the rows of a single-backbone linear head (logreg / linear-svm) for classes
    whose names match the backbone's ImageNet label set (synset id, description or one of its
    comma-separated names; case, spaces, '_' and '-' ignored) with the pretrained classifier's
    rows. The head's linear map acts on the raw backbone features (the scaler is folded in), the
    same vectors the pretrained classifier reads. Returns the matches."""
    if len(net.backbones) != 1:
        raise ConfigError(f"--init-from-source-classifier needs a single-backbone network; this one has "
                          f"{len(net.backbones)} ({', '.join(net.keys)})")
    head = net.head
    if not isinstance(head, LinearHead) or head.kind not in ("logreg", "linear-svm") or len(head.pre):
        kind = getattr(head, "kind", head.type_name)
        raise ConfigError(f"--init-from-source-classifier needs a logreg or linear-svm head; this network's "
                          f"head is {kind!r}")
    w, b, subset = source_classifier(net.backbone_info[0])
    if w.shape[1] != head.n_features:
        raise BackboneError(f"the pretrained classifier reads {w.shape[1]} features, the head {head.n_features}")
    index = _imagenet_index(subset)
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
            head.weight[0] = (w[k1] - w[k0]).to(head.weight.dtype)
            head.bias[0] = (b[k1] - b[k0]).to(head.bias.dtype)
        else:
            for c, k in matched.items():
                row = net.classes.index(c)
                head.weight[row] = w[k].to(head.weight.dtype)
                head.bias[row] = b[k].to(head.bias.dtype)
    import timm.data
    info = timm.data.ImageNetInfo(subset)
    return {"label_set": subset,
            "matched": {c: {"index": k, "description": info.index_to_description(k)} for c, k in matched.items()},
            "unmatched": [c for c in net.classes if c not in matched]}


# ============================================================================================
# Data
# ============================================================================================

class _Squares(Dataset):
    """(uint8 square, class index) per row, decoded exactly as extraction decodes it; a row that
    fails to decode yields None (dropped by the collate function, counted)."""

    def __init__(self, source, rows: np.ndarray, targets: np.ndarray, side: int):
        self.source, self.rows, self.targets, self.side = source, rows, targets, side

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        try:
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
    train = np.flatnonzero(labelled & (s.splits == "train"))
    val = np.flatnonzero(labelled & (s.splits == "val"))
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
    #: the network after the last epoch (the best one is in ``out``)
    net: FeatstackNet | None = None


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a GPU; use fp32 or bf16")
    return precision


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
    tmp = folder / f".{NETWORK_JSON}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(cfg, indent=1, default=str) + "\n")
    os.replace(tmp, jfile)


def finetune(network, data, *, out, epochs: int = 5, freeze: str = "top-2", lr: float = 1e-3,
             backbone_lr_scale: float = 0.1, weight_decay: float = 0.0, batch_size: int = 32,
             device: str = "auto", precision: str = "auto", init_from_source: bool = False,
             val_fraction: float = 0.1, seed: int = 0, workers: int | None = None, bn: str = "frozen",
             warmup: float = 0.0,
             progress: bool = True, train_rows: Sequence[int] | None = None) -> FinetuneResult:
    """Fine-tune a network folder (or FeatstackNet) on a data source; the best epoch by
    validation accuracy is saved to ``out`` as a network folder (see the module docstring).

    ``data``: anything :func:`featstack.data.open_source` takes (folder, manifest, "demo") or a
    Source. ``train_rows`` optionally restricts the training rows (for quick runs).
    """
    from tqdm.auto import tqdm

    from .data import open_source
    from .extract import resolve_device

    t0 = time.perf_counter()
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"--epochs must be an integer >= 1, got {epochs!r}")
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    parse_freeze(freeze)
    if bn not in BN_MODES:
        raise ConfigError(f"--bn {bn!r}: choose one of {', '.join(BN_MODES)}")
    src_path = None
    if isinstance(network, FeatstackNet):
        net = network
    else:
        src_path, _ = read_network_config(network)
        net = load_network(src_path)
    out = Path(out)
    if src_path is not None and out.resolve() == src_path.resolve():
        raise ConfigError(f"--out {out} is the input network; write the fine-tuned one elsewhere")
    dev = resolve_device(device)
    prec = _resolve_precision(precision, dev)
    source = open_source(data) if isinstance(data, (str, os.PathLike)) else data

    train, val, targets, val_from = split_rows(source, net.classes, val_fraction, seed)
    if train_rows is not None:
        keep = set(int(r) for r in train_rows)
        train = np.asarray([r for r in train if r in keep], dtype=np.int64)
        if not len(train):
            raise DataError("train_rows selects no labelled train row")

    torch.manual_seed(seed)
    init = init_from_source_classifier(net) if init_from_source else None
    net.to(dev)
    freeze_summary = apply_freeze(net, freeze)
    optimizer = make_optimizer(net, lr, backbone_lr_scale, weight_decay)
    workers = default_finetune_workers() if workers is None else int(workers)
    gen = torch.Generator().manual_seed(seed)
    kw = dict(batch_size=batch_size, num_workers=workers, collate_fn=_collate,
              pin_memory=dev.type == "cuda", persistent_workers=workers > 0)
    train_loader = DataLoader(_Squares(source, train, targets[train], net.input_side), shuffle=True,
                              generator=gen, drop_last=False, **kw)
    val_loader = DataLoader(_Squares(source, val, targets[val], net.input_side), shuffle=False, **kw)
    steps = epochs * len(train_loader)
    scheduler = cosine_schedule(optimizer, steps, warmup)
    scaler = torch.amp.GradScaler("cuda") if prec == "fp16" else None

    settings = {"source_network": str(src_path) if src_path else None, "data": str(getattr(source, "description", data)),
                "epochs": epochs, "freeze": freeze, "lr": lr, "backbone_lr_scale": backbone_lr_scale,
                "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed, "bn": bn,
                "warmup": warmup,
                "device": str(dev), "precision": prec, "val": val_from,
                "train_rows": int(len(train)), "val_rows": int(len(val)), "freeze_summary": freeze_summary,
                "init_from_source_classifier": init}
    history: list = []

    def say(msg: str) -> None:
        if progress:
            print(f"featstack finetune: {msg}", file=sys.stderr, flush=True)

    say(f"device {dev}, precision {prec}, {len(train)} train / {len(val)} val rows ({val_from}), "
        f"freeze {freeze}, lr {lr:g} (backbones {lr * backbone_lr_scale:g})")
    if val_from != "val split":
        say("note: the val rows are held out of this run's training, but the exported head was fitted on "
            "the cache's whole train split, so epoch 0's val accuracy is optimistic; give the data a val "
            "split for an honest comparison")
    base = evaluate(net, val_loader, device=dev, precision=prec)
    history.append({"epoch": 0, "train_loss": None, "train_accuracy": None, "val_loss": base["loss"],
                    "val_accuracy": base["accuracy"], "lr": None, "seconds": 0.0})
    best_epoch, best_acc = 0, base["accuracy"]
    save_network(net, out, extra={"finetune": dict(settings, history=history, best_epoch=0,
                                                   best_val_accuracy=best_acc)})
    say(f"epoch 0 (exported head): val accuracy {best_acc:.4f}, val loss {base['loss']:.4f}")
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
        improved = ev["accuracy"] > best_acc
        if improved:
            best_epoch, best_acc = epoch, ev["accuracy"]
            save_network(net, out, extra={"finetune": dict(settings, history=history, best_epoch=epoch,
                                                           best_val_accuracy=best_acc)})
        say(f"epoch {epoch}: train loss {tr['loss']:.4f} acc {tr['accuracy']:.4f} | val loss "
            f"{ev['loss']:.4f} acc {ev['accuracy']:.4f}{'  (best, saved)' if improved else ''}")
    _update_json(out, finetune=dict(settings, history=history, best_epoch=best_epoch,
                                    best_val_accuracy=best_acc))
    return FinetuneResult(out=out, history=history, best_epoch=best_epoch, best_val_accuracy=best_acc,
                          freeze=freeze_summary, init=init, seconds=time.perf_counter() - t0, net=net)
