"""`featstack train CACHE --backbones a,b --head H --fusion F --out DIR` (or `--bench RUN` for the
best row of a bench): fit and save one model."""
from __future__ import annotations

import argparse

from ..config import TrainConfig, api_kwargs, default_fusion, from_args, stage_parser


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `featstack train`: its options are the fields of TrainConfig (nothing heavy imported)."""
    return stage_parser(
        sub, "train", TrainConfig, help="fit one head x fusion on a cache's training split and save it",
        description="Fit a head (optionally fused across several backbones) on the rows of the "
                    "cache's train split, report train and test accuracy, and save the model as a "
                    "folder (model.skops + model.json, no pickle) for `featstack predict`. Name the "
                    "model (--backbones, --head, --fusion) or train the best row of a bench folder "
                    "(--bench DIR, ranked by --metric).")


def choose_model(cfg: TrainConfig) -> None:
    """Fill in the model to train (backbones, head, fusion): the ones named (``--backbones`` makes
    ``--model named``), or with ``--model best`` the best row of ``--bench DIR`` by ``--metric``.
    Mixing the two ways is one error line."""
    from ..config import setting_of
    from ..errors import ConfigError
    from ..models import best_model, read_bench_rows

    named = [flag for flag, given in (("--backbones", cfg.backbones), ("--fusion", cfg.fusion),
                                      ("--head", cfg.head != setting_of(TrainConfig, "head").default)) if given]
    if cfg.bench and named:
        raise ConfigError(f"--bench picks the model (--model best); do not also name {', '.join(named)}")
    if cfg.backbones:
        cfg.model = "named"
    elif cfg.model == "named":
        raise ConfigError("--model named needs --backbones (and --head, --fusion)")
    elif not cfg.bench:
        raise ConfigError("name the model with --backbones A,B [--head H --fusion F], or train the best row "
                          "of a bench with --bench DIR")
    else:
        cfg.backbones, cfg.head, cfg.fusion = best_model(read_bench_rows(cfg.bench), cfg.metric)
        print(f"best row     of {cfg.bench} by {cfg.metric}: {'+'.join(cfg.backbones)} / {cfg.head} / "
              f"{cfg.fusion}")
    cfg.fusion = default_fusion(cfg)


def run(args) -> int:
    """Train, save, and print train rows, train/test accuracy and the model folder."""
    from ..bounds import check_seed
    from ..cache import open_cache
    from ..models import train_model

    cfg = from_args(TrainConfig, args)
    check_seed(cfg.seed)
    choose_model(cfg)
    cache = open_cache(cfg.cache)
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
