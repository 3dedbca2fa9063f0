"""`featstack info CACHE [--json]`: what a cache holds."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="show what a cache file holds",
                       description="Samples, classes per split, backbones (with input size) and errors of a cache.")
    p.add_argument("cache", help="path of the cache index file (e.g. cache/x.h5)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (default: text)")
    return p


def split_class_counts(cache) -> dict:
    """{split: {class: labelled images}} for the splits that hold rows, plus unlabelled counts."""
    import numpy as np

    out = {}
    for split in dict.fromkeys(str(x) for x in cache.splits):
        in_split = cache.splits == split
        counts = {c: int(np.sum(in_split & (cache.labels == i))) for i, c in enumerate(cache.classes)}
        unlabelled = int(np.sum(in_split & (cache.labels < 0)))
        out[split] = {**{c: n for c, n in counts.items() if n}, **({"(unlabelled)": unlabelled} if unlabelled else {})}
    return out


def input_sizes(cache) -> dict:
    """{backbone: "HxW"} from each backbone's data config (the size its preprocessing resizes to)."""
    out = {}
    for b in cache.all_backbones:
        size = (cache.backbone_info(b).get("data_config") or {}).get("input_size")
        out[b] = "x".join(str(v) for v in size[1:]) if size else None
    return out


def run(args) -> int:
    from ..cache import open_cache

    cache = open_cache(args.cache)
    s = cache.summary()
    s["split_class_counts"] = split_class_counts(cache)
    sizes = input_sizes(cache)
    for b in s["backbones"]:
        b["input_size"] = sizes.get(b["key"])
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"cache        {s['path']}  (format {s['format_version']}, featstack {s['featstack_version']})")
    print(f"dataset      {s['n_samples']} samples, {s['n_labelled']} labelled, fingerprint "
          f"{s['dataset_fingerprint'][:12]}")
    print("splits       " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    shown = ", ".join(f"{c} ({n})" for c, n in list(s["class_counts"].items())[:20])
    more = f", ... {len(s['classes']) - 20} more" if len(s["classes"]) > 20 else ""
    print(f"classes      {len(s['classes'])}: {shown}{more}")
    for split, counts in s["split_class_counts"].items():
        items = list(counts.items())
        tail = f", ... {len(items) - 12} more" if len(items) > 12 else ""
        print(f"  {split:<11}" + ", ".join(f"{c} {n}" for c, n in items[:12]) + tail)
    print(f"errors       {s['n_errors']}")
    for e in s["errors"][:5]:
        print(f"  row {e['row']} {e['id']}: {e['message']}")
    print("backbones")
    if not s["backbones"]:
        print("  (none)")
    for b in s["backbones"]:
        state = {"complete": "complete", "incomplete": f"INCOMPLETE, missing rows {b['missing']}",
                 "corrupt": f"CORRUPT: {b['problem']}"}[b["state"]]
        verified = f"verified {b['verified_utc']}" if b["verified_utc"] else "never verified"
        print(f"  {b['key']:<28} dim {b['dim']:<5} input {b['input_size'] or '?':<8} {b['dtype']:<8} weights {b['weights']} "
              f"(sha256 {str(b['weights_sha256'])[:12]})  fingerprint {str(b['fingerprint'])[:12]}  "
              f"{state}{'  RANDOM INIT (not pretrained)' if b.get('random_init') else ''}  ({verified})")
    corrupt = [b for b in s["backbones"] if b["state"] == "corrupt"]
    if corrupt:
        print(f"featstack info: {len(corrupt)} corrupt backbone(s): {corrupt[0]['problem']}; run "
              f"`featstack verify {s['path']}` and re-extract with --repair", file=sys.stderr)
        return 1
    return 0
