"""`featstack extract`: images -> embeddings of several backbones -> HDF5 cache."""
from __future__ import annotations

import argparse
import os

from ..config import ExtractConfig, api_kwargs, from_args, stage_parser


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `featstack extract`: its options are the fields of ExtractConfig."""
    return stage_parser(
        sub, "extract", ExtractConfig, help="compute embeddings of several backbones into a cache",
        description="Decode every image once, run each backbone with its own preprocessing, and "
                    "write pooled embeddings to an HDF5 cache. Re-running resumes; adding a backbone "
                    "extracts only that one. Under torchrun, each rank writes its own shards.")


def default_cache_path(data: str) -> str:
    name = os.path.splitext(os.path.basename(os.path.normpath(data)))[0] or "features"
    return os.path.join("cache", f"{name}.h5")


def run(args) -> int:
    from ..distributed import dist_context
    from ..extract import extract

    cfg = from_args(ExtractConfig, args)
    cache = cfg.cache or default_cache_path(cfg.data)
    with dist_context() as (rank, world):
        res = extract(cfg.data, cfg.backbones, cache, **api_kwargs(cfg, skip=("data", "backbones", "cache")),
                      rank=rank, world_size=world)
    if rank == 0:
        ips = ", ".join(f"{k} {v:.0f} img/s" for k, v in res.images_per_second.items() if v)
        print(f"{cache}: {res.n_samples} samples, {res.rows_processed} rows extracted, "
              f"{res.shards_written} shards written, {res.shards_skipped} skipped, {res.errors} errors "
              f"in {res.seconds:.1f}s{' (' + ips + ')' if ips else ''}")
        if res.random_init:
            print(f"RANDOM INIT (seeded, not pretrained; features are a baseline only): {', '.join(res.random_init)}")
    return 0
