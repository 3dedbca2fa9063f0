"""`featstack train CACHE --backbones a,b --head H --fusion F --out DIR`: fit and save one model."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `featstack train` (options only; nothing heavy is imported here)."""
    p = sub.add_parser(
        "train", help="fit one head x fusion on a cache's training split and save it",
        description="Fit a head (optionally fused across several backbones) on the rows of the "
                    "cache's train split, report train and test accuracy, and save the model as a "
                    "folder (model.skops + model.json, no pickle) for `featstack predict`.")
    p.add_argument("cache", help="path of the cache index file (e.g. cache/x.h5)")
    p.add_argument("--backbones", required=True, help="comma-separated backbone keys, in column order")
    p.add_argument("--head", default="logreg",
                   help="head name: logreg, linear-svm, svm-rbf, gaussian-nb, multinomial-nb, complement-nb")
    p.add_argument("--fusion", default=None, choices=["single", "concat", "vote", "stack"],
                   help="how to combine backbones (default: single for one backbone, concat otherwise)")
    p.add_argument("--out", required=True, help="model folder to write (e.g. models/m)")
    p.add_argument("--tune", action="store_true",
                   help="choose the regularisation by inner CV on the training split")
    p.add_argument("--cv", type=int, default=5, help="stratified folds of the stacking fusion (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and heads")
    p.add_argument("--n-jobs", type=int, default=None, help="joblib workers (stack: blocks x folds)")
    return p


def run(args) -> int:
    """Train, save, and print train rows, train/test accuracy and the model folder."""
    from ..bounds import check_int, check_seed
    from ..cache import open_cache
    from ..models import _parse_backbones, train_model

    check_seed(args.seed)
    check_int(args.cv, "--cv", 2)
    cache = open_cache(args.cache)
    keys = _parse_backbones(args.backbones)
    fusion = args.fusion or ("single" if len(keys) == 1 else "concat")
    saved = train_model(cache, keys, args.head, fusion, out=args.out, tune=args.tune, cv=args.cv,
                        random_state=args.seed, n_jobs=args.n_jobs, progress=True)
    m = saved.meta
    dims = "+".join(str(d) for d in saved.dims)
    print(f"model        {saved.head} x {saved.fusion} over {'+'.join(saved.backbones)} "
          f"(features {dims}){' tuned' if args.tune else ''}")
    print(f"train rows   {m['train_rows']} ({len(saved.classes)} classes) from {cache.path}, "
          f"fit in {m['fit_seconds']:.2f} s")
    print(f"train acc    {m['train_accuracy']:.4f} (on the training rows themselves, not cross-validated)")
    if "test_accuracy" in m:
        print(f"test acc     {m['test_accuracy']:.4f} on {m['test_rows']} test rows")
    else:
        print("test acc     (no labelled test split in this cache)")
    print(f"saved        {saved.path}")
    return 0
