"""`featstack train CACHE --backbones a,b --head H --fusion F --out DIR`: fit and save one model."""
from __future__ import annotations

import argparse

from ..config import TrainConfig, api_kwargs, default_fusion, from_args, stage_parser


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `featstack train`: its options are the fields of TrainConfig (nothing heavy imported)."""
    return stage_parser(
        sub, "train", TrainConfig, help="fit one head x fusion on a cache's training split and save it",
        description="Fit a head (optionally fused across several backbones) on the rows of the "
                    "cache's train split, report train and test accuracy, and save the model as a "
                    "folder (model.skops + model.json, no pickle) for `featstack predict`.")


def run(args) -> int:
    """Train, save, and print train rows, train/test accuracy and the model folder."""
    from ..bounds import check_seed
    from ..cache import open_cache
    from ..models import train_model

    cfg = from_args(TrainConfig, args)
    check_seed(cfg.seed)
    cache = open_cache(cfg.cache)
    cfg.fusion = default_fusion(cfg)
    saved = train_model(cache, **api_kwargs(cfg, skip=("cache",)), progress=True)
    m = saved.meta
    dims = "+".join(str(d) for d in saved.dims)
    print(f"model        {saved.head} x {saved.fusion} over {'+'.join(saved.backbones)} "
          f"(features {dims}){' tuned' if cfg.tune else ''}")
    print(f"train rows   {m['train_rows']} ({len(saved.classes)} classes) from {cache.path}, "
          f"fit in {m['fit_seconds']:.2f} s")
    print(f"train acc    {m['train_accuracy']:.4f} (on the training rows themselves, not cross-validated)")
    if "test_accuracy" in m:
        print(f"test acc     {m['test_accuracy']:.4f} on {m['test_rows']} test rows")
    else:
        print("test acc     (no labelled test split in this cache)")
    print(f"saved        {saved.path}")
    return 0
