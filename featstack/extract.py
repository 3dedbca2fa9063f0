"""The extraction loop: decode each image once, run every backbone, write immutable shards.

Order of work: resolve and load every backbone first (an unknown name, a missing weights
file or an unreachable hub fails before any image is read), then check the cache (another
dataset, or a backbone cached with another fingerprint, is refused), then plan the shards
still missing and run them. Batches never cross a shard boundary, so a resumed run computes
exactly the batches an uninterrupted run would have, and its features are identical.

Memory is bounded by one shard buffer per backbone plus the loader's prefetch queue and the
writer's queue, whatever the number of samples.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .backbones import BackboneSpec, LoadedBackbone, load_backbone, resolve_backbone
from .cache import DEFAULT_SHARD_ROWS, CacheWriter, _atomic_write_text
from .distributed import barrier
from .data import ImageDecodeError, Source, open_source
from .errors import ConfigError
from .preprocess import PREPROCESS_MODES, DevicePreprocessor, center_square, decode_resolution, reference_transform

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STORAGE_DTYPES = ("float16", "float32")


@dataclass
class ExtractResult:
    cache_path: str
    n_samples: int
    device: str
    precision: str
    rows_processed: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    errors: int = 0
    seconds: float = 0.0
    images_per_second: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- device & precision
def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; an explicit cuda device without CUDA is an error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return precision


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- loading images
class _DecodeDataset(Dataset):
    """Decodes row ``rows[i]`` once, for all backbones (fast: one uint8 square; reference:
    timm's transform per backbone). A bad image becomes an error message, not an exception."""

    def __init__(self, source: Source, rows: np.ndarray, mode: str, side: int, ref_configs: dict):
        self.source, self.rows, self.mode, self.side = source, rows, mode, side
        self.ref_configs = ref_configs
        self._ref = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            img = self.source.load(row)
        except ImageDecodeError as e:
            return row, None, str(e)
        except Exception as e:  # noqa: BLE001 - one bad input never kills the run
            return row, None, f"{self.source.samples.ids[row]}: {type(e).__name__}: {e}"
        if self.mode == "fast":
            return row, torch.from_numpy(np.ascontiguousarray(center_square(img, self.side).transpose(2, 0, 1))), None
        from PIL import Image
        if self._ref is None:
            self._ref = {k: reference_transform(c) for k, c in self.ref_configs.items()}
        pil = Image.fromarray(img)
        return row, {k: t(pil) for k, t in self._ref.items()}, None


def _placeholder(mode: str, side: int, ref_configs: dict):
    if mode == "fast":
        return torch.zeros((3, side, side), dtype=torch.uint8)
    return {k: torch.zeros(tuple(c["input_size"]), dtype=torch.float32) for k, c in ref_configs.items()}


class _Collate:
    def __init__(self, mode: str, side: int, ref_configs: dict):
        self.mode, self.side, self.ref_configs = mode, side, ref_configs

    def __call__(self, items):
        rows = np.asarray([it[0] for it in items], dtype=np.int64)
        errors = [(it[0], it[2]) for it in items if it[2] is not None]
        pay = [it[1] if it[1] is not None else _placeholder(self.mode, self.side, self.ref_configs) for it in items]
        if self.mode == "fast":
            batch = torch.stack(pay)
        else:
            batch = {k: torch.stack([p[k] for p in pay]) for k in self.ref_configs}
        return rows, batch, errors


class _ShardBatchSampler(Sampler):
    """Batches of dataset positions that never cross a shard boundary."""

    def __init__(self, ranges: Sequence[tuple[int, int]], batch_size: int):
        self.batches = []
        pos = 0
        for start, stop in ranges:
            n = stop - start
            for b in range(0, n, batch_size):
                self.batches.append(list(range(pos + b, pos + min(b + batch_size, n))))
            pos += n

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# --------------------------------------------------------------------------- writing shards
class _ShardWriterThread:
    """Writes finished shards on a background thread so the device keeps computing.
    The queue is short: memory stays bounded and a slow disk applies back-pressure."""

    def __init__(self, writer: CacheWriter, compression: str | None, maxsize: int = 2):
        self.writer, self.compression = writer, compression
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._loop, name="featstack-shard-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.write_shard(*item, compression=self.compression)
                    self.written += 1
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    self.error = e

    def submit(self, *item) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


# --------------------------------------------------------------------------- the loop
def _rank_slice(items: list, rank: int, world_size: int) -> list:
    """Contiguous block of ``items`` for one rank (uneven blocks are fine; no padding)."""
    n = len(items)
    lo, hi = (n * rank) // world_size, (n * (rank + 1)) // world_size
    return items[lo:hi]


def _say(msg: str) -> None:
    print(f"featstack extract: {msg}", file=sys.stderr, flush=True)


def extract(
    source: Source | str,
    backbones: Sequence[str | BackboneSpec],
    cache_path: str | os.PathLike,
    *,
    weights: str = "hub",
    weights_files: dict | None = None,
    input_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    preprocess: str = "fast",
    dtype: str = "float16",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    compression: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    finalize: bool = True,
) -> ExtractResult:
    """Extract pooled embeddings of every backbone for every sample into the cache.

    Re-running after an interruption skips the shards that exist; adding a backbone to an
    existing cache extracts only that backbone. With ``world_size > 1`` this process handles a
    contiguous block of the missing shards (see :mod:`featstack.distributed`).
    """
    t0 = time.perf_counter()
    if preprocess not in PREPROCESS_MODES:
        raise ConfigError(f"--preprocess {preprocess!r}: choose one of {', '.join(PREPROCESS_MODES)}")
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")
    if batch_size < 1 or shard_rows < 1:
        raise ConfigError("--batch-size and --shard-rows must be at least 1")
    if not backbones:
        raise ConfigError("no backbones given (--backbones a,b,...)")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    source = open_source(source) if isinstance(source, (str, os.PathLike)) else source

    # 1. every backbone resolved and loaded before any image is read
    weights_files = dict(weights_files or {})
    specs = []
    for b in backbones:
        if isinstance(b, BackboneSpec):
            specs.append(b)
            continue
        specs.append(resolve_backbone(b, weights=weights, weights_file=weights_files.pop(b, None),
                                      input_size=input_size, seed=seed))
    if weights_files:
        raise ConfigError(f"--weights-file names {', '.join(weights_files)}, not among the backbones")
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"backbone listed twice: {keys}")
    loaded: dict[str, LoadedBackbone] = {s.key: load_backbone(s, dev) for s in specs}

    # 2. the cache: same dataset, same fingerprints (or --overwrite), shards still missing
    writer = CacheWriter(cache_path, source.samples)
    if rank != 0:  # rank 0 registers (or --overwrite-deletes) backbones before the others look
        barrier()
    existing_rows = [m["shard_rows"] for m in (writer.read_backbone_meta(k) for k in _cached_keys(writer)) if m]
    rows_per_shard = existing_rows[0] if existing_rows else shard_rows
    todo: dict[tuple[int, int], list[str]] = {}
    n_total_shards = 0
    for key, lb in loaded.items():
        meta = dict(lb.metadata(), preprocess=preprocess, dtype=dtype)
        missing = writer.plan_backbone(meta, shard_rows=rows_per_shard, overwrite=overwrite)
        n_total_shards += -(-len(source) // rows_per_shard)
        for r in missing:
            todo.setdefault(r, []).append(key)
    if rank == 0:
        barrier()
    work = _rank_slice(sorted(todo), rank, world_size)
    result = ExtractResult(cache_path=str(cache_path), n_samples=len(source), device=str(dev), precision=prec)
    result.shards_skipped = n_total_shards - sum(len(v) for v in todo.values())

    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (no CUDA device available)" \
        if not torch.cuda.is_available() else "CPU"
    who = f"rank {rank}/{world_size}, " if world_size > 1 else ""
    _say(f"{who}device {dev} [{devname}], precision {prec}, preprocess {preprocess}, "
         f"{len(source)} samples, backbones {', '.join(keys)}")
    if not work:
        _say(f"{who}nothing to extract: every shard exists ({result.shards_skipped} skipped)")
    else:
        _run(source, loaded, work, todo, writer, dev, prec, preprocess, batch_size, workers,
             compression, progress, result, who)
    barrier()  # every rank's shards are on disk before the index is built
    if finalize and rank == 0:
        _write_stats(writer, result)
        writer.finalize()
    result.seconds = time.perf_counter() - t0
    return result


def _cached_keys(writer: CacheWriter) -> list[str]:
    if not writer.root.is_dir():
        return []
    keys = []
    for d in sorted(writer.root.iterdir()):
        bj = d / "backbone.json"
        if bj.exists():
            keys.append(json.loads(bj.read_text())["key"])
    return keys


def _run(source, loaded, work, todo, writer, dev, prec, preprocess, batch_size, workers,
         compression, progress, result, who) -> None:
    from tqdm.auto import tqdm

    configs = {k: lb.data_config for k, lb in loaded.items()}
    side = decode_resolution(list(configs.values()))
    rows = np.concatenate([np.arange(s, e) for s, e in work]).astype(np.int64)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    dataset = _DecodeDataset(source, rows, preprocess, side, configs)
    loader = DataLoader(
        dataset, batch_sampler=_ShardBatchSampler(work, batch_size), num_workers=workers,
        collate_fn=_Collate(preprocess, side, configs), pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False)
    channels_last = dev.type == "cuda"
    prep = {k: DevicePreprocessor(c, dev, channels_last) for k, c in configs.items()}
    if channels_last:
        for lb in loaded.values():
            lb.model.to(memory_format=torch.channels_last)
    fwd_seconds = {k: 0.0 for k in loaded}
    fwd_rows = {k: 0 for k in loaded}
    thread = _ShardWriterThread(writer, compression)
    shard_iter = iter(work)
    cur = None
    bar = tqdm(total=len(rows), unit="img", desc=f"extract {who}".strip(), disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        for batch_rows, batch, errors in loader:
            if cur is None or batch_rows[0] >= cur[1]:
                cur = next(shard_iter)
                start, stop = cur
                buffers = {k: np.empty((stop - start, loaded[k].dim), dtype=np.float32) for k in todo[cur]}
                shard_errors: list = []
                filled = 0
            x_dev = batch.to(dev, non_blocking=True) if preprocess == "fast" else None
            for key in todo[cur]:
                tf = time.perf_counter()
                x = prep[key](x_dev) if preprocess == "fast" else batch[key].to(dev, non_blocking=True)
                if channels_last and preprocess != "fast":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), autocast_context(dev, prec):
                    out = loaded[key].model(x)
                out = out.float().cpu().numpy()
                fwd_seconds[key] += time.perf_counter() - tf
                fwd_rows[key] += len(batch_rows)
                if out.shape != (len(batch_rows), loaded[key].dim):
                    raise RuntimeError(f"{key}: model output shape {out.shape}, expected "
                                       f"({len(batch_rows)}, {loaded[key].dim})")
                buffers[key][batch_rows - start] = out
            shard_errors.extend(errors)
            filled += len(batch_rows)
            result.rows_processed += len(batch_rows)
            result.errors += len(errors)
            bar.update(len(batch_rows))
            if errors:
                bar.set_postfix(errors=result.errors)
            if filled == stop - start:
                err_rows = [r for r, _ in shard_errors]
                for key, buf in buffers.items():
                    if err_rows:
                        buf[np.asarray(err_rows) - start] = np.nan
                    thread.submit(key, start, stop, buf, err_rows, [m for _, m in shard_errors])
                    result.shards_written += 1
    finally:
        bar.close()
        thread.close()
    result.images_per_second = {k: (fwd_rows[k] / fwd_seconds[k] if fwd_seconds[k] else None) for k in loaded}
    if result.errors:
        _say(f"{who}{result.errors} inputs failed to decode; recorded in the cache's error table")


def _write_stats(writer: CacheWriter, result: ExtractResult) -> None:
    """Keep the latest measured forward throughput per backbone (shown by info and reports)."""
    for key, ips in result.images_per_second.items():
        if ips:
            _atomic_write_text(writer.backbone_dir(key) / "stats.json",
                               json.dumps({"images_per_second": ips, "device": result.device,
                                           "precision": result.precision}))
