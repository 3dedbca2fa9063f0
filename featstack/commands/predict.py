"""`featstack predict MODEL_DIR CACHE --out preds.csv`: apply a saved model to a cache."""
from __future__ import annotations

import argparse
import csv
import os

BATCH_ROWS = 8192


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `featstack predict` (options only; nothing heavy is imported here)."""
    p = sub.add_parser(
        "predict", help="apply a saved model to the rows of a cache, write a CSV",
        description="Predict every (or one split's) row of a cache with a model saved by "
                    "`featstack train`. The cache's backbones must have been extracted the same "
                    "way as those the model was trained on. Writes id, split, label, pred and one "
                    "proba_<class> (or score_<class>) column per class.")
    p.add_argument("model", help="model folder written by `featstack train --out`")
    p.add_argument("cache", help="path of the cache index file (e.g. cache/y.h5)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                   help="which rows to predict (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    """Check the cache against the model, write the CSV atomically, print the accuracy."""
    import numpy as np
    from tqdm.auto import tqdm

    from ..cache import open_cache
    from ..models import load_model

    model = load_model(args.model)
    cache = model.check_cache(open_cache(args.cache))
    wanted = np.ones(len(cache), dtype=bool) if args.split == "all" else cache.split_mask(args.split)
    skipped = int((wanted & ~cache.valid).sum())
    rows = np.flatnonzero(wanted & cache.valid)
    kind = model.score_kind
    from ..bounds import check_output_file

    out = check_output_file(args.out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    n_right = n_labelled = 0
    try:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "split", "label", "pred", *[f"{kind}_{c}" for c in model.output_classes]])
            batches = range(0, len(rows), BATCH_ROWS)
            for start in tqdm(batches, desc="predict", unit="batch",
                              disable=args.no_progress or len(batches) <= 1):
                idx = rows[start:start + BATCH_ROWS]
                X, _ = model.features(cache, idx)
                scores = model._scores(X)
                pred = model._names(model.estimator.predict(X))
                for r, p, s in zip(idx, pred, scores):
                    label = cache.classes[cache.labels[r]] if cache.labels[r] >= 0 else ""
                    if label:
                        n_labelled += 1
                        n_right += int(label == p)
                    w.writerow([cache.ids[r], cache.splits[r], label, p, *(f"{v:.8g}" for v in s)])
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"model        {model.head} x {model.fusion} over {'+'.join(model.backbones)} ({model.path})")
    print(f"predicted    {len(rows)} rows ({args.split}) of {cache.path}")
    if skipped:
        print(f"skipped      {skipped} rows whose input failed to decode (see `featstack info`)")
    if n_labelled:
        print(f"accuracy     {n_right / n_labelled:.4f} on {n_labelled} labelled rows")
    else:
        print("accuracy     (no labelled rows)")
    print(f"wrote        {out}")
    return 0
