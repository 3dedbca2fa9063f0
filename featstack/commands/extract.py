"""`featstack extract`: images -> embeddings of several backbones -> HDF5 cache."""
from __future__ import annotations

import argparse
import os

from ..errors import ConfigError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "extract", help="compute embeddings of several backbones into a cache",
        description="Decode every image once, run each backbone with its own preprocessing, and "
                    "write pooled embeddings to an HDF5 cache. Re-running resumes; adding a backbone "
                    "extracts only that one. Under torchrun, each rank writes its own shards.")
    p.add_argument("--data", required=True,
                   help="image folder (class subfolders, optionally under train/ val/ test/), a CSV or "
                        "JSONL manifest (path,label[,split][,id]), or 'demo' (bundled digits)")
    p.add_argument("--backbones", required=True, help="comma-separated backbone keys (timm model names)")
    p.add_argument("--cache", default=None, help="cache index path (default: cache/<data name>.h5)")
    p.add_argument("--weights", default="hub", choices=["hub", "none"],
                   help="hub = timm pretrained weights (default); none = seeded random init")
    p.add_argument("--weights-file", action="append", default=[], metavar="KEY=PATH",
                   help="local .safetensors/.pth weights for one backbone (repeatable)")
    p.add_argument("--input-size", type=int, default=None, help="override every backbone's square input size")
    p.add_argument("--max-input-size", type=int, default=None,
                   help="largest --input-size accepted (default 2048, or FEATSTACK_MAX_INPUT_SIZE)")
    p.add_argument("--seed", type=int, default=0, help="seed of random-init weights (--weights none)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding processes (default: on a GPU, up to 8 per rank; on a CPU, one per "
                        "8 cores, the others are torch's: below 8 cores the main process decodes)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads when extracting on a CPU (default: the cores left after "
                        "the decode workers, or OMP_NUM_THREADS when set; torchrun sets 1)")
    p.add_argument("--preprocess", default="fast", choices=["fast", "reference"],
                   help="fast = decode once, resize on the device; reference = timm's create_transform")
    p.add_argument("--decode", default="auto", choices=["auto", "cpu", "gpu"],
                   help="where JPEGs are decoded: gpu = batched nvjpeg on the CUDA device "
                        "(torchvision.io.decode_jpeg), cpu = Pillow in the workers; auto = gpu when "
                        "on CUDA with JPEG files, else cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model before extracting (slow start, faster steady state)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype")
    p.add_argument("--shard-rows", type=int, default=1024, help="rows per shard file (the unit of resume)")
    p.add_argument("--compression", default=None, choices=["lzf", "gzip"], help="HDF5 compression of shards")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a backbone cached with a different fingerprint (written as a new generation, "
                        "switched in when complete; readers of the old one keep reading it)")
    p.add_argument("--repair", action="store_true",
                   help="verify every existing shard's checksum and extract the bad or missing ones again")
    p.add_argument("--refresh", action="store_true",
                   help="extract again the rows whose input files changed (size or mtime) since they were "
                        "extracted, for every cached backbone; without it such a run is refused")
    p.add_argument("--wait", action="store_true",
                   help="wait for another writer of the same backbones to finish instead of failing")
    p.add_argument("--no-lock", action="store_true",
                   help="do not take the per-backbone write lock (file systems without flock; then run "
                        "one writer at a time yourself). Same as FEATSTACK_NO_LOCK=1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_weights_files(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise ConfigError(f"--weights-file {item!r}: expected KEY=PATH")
        out[key.strip()] = path.strip()
    return out


def default_cache_path(data: str) -> str:
    name = os.path.splitext(os.path.basename(os.path.normpath(data)))[0] or "features"
    return os.path.join("cache", f"{name}.h5")


def run(args) -> int:
    from ..distributed import dist_context
    from ..extract import extract

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    cache = args.cache or default_cache_path(args.data)
    with dist_context() as (rank, world):
        res = extract(
            args.data, backbones, cache, weights=args.weights,
            weights_files=parse_weights_files(args.weights_file), input_size=args.input_size,
            max_input_size=args.max_input_size,
            seed=args.seed, device=args.device, precision=args.precision, batch_size=args.batch_size,
            workers=args.workers, threads=args.threads, preprocess=args.preprocess, decode=args.decode,
            compile=args.compile, dtype=args.dtype,
            shard_rows=args.shard_rows, compression=args.compression, overwrite=args.overwrite,
            repair=args.repair, refresh=args.refresh, wait=args.wait, lock=False if args.no_lock else None,
            progress=not args.no_progress, rank=rank, world_size=world)
    if rank == 0:
        ips = ", ".join(f"{k} {v:.0f} img/s" for k, v in res.images_per_second.items() if v)
        print(f"{cache}: {res.n_samples} samples, {res.rows_processed} rows extracted, "
              f"{res.shards_written} shards written, {res.shards_skipped} skipped, {res.errors} errors "
              f"in {res.seconds:.1f}s{' (' + ips + ')' if ips else ''}")
    return 0
