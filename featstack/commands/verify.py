"""`featstack verify CACHE [--backbones K,...]`: check every shard's checksum."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "verify", help="check every shard of a cache byte for byte",
        description="Reads every shard of the given backbones (default: all) and checks its row range, "
                    "its backbone fingerprint and the checksum of its feature bytes. Prints each bad "
                    "shard by file name and exits 1 when any is bad; `featstack extract ... --repair` "
                    "extracts exactly those again. `featstack info` shows when a cache was last verified.")
    p.add_argument("cache", help="path of the cache index file (e.g. cache/x.h5)")
    p.add_argument("--backbones", default=None, help="comma-separated backbone keys (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a progress bar on standard error)")
    return p


def run(args) -> int:
    import sys

    from tqdm.auto import tqdm

    from ..cache import open_cache, verify_cache

    keys = [k.strip() for k in args.backbones.split(",") if k.strip()] if args.backbones else None
    cache = open_cache(args.cache)
    total = sum(len(cache.backbone_info(k).get("shards", [])) for k in (keys or cache.all_backbones))
    with tqdm(total=total, unit="shard", desc="verify", disable=args.no_progress, file=sys.stderr) as bar:
        result = verify_cache(args.cache, keys, progress=bar.update)
    n_bad = 0
    for key, bad in result.items():
        for rel, why in bad:
            print(f"BAD {cache.path.parent / rel}: backbone {key!r}: {why}")
        n_bad += len(bad)
        n = len(cache.backbone_info(key).get("shards", []))
        print(f"{key}: {n} shards checked, {len(bad)} bad")
    if n_bad:
        print(f"{args.cache}: {n_bad} bad shards; re-extract them with `featstack extract ... --repair`")
        return 1
    print(f"{args.cache}: every shard verified")
    return 0
