"""Run a network (exported or fine-tuned) on images: `featstack predict NETWORK --data SRC` and
`featstack evaluate NETWORK --data SRC`.

Images are decoded exactly as extraction decodes them (the same square, in DataLoader workers),
batched, and passed through the network in eval mode; an image that cannot be decoded does not
stop the run: it comes back with its error message instead of a prediction.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .export import FeatstackNet, decode_squares


@dataclass
class Predictions:
    """One batch: source rows, class probabilities (rows, classes) and predicted class indices
    of the decoded images; ``errors`` maps the rows that failed to their message."""

    rows: np.ndarray
    proba: np.ndarray
    pred: np.ndarray
    errors: dict


class _Decoded(Dataset):
    def __init__(self, source, rows: Sequence[int], side: int):
        self.source, self.rows, self.side = source, np.asarray(rows, dtype=np.int64), side

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            return row, decode_squares(self.source, [row], self.side)[0], None
        except Exception as e:  # noqa: BLE001 - a bad image is reported, not fatal
            return row, None, str(e) or type(e).__name__


def _collate(items):
    good = [(r, x) for r, x, _ in items if x is not None]
    errors = {r: e for r, x, e in items if x is None}
    rows = np.asarray([r for r, _ in good], dtype=np.int64)
    x = torch.stack([x for _, x in good]) if good else None
    return rows, x, errors


@torch.no_grad()
def predict_source(net: FeatstackNet, source, rows: Sequence[int] | None = None, *, batch_size: int = 32,
                   workers: int = 0, device: str = "auto", progress: bool = True) -> Iterator[Predictions]:
    """Predictions of ``net`` on ``rows`` (default all) of a data source, batch by batch, in row
    order. Probabilities are the head's (softmax of the decision values for SVM heads); the
    predicted class follows the scikit-learn head's own rule."""
    from tqdm.auto import tqdm

    from .extract import resolve_device

    dev = resolve_device(device)
    net = net.to(dev).eval()
    rows = np.arange(len(source)) if rows is None else np.asarray(rows, dtype=np.int64)
    loader = DataLoader(_Decoded(source, rows, net.input_side), batch_size=max(1, int(batch_size)),
                        num_workers=int(workers), collate_fn=_collate, shuffle=False,
                        pin_memory=dev.type == "cuda")
    with tqdm(total=len(rows), unit="img", desc="predict", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for batch_rows, x, errors in loader:
            if x is None:
                proba = np.zeros((0, len(net.classes)))
                pred = np.zeros(0, dtype=np.int64)
            else:
                feats = net.features(x.to(dev, non_blocking=True))
                proba = net.head.proba(feats).double().cpu().numpy()
                pred = net.head.predict_index(feats).cpu().numpy()
            bar.update(len(batch_rows) + len(errors))
            if errors:
                bar.set_postfix(errors=len(errors))
            yield Predictions(batch_rows, proba, pred, errors)


# The fields a network's cached features must share with a cache to be scored from it (the
# network decodes its own way, so decode and storage dtype do not count).
NETWORK_CACHE_FIELDS = ("weights_sha256", "data_config", "preprocess", "dim")


def check_cache_features(net: FeatstackNet, cache) -> None:
    """Refuse a cache whose features were not computed by this network's backbones (other
    weights, e.g. after fine-tuning, other preprocessing or width), naming the differing fields."""
    from .cache import fingerprint_differences
    from .errors import CacheMismatchError

    for info in net.backbone_info:
        key = info["key"]
        if key not in cache.all_backbones:
            raise CacheMismatchError(f"{cache.path}: backbone {key!r} of the network is not in this cache "
                                     f"(it has: {', '.join(cache.all_backbones) or 'none'})")
        have = cache.backbone_info(key)
        differ = [f for f in NETWORK_CACHE_FIELDS if info.get(f) is not None and have.get(f) != info.get(f)]
        if differ:
            hint = (" (the network was fine-tuned: its backbone weights changed; evaluate it on images with "
                    "--data)" if "weights_sha256" in differ else "")
            diff = fingerprint_differences(info, have, differ, labels=("network", "cache"))
            raise CacheMismatchError(f"{cache.path}: backbone {key!r} features differ from the network's "
                                     f"({diff}){hint}")


@torch.no_grad()
def predict_cached(net: FeatstackNet, cache, rows: Sequence[int]) -> np.ndarray:
    """Predicted class indices of the network's head on cached features (same backbones)."""
    check_cache_features(net, cache)
    X = cache.features(net.keys, rows=np.asarray(rows), dtype=np.dtype("float32"))
    feats = torch.from_numpy(np.ascontiguousarray(X))
    return net.head.predict_index(feats).cpu().numpy()
