"""The extraction loop: decode each image once, run every backbone, write immutable shards.

Order of work: resolve and load every backbone first (an unknown name, a missing weights
file or an unreachable hub fails before any image is read), then check the cache (another
dataset, or a backbone cached with another fingerprint, is refused), then plan the shards
still missing and run them. Batches never cross a shard boundary, so a resumed run computes
exactly the batches an uninterrupted run would have, and its features are identical.

Keeping the device busy:

* DataLoader workers decode each image once and resize/crop it for every backbone exactly as
  timm's eval transform does, to uint8 (:mod:`featstack.preprocess`; JPEGs at a reduced DCT
  scale only when they are much larger than every backbone needs); with ``decode="gpu"`` they
  only read file bytes and the main process decodes whole batches with nvjpeg and resizes on
  the device. Batches come from pinned memory and are copied to the device once,
  asynchronously; each backbone's normalisation is a batched tensor op on the device.
* Models run channels_last, under fp16 autocast on a GPU (an overflowing batch is recomputed in
  fp32; fp32 and bf16 selectable), optionally through
  ``torch.compile``. Embeddings are copied back asynchronously and read one batch later, so
  the host prepares batch i+1 while the device still computes batch i.
* Finished shards go to a writer thread through a short queue.
* On a CPU device, decode workers and torch's intra-op threads share the cores: the defaults
  split them so that they do not oversubscribe (an OpenMP thread that loses its core to a
  decoder stalls every other thread at the next barrier); see :func:`resolve_parallelism`.
* BatchNorm is folded into the preceding convolutions (``torch.fx``) for inference.

Memory is bounded by one shard buffer per backbone, the loader's prefetch queue
(workers x prefetch_factor batches) and the writer's queue, whatever the number of samples:
no array, list or index over all rows is built here.
"""
from __future__ import annotations

import bisect
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .backbones import BackboneSpec, LoadedBackbone, build_backbone, resolve_backbone, split_key
from .bounds import check_input_size, check_int, check_seed
from .cache import DEFAULT_SHARD_ROWS, CacheWriter, _atomic_write_text, _some
from .config import DECODE_MODES, PRECISIONS, STORAGE_DTYPES  # noqa: F401 - defined once, with the settings
from .data import FileSource, ImageDecodeError, Source, decode_image, open_source, read_input
from .device import autocast_context, resolve_device, resolve_precision  # noqa: F401 - re-exported
from .distributed import all_sum, barrier, local_world_size
from .errors import CacheMismatchError, ConfigError
from .preprocess import (DEVICE_FILTERS, PREPROCESS_MODES, PREPROCESS_VERSION, Normalizer, decode_for,
                         gpu_jpeg_decode_available, images_from_jpeg_bytes, is_plain_jpeg, recipes_for,
                         reference_transform, render_all)


class InputsChangedError(CacheMismatchError):
    """Input files changed since their features were extracted (and no --refresh)."""


# Device types on which decode="gpu" (batched torchvision.io.decode_jpeg on the extraction
# device) is allowed. Only CUDA makes sense for users; tests add "cpu" to run the same path.
_DEVICE_DECODE_TYPES = ("cuda",)
_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
NO_INPUT = (-1, -1, 0)  # input record of a file that could not be read: (size, mtime_ns, hash)


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
    decode: str = "cpu"
    workers: int = 0
    threads: int | None = None
    compiled: bool = False
    rank_rows_processed: int | None = None  # under torchrun: this rank's rows (the others are job totals)
    random_init: list = field(default_factory=list)  # backbones with seeded random weights
    fp32_retries: int = 0  # batches × backbones whose fp16 features overflowed, recomputed in fp32


# --------------------------------------------------------------------------- device & precision
# One meaning everywhere (extract and finetune): see featstack.device.


def resolve_decode(decode: str, device: torch.device, source: Source, preprocess: str) -> str:
    """'cpu' (Pillow in DataLoader workers) or 'gpu' (batched decode_jpeg on the device).

    auto = gpu when the device is CUDA, torchvision can decode there, the source is image files
    and some of them are JPEGs (non-JPEG files are still decoded by the workers); else cpu.
    """
    if decode not in DECODE_MODES:
        raise ConfigError(f"--decode {decode!r}: choose one of {', '.join(DECODE_MODES)}")
    if decode == "cpu":
        return "cpu"
    on_device = (device.type in _DEVICE_DECODE_TYPES and gpu_jpeg_decode_available(device)
                 and isinstance(source, FileSource) and preprocess == "fast")
    if decode == "gpu":
        if not on_device:
            why = ("--preprocess reference decodes with Pillow by definition" if preprocess != "fast" else
                   "the source is not image files" if not isinstance(source, FileSource) else
                   f"it needs a CUDA device with torchvision's nvjpeg decoder (device is {device})")
            raise ConfigError(f"--decode gpu: {why}; use --decode cpu or auto")
        return "gpu"
    if not on_device:
        return "cpu"
    sample = source.paths[:1000]
    return "gpu" if any(str(p).lower().endswith(_JPEG_SUFFIXES) for p in sample) else "cpu"


def decode_for_backbones(decode: str, decode_on: str, recipes: dict, fallback: dict) -> str:
    """Device decoding resizes on the device, which reproduces Pillow's bilinear, bicubic and
    nearest filters only, and never runs timm's reference transform: with a backbone needing
    anything else, ``auto`` decodes on the CPU and an explicit ``gpu`` is refused."""
    if decode_on != "gpu":
        return decode_on
    why = [f"{k} is preprocessed by the reference path ({r})" for k, r in fallback.items()]
    why += [f"{k} uses interpolation {r.interpolation!r}" for k, r in recipes.items()
            if r.interpolation not in DEVICE_FILTERS]
    if not why:
        return "gpu"
    if decode == "gpu":
        raise ConfigError(f"--decode gpu: {why[0]} (the device resizes with "
                          f"{', '.join(DEVICE_FILTERS)} only); use --decode cpu or auto")
    return "cpu"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_parallelism(device: torch.device, workers: int | None, threads: int | None,
                        decode: str = "cpu") -> tuple[int, int | None]:
    """(DataLoader workers, torch intra-op threads or None = leave torch's setting).

    The cores of this machine are shared by the torchrun ranks on it (LOCAL_WORLD_SIZE). On a
    GPU the host only decodes: workers get the cores. On a CPU the forward pass and the
    decoders compete for the same cores, and a core taken from one of torch's OpenMP threads
    stalls its peers at every barrier (on a busy 2-core machine, 1 worker + 2 threads ran at
    a third of the speed of 1 + 1); so the defaults keep workers + threads = cores. Decoding
    once costs far less than the forward passes (~3 ms per photo against ~25 ms for three
    small backbones on one core), so small machines decode in the main process between
    batches and give every core to torch (idle 2-core machine: 0 + 2 ran 1.5x faster than
    1 + 1; see docs/scale.md); from 8 cores on, one worker per 8 cores decodes in parallel. An
    explicit OMP_NUM_THREADS (torchrun sets 1 per rank) is respected. On a machine busy with
    other jobs, fewer threads than cores (``threads=1, workers=1`` per 2 cores) is faster.
    """
    if workers is not None and workers < 0:
        raise ConfigError("--workers must be >= 0")
    if threads is not None and threads < 1:
        raise ConfigError("--threads must be >= 1")
    per_rank = max(1, _cores() // local_world_size())
    if device.type != "cpu":
        if workers is None:
            workers = min(4 if decode == "gpu" else 8, max(1, per_rank - 1))
        return workers, threads
    if workers is None:
        workers = per_rank // 8
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, per_rank - workers)
    return workers, threads


# --------------------------------------------------------------------------- loading images
class _RawBatch(NamedTuple):
    """A batch for device decoding: JPEG bytes, plus the inputs the workers made themselves.

    The files' bytes travel as ONE flat tensor with offsets: a worker shares each tensor it
    sends through its own file descriptor, and hundreds per batch would exhaust the limit."""

    n: int
    pixels: dict | None   # key -> (m, 3, h, w) uint8 for positions pixel_pos
    pixel_pos: list
    jpeg_data: torch.Tensor | None  # concatenated file bytes, uint8
    jpeg_offsets: list              # len(jpeg_pos) + 1 offsets into jpeg_data
    jpeg_pos: list

    @property
    def jpegs(self) -> list:
        o = self.jpeg_offsets
        return [self.jpeg_data[o[i]:o[i + 1]] for i in range(len(self.jpeg_pos))]

    def pin_memory(self):  # called by the DataLoader's pin thread: pin the pixels, not the bytes
        return self._replace(pixels=_pin(self.pixels))


def _pin(pixels: dict | None) -> dict | None:
    return None if pixels is None else {k: v.pin_memory() for k, v in pixels.items()}


def _tensors(inputs: dict) -> dict:
    """{key: HWC uint8 array or CHW float tensor} -> torch tensors the loader can share."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, np.ndarray):
            if not v.flags.writeable or not v.flags.c_contiguous:  # Pillow's arrays are read-only
                v = np.array(v, order="C")
            v = torch.from_numpy(v)
        out[k] = v
    return out


class _DecodeDataset(Dataset):
    """Item = global row id. Decodes it once, for all backbones: {key: timm's uint8 input (HWC)}
    for backbones of the fast path (``recipes``), {key: normalised float tensor} for those of
    the reference path (``ref_configs``), or the raw JPEG bytes for device decoding. A bad
    image becomes an error message, not an exception."""

    def __init__(self, source: Source, recipes: dict, ref_configs: dict, decode: str = "cpu"):
        self.source, self.recipes, self.decode = source, recipes, decode
        self.ref_configs = ref_configs
        self.paths = source.paths if isinstance(source, FileSource) else None
        self._ref = None

    def __len__(self) -> int:
        return len(self.source)

    def _inputs(self, row: int, data: bytes | None):
        """The row's pixels for every backbone (or its plain-JPEG bytes for device decoding);
        ``data`` = the file's bytes, read once by :meth:`__getitem__` (None: not a file)."""
        if data is None or self.ref_configs:  # full decode: the reference path needs it
            from PIL import Image

            if self._ref is None:
                self._ref = {k: reference_transform(c) for k, c in self.ref_configs.items()}
            arr = self.source.load(row) if data is None else decode_image(self.paths[row], data=data)
            img = Image.fromarray(arr)
            return dict(render_all(img, self.recipes), **{k: t(img) for k, t in self._ref.items()})
        if self.decode == "gpu" and is_plain_jpeg(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return decode_for(data, self.recipes, name=self.paths[row])

    def __getitem__(self, row: int):
        """(row, payload, error message or None, input record (size, mtime_ns, hash) or None)."""
        row = int(row)
        inp = NO_INPUT if self.paths is not None else None
        try:
            data = None
            if self.paths is not None:  # one read: decoded, and hashed for change detection
                data, inp = read_input(self.paths[row])
            inputs = self._inputs(row, data)
        except ImageDecodeError as e:
            return row, None, str(e), inp
        except Exception as e:  # noqa: BLE001 - one bad input never kills the run
            return row, None, f"{self.source.samples.ids[row]}: {type(e).__name__}: {e}", inp
        return row, (inputs if isinstance(inputs, torch.Tensor) else _tensors(inputs)), None, inp


def _placeholder(recipes: dict, ref_configs: dict) -> dict:
    out = {k: torch.zeros((*r.out, 3), dtype=torch.uint8) for k, r in recipes.items()}
    out.update({k: torch.zeros(tuple(c["input_size"]), dtype=torch.float32) for k, c in ref_configs.items()})
    return out


def _stack(items: list, keys) -> dict:
    """Per key: HWC uint8 images stacked and seen as NCHW (channels_last, no copy), or CHW
    float tensors stacked."""
    out = {}
    for k in keys:
        t = torch.stack([it[k] for it in items])
        out[k] = t.permute(0, 3, 1, 2) if t.dtype == torch.uint8 else t
    return out


class _Collate:
    def __init__(self, recipes: dict, ref_configs: dict, decode: str = "cpu"):
        self.recipes, self.ref_configs, self.decode = recipes, ref_configs, decode
        self.keys = list(recipes) + list(ref_configs)

    def __call__(self, items):
        rows = np.asarray([it[0] for it in items], dtype=np.int64)
        errors = [(it[0], it[2]) for it in items if it[2] is not None]
        inputs = np.asarray([it[3] for it in items], dtype=np.int64) if items[0][3] is not None else None
        pay = [it[1] if it[1] is not None else _placeholder(self.recipes, self.ref_configs) for it in items]
        if self.decode != "gpu":
            return rows, _stack(pay, self.keys), errors, inputs
        px_pos = [i for i, p in enumerate(pay) if isinstance(p, dict)]
        jp_pos = [i for i, p in enumerate(pay) if not isinstance(p, dict)]
        pixels = _stack([pay[i] for i in px_pos], self.keys) if px_pos else None
        data = torch.cat([pay[i] for i in jp_pos]) if jp_pos else None
        offsets = np.concatenate([[0], np.cumsum([len(pay[i]) for i in jp_pos])]).astype(int).tolist()
        return rows, _RawBatch(len(pay), pixels, px_pos, data, offsets, jp_pos), errors, inputs


class _ShardBatchSampler(Sampler):
    """Batches of global row ids that never cross a shard boundary, generated lazily (no list
    over all rows: a rank of a 100M-image run iterates tens of millions of rows)."""

    def __init__(self, ranges: Sequence[tuple[int, int]], batch_size: int):
        self.ranges, self.batch_size = list(ranges), batch_size

    def __iter__(self):
        for start, stop in self.ranges:
            for b in range(start, stop, self.batch_size):
                yield list(range(b, min(b + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in self.ranges)


def _to_device_batch(batch, rows: np.ndarray, errors: list, dev: torch.device, recipes: dict,
                     source: Source) -> dict:
    """The batch's per-backbone inputs on the device (moved there once): {key: (B, 3, h, w)}.

    For a :class:`_RawBatch`, the JPEGs are decoded and resized on the device in one call; a
    file the device decoder rejects is decoded by Pillow here (or recorded in ``errors``)."""
    if isinstance(batch, dict):
        return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    out = {k: torch.zeros((batch.n, 3, *r.out), dtype=torch.uint8, device=dev).contiguous(
        memory_format=torch.channels_last) for k, r in recipes.items()}
    if batch.pixel_pos:
        pos = torch.as_tensor(batch.pixel_pos, device=dev)
        for k, v in batch.pixels.items():
            out[k][pos] = v.to(dev, non_blocking=True)
    jpegs = batch.jpegs
    if not jpegs:
        return out
    inputs, failures = images_from_jpeg_bytes(jpegs, recipes, dev)
    ok = [i for i, x in enumerate(inputs) if x is not None]
    if ok:
        pos = torch.as_tensor([batch.jpeg_pos[i] for i in ok], device=dev)
        for k in out:
            out[k][pos] = torch.stack([inputs[i][k] for i in ok])
    for i in failures:
        j = batch.jpeg_pos[i]
        row = int(rows[j])
        name = source.paths[row] if isinstance(source, FileSource) else str(row)
        try:
            one = decode_for(jpegs[i].numpy().tobytes(), recipes, name=name)
        except ImageDecodeError as e:
            errors.append((row, str(e)))
            continue
        for k, v in _tensors(one).items():
            out[k][j] = v.permute(2, 0, 1).to(dev)
    return out


# --------------------------------------------------------------------------- models
def fold_batchnorm(model: torch.nn.Module, input_size: Sequence[int]) -> torch.nn.Module:
    """A copy of an eval-mode CNN with each BatchNorm folded into the convolution before it
    (``torch.fx``), or the model itself when it has no BatchNorm, cannot be traced, or the
    folded copy does not reproduce it on a random input. Saves a full pass over every
    activation map per BatchNorm: 10-35% of a ResNet's CPU forward time."""
    if model.training or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(model, inplace=False)
        p = next(model.parameters())
        x = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0)).to(p.device)
        with torch.inference_mode():
            want, got = model(x).float(), folded(x).float()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())):
            return model
        return folded
    except Exception:  # noqa: BLE001 - untraceable model: run it as it is
        return model


def inference_model(lb: LoadedBackbone, channels_last: bool = True) -> torch.nn.Module:
    """The module extraction runs for a loaded backbone: BatchNorm folded, channels_last."""
    model = fold_batchnorm(lb.model, lb.data_config["input_size"])
    return model.to(memory_format=torch.channels_last) if channels_last else model


class _Forward:
    """A backbone's forward: eager, or ``torch.compile``d with static shapes (a short last
    batch is zero-padded to the batch size, so one graph serves every batch). If compiling
    fails on the first batch the model runs eagerly, with a warning."""

    def __init__(self, key: str, model: torch.nn.Module, compile, batch_size: int,
                 channels_last: bool):
        self.key, self.model, self.batch_size, self.channels_last = key, model, batch_size, channels_last
        self.compiled = None
        self.calls = 0
        if compile:
            backend = "inductor" if compile is True else compile
            try:
                self.compiled = torch.compile(model, backend=backend, dynamic=False)
            except Exception as e:  # noqa: BLE001 - e.g. an unknown backend name
                raise ConfigError(f"--compile: {key}: {type(e).__name__}: {str(e)[:300]}") from e

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.compiled is None:
            return self.model(x)
        n = x.shape[0]
        if n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        try:
            return self.compiled(x)[:n]
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported op, ...
            if self.calls > 1:
                raise
            _say(f"{self.key}: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running eagerly")
            self.compiled = None
            return self.model(x[:n])


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


class _ShardAssembler:
    """Fills one shard buffer per backbone from retired batches (in row order) and hands each
    complete shard to the writer. At most one shard's buffers are open at a time."""

    def __init__(self, work: Sequence[tuple[int, int]], todo: dict, dims: dict, sink: _ShardWriterThread,
                 result: ExtractResult):
        self.work, self.starts = list(work), [s for s, _ in work]
        self.todo, self.dims, self.sink, self.result = todo, dims, sink, result
        self.cur: tuple[int, int] | None = None
        self.buffers: dict = {}
        self.errors: list = []
        self.inputs: np.ndarray | None = None
        self.filled = 0
        self.max_open_rows = 0  # instrumentation: rows held in open shard buffers, at most

    def shard_of(self, row: int) -> tuple[int, int]:
        shard = self.work[bisect.bisect_right(self.starts, row) - 1]
        assert shard[0] <= row < shard[1]
        return shard

    def add(self, rows: np.ndarray, outs: dict, errors: list, inputs: np.ndarray | None = None) -> None:
        shard = self.shard_of(int(rows[0]))
        start, stop = shard
        if shard != self.cur:
            if self.cur is not None:
                raise RuntimeError(f"shard {self.cur} left incomplete before {shard}")
            self.cur, self.filled, self.errors = shard, 0, []
            self.buffers = {k: np.empty((stop - start, self.dims[k]), dtype=np.float32) for k in self.todo[shard]}
            self.inputs = None if inputs is None else np.tile(np.asarray(NO_INPUT, np.int64), (stop - start, 1))
            self.max_open_rows = max(self.max_open_rows, sum(len(b) for b in self.buffers.values()))
        for key, arr in outs.items():
            self.buffers[key][rows - start] = arr
        if self.inputs is not None and inputs is not None:
            self.inputs[rows - start] = inputs
        self.errors.extend(errors)
        self.filled += len(rows)
        if self.filled == stop - start:
            err_rows = [r for r, _ in self.errors]
            msgs = [m for _, m in self.errors]
            for key, buf in self.buffers.items():
                if err_rows:
                    buf[np.asarray(err_rows) - start] = np.nan
                self.sink.submit(key, start, stop, buf, err_rows, msgs, self.inputs)
                self.result.shards_written += 1
            self.cur, self.buffers, self.errors = None, {}, []


# --------------------------------------------------------------------------- the loop
def _rank_slice(items: list, rank: int, world_size: int, weights: Sequence[float] | None = None) -> list:
    """Contiguous block of ``items`` for one rank (uneven blocks are fine; no padding).

    With ``weights`` (e.g. rows x backbones still to compute per shard) the blocks are cut at
    equal cumulative weight, so ranks of a resumed or extended run finish together."""
    n = len(items)
    if weights is None:
        lo, hi = (n * rank) // world_size, (n * (rank + 1)) // world_size
        return items[lo:hi]
    before = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64))])[:-1]
    total = float(np.sum(weights))
    lo = int(np.searchsorted(before, total * rank / world_size, side="left"))
    hi = int(np.searchsorted(before, total * (rank + 1) / world_size, side="left")) if rank + 1 < world_size else n
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
    data_configs: dict | None = None,
    input_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    threads: int | None = None,
    preprocess: str = "fast",
    decode: str = "auto",
    compile=False,
    channels_last: bool = True,
    dtype: str = "float16",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    compression: str | None = None,
    overwrite: bool = False,
    repair: bool = False,
    refresh: bool = False,
    max_input_size: int | None = None,
    lock: bool = True,
    wait: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    finalize: bool = True,
) -> ExtractResult:
    """Extract pooled embeddings of every backbone for every sample into the cache.

    Re-running after an interruption skips the shards that exist; adding a backbone to an
    existing cache extracts only that backbone. With ``world_size > 1`` this process handles a
    contiguous block of the missing shards (see :mod:`featstack.distributed`).

    One writer per (cache, backbone): the backbones' write locks are taken before planning
    (``wait`` waits for a running writer instead of failing; ``lock=False`` or
    ``FEATSTACK_NO_LOCK=1`` turns locking off, see :mod:`featstack.locks`). ``overwrite``
    writes a new generation, switched in when complete; ``repair`` verifies every existing
    shard's checksum and extracts the bad ones again. Input files changed since their rows were
    extracted (size or mtime differ from what the shards recorded) are refused, unless
    ``refresh``: then their shards are extracted again for every cached backbone.

    ``decode``: auto | cpu | gpu (batched nvjpeg on the CUDA device). ``compile``: True for
    ``torch.compile`` (inductor), or a ``torch.compile`` backend (name or callable). ``threads``: torch intra-op threads while
    extracting on a CPU (default: the cores left after the decode workers).
    """
    t0 = time.perf_counter()
    _check_bounds(input_size, max_input_size, seed, batch_size, shard_rows, workers, threads)
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
    decode_on = resolve_decode(decode, dev, source, preprocess)
    workers_arg, threads_arg = workers, threads

    # 1. every backbone resolved and loaded before any image is read
    weights_files = dict(weights_files or {})
    data_configs = dict(data_configs or {})
    specs = []
    for b in backbones:
        if isinstance(b, BackboneSpec):
            specs.append(b)
            continue
        name, arch = split_key(b)
        specs.append(resolve_backbone(b, weights=weights, weights_file=weights_files.pop(name or arch, None),
                                      input_size=input_size, seed=seed,
                                      data_config=data_configs.pop(name or arch, None)))
    for flag, left in (("--weights-file", weights_files), ("--data-config", data_configs)):
        if left:
            raise ConfigError(f"{flag} names {', '.join(left)}, not among the backbones")
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"backbone listed twice: {keys}")
    loaded: dict[str, LoadedBackbone] = {s.key: build_backbone(s, dev) for s in specs}
    configs = {k: lb.data_config for k, lb in loaded.items()}
    recipes, fallback = recipes_for(configs) if preprocess == "fast" else ({}, {k: "" for k in configs})
    for key, why in fallback.items():
        if why:
            _say(f"note: {key}: the fast path does not reproduce {why}; it is preprocessed by timm's "
                 f"reference transform")
    decode_on = decode_for_backbones(decode, decode_on, recipes, {k: w for k, w in fallback.items() if w})
    workers, threads = resolve_parallelism(dev, workers_arg, threads_arg, decode_on)

    # 2. the cache: same dataset, same fingerprints (or --overwrite), shards still missing
    writer = CacheWriter(cache_path, source.samples, lock=lock, wait=wait, follower=rank != 0, say=_say)
    try:
        return _extract_locked(writer, source, loaded, recipes, keys, t0, preprocess=preprocess, dtype=dtype,
                               decode_on=decode_on, shard_rows=shard_rows, overwrite=overwrite,
                               repair=repair, refresh=refresh, rank=rank, world_size=world_size, dev=dev, prec=prec,
                               workers=workers, threads=threads, batch_size=batch_size,
                               compression=compression, progress=progress, compile=compile,
                               channels_last=channels_last, finalize=finalize)
    finally:
        writer.release()


def _check_bounds(input_size, max_input_size, seed, batch_size, shard_rows, workers, threads) -> None:
    """Every number checked before a model is built or an image read (see :mod:`featstack.bounds`)."""
    check_input_size(input_size, limit=max_input_size)
    check_seed(seed)
    check_int(batch_size, "--batch-size", 1)
    check_int(shard_rows, "--shard-rows", 1)
    if workers is not None:
        check_int(workers, "--workers", 0)
    if threads is not None:
        check_int(threads, "--threads", 1)


def _check_inputs(writer: CacheWriter, keys: list, refresh: bool) -> None:
    """Changed input files are re-extracted (``refresh``) or refused; never silently kept."""
    stale, changed = writer.input_changes()
    if not changed:
        return
    ids = _some(writer.samples.ids[changed].tolist())
    if not refresh:
        raise InputsChangedError(
            f"{writer.path}: {len(changed)} input files changed since they were extracted ({ids}); "
            "pass --refresh to extract their rows again for every cached backbone")
    writer.refresh(stale)
    _say(f"refresh: {len(changed)} input files changed ({ids}); extracting their rows again")
    for key in sorted(set(stale) - set(keys)):
        _say(f"refresh: backbone {key!r} is not in this run: its {len(stale[key])} stale shards were "
             f"removed; extract it again (--backbones {key}) to complete it")


def _extract_locked(writer: CacheWriter, source: Source, loaded: dict, recipes: dict, keys: list, t0: float, *,
                    preprocess,
                    dtype, decode_on, shard_rows, overwrite, repair, refresh, rank, world_size, dev, prec, workers,
                    threads, batch_size, compression, progress, compile, channels_last,
                    finalize) -> ExtractResult:
    """Steps 2-4 of :func:`extract`, with the backbones' write locks held (rank 0) until the
    index is built."""
    if rank == 0:
        writer.lock_backbones(keys)
        _check_inputs(writer, keys, refresh)
    else:  # rank 0 locks and registers (or starts new generations of) backbones before the others look
        barrier()
    existing_rows = [m["shard_rows"] for m in (writer.read_backbone_meta(k) for k in writer.cached_keys()) if m]
    rows_per_shard = existing_rows[0] if existing_rows else shard_rows
    todo: dict[tuple[int, int], list[str]] = {}
    n_total_shards = 0
    for key, lb in loaded.items():
        # decode (cpu/gpu) changes pixels slightly: part of the fingerprint, so a resume never
        # mixes shards decoded differently within one backbone's matrix
        meta = dict(lb.metadata(), preprocess="fast" if key in recipes else "reference", dtype=dtype,
                    decode=decode_on)
        if key in recipes:  # the fast path's pixels changed with its versions: never mix them
            meta["preprocess_version"] = PREPROCESS_VERSION
        missing = writer.plan_backbone(meta, shard_rows=rows_per_shard, overwrite=overwrite, repair=repair)
        n_total_shards += -(-len(source) // rows_per_shard)
        for r in missing:
            todo.setdefault(r, []).append(key)
    if rank == 0:
        barrier()
    shards = sorted(todo)
    work = _rank_slice(shards, rank, world_size, weights=[(e - s) * len(todo[(s, e)]) for s, e in shards])
    result = ExtractResult(cache_path=str(writer.path), n_samples=len(source), device=str(dev), precision=prec,
                           decode=decode_on, workers=workers, threads=threads,
                           random_init=[k for k, lb in loaded.items() if lb.spec.random_init])
    result.shards_skipped = n_total_shards - sum(len(v) for v in todo.values())

    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (no CUDA device available)" \
        if not torch.cuda.is_available() else "CPU"
    who = f"rank {rank}/{world_size}, " if world_size > 1 else ""
    par = f"{workers} decode workers" + (f", {threads} torch threads" if threads else "")
    _say(f"{who}device {dev} [{devname}], precision {prec}, preprocess {preprocess}, decode {decode_on}, "
         f"{par}{', compiled' if compile else ''}, {len(source)} samples, backbones "
         f"{', '.join(k + (' (RANDOM INIT)' if k in result.random_init else '') for k in keys)}")
    if not work:
        _say(f"{who}nothing to extract: every shard exists ({result.shards_skipped} skipped)")
    else:
        old_threads = torch.get_num_threads()
        if threads:  # an explicit setting holds on every device (host-side work runs on it)
            torch.set_num_threads(threads)
        try:
            _run(source, loaded, recipes, work, todo, writer, dev, prec, batch_size, workers,
                 compression, progress and rank == 0, result, who, decode_on, compile, channels_last)
        finally:
            torch.set_num_threads(old_threads)
    barrier()  # every rank's shards are on disk before the index is built
    if world_size > 1:  # job totals (throughput stays this rank's own)
        result.rank_rows_processed = result.rows_processed
        result.rows_processed, result.shards_written, result.errors = all_sum(
            [result.rows_processed, result.shards_written, result.errors])
    if finalize and rank == 0:
        _write_stats(writer, result)
        writer.finalize()
    result.seconds = time.perf_counter() - t0
    return result


class _Pending(NamedTuple):
    rows: np.ndarray
    outs: dict      # key -> float32 host tensor (being copied asynchronously on CUDA)
    errors: list
    done: object    # torch.cuda.Event or None
    timing: dict    # key -> seconds (float) or (start, end) CUDA events
    inputs: np.ndarray | None  # (B, 3) size, mtime_ns, content hash of the files read
    x: dict | None = None  # fp16 only: key -> the model's input, to recompute an overflow in fp32


def _recompute_fp32(forward, x) -> np.ndarray:
    """A batch's features without autocast: fp16's range (65,504) overflows on some weights'
    activations, fp32's does not; the cache then refuses only what is non-finite in fp32 too."""
    with torch.inference_mode():
        return forward(x).float().cpu().numpy()


def _make_loader(source, work, recipes, ref_configs, decode_on, batch_size, workers, dev):
    dataset = _DecodeDataset(source, recipes, ref_configs, decode_on)
    # In flight: about 8 batches ahead of the device, however many workers decode them.
    prefetch = max(2, -(-8 // workers)) if workers > 0 else None
    return DataLoader(
        dataset, batch_sampler=_ShardBatchSampler(work, batch_size), num_workers=workers,
        collate_fn=_Collate(recipes, ref_configs, decode_on), pin_memory=dev.type == "cuda",
        prefetch_factor=prefetch, persistent_workers=False)  # one pass: nothing to persist for


def _run(source, loaded, recipes, work, todo, writer, dev, prec, batch_size, workers,
         compression, progress, result, who, decode_on="cpu", compile=False, channels_last=True) -> None:
    from tqdm.auto import tqdm

    ref_configs = {k: lb.data_config for k, lb in loaded.items() if k not in recipes}
    loader = _make_loader(source, work, recipes, ref_configs, decode_on, batch_size, workers, dev)
    cuda = dev.type == "cuda"
    norm = {k: Normalizer(loaded[k].data_config, dev, channels_last) for k in recipes}
    fwd = {k: _Forward(k, inference_model(lb, channels_last), compile, batch_size, channels_last)
           for k, lb in loaded.items()}
    result.compiled = bool(compile)
    fwd_seconds = {k: 0.0 for k in loaded}
    fwd_rows = {k: 0 for k in loaded}
    thread = _ShardWriterThread(writer, compression)
    assembler = _ShardAssembler(work, todo, {k: lb.dim for k, lb in loaded.items()}, thread, result)
    n_rows = sum(e - s for s, e in work)
    bar = tqdm(total=n_rows, unit="img", desc=f"extract {who}".strip(), disable=not progress,
               dynamic_ncols=True, file=sys.stderr)

    def retire(p: _Pending) -> None:
        if p.done is not None:
            p.done.synchronize()
        outs = {}
        for key, out in p.outs.items():
            out = out.numpy()
            if p.x is not None and not np.isfinite(out).all():
                out = _recompute_fp32(fwd[key], p.x[key])
                result.fp32_retries += 1
            if out.shape != (len(p.rows), loaded[key].dim):
                raise RuntimeError(f"{key}: model output shape {out.shape}, expected "
                                   f"({len(p.rows)}, {loaded[key].dim})")
            outs[key] = out
            t = p.timing[key]
            if t is not None:  # None: a compiling first call, not a measure of throughput
                fwd_seconds[key] += t[0].elapsed_time(t[1]) / 1000.0 if isinstance(t, tuple) else t
                fwd_rows[key] += len(p.rows)
        assembler.add(p.rows, outs, p.errors, p.inputs)
        result.rows_processed += len(p.rows)
        result.errors += len(p.errors)
        bar.update(len(p.rows))
        if p.errors:
            bar.set_postfix(errors=result.errors)

    pending: _Pending | None = None
    try:
        for batch_rows, batch, errors, inputs in loader:
            shard = assembler.shard_of(int(batch_rows[0]))
            x_dev = _to_device_batch(batch, batch_rows, errors, dev, recipes, source)
            outs, timing = {}, {}
            kept = {} if prec == "fp16" else None
            for key in todo[shard]:
                if cuda:
                    ev0 = torch.cuda.Event(enable_timing=True)
                    ev0.record()
                else:
                    tf = time.perf_counter()
                if key in norm:
                    x = norm[key](x_dev[key])
                else:
                    x = x_dev[key].contiguous(memory_format=torch.channels_last) if channels_last else x_dev[key]
                with torch.inference_mode(), autocast_context(dev, prec):
                    out = fwd[key](x)
                # Asynchronous copy back (into pinned memory on CUDA); read at retire time.
                outs[key] = out.float().to("cpu", non_blocking=cuda)
                if kept is not None:
                    kept[key] = x
                if cuda:
                    ev1 = torch.cuda.Event(enable_timing=True)
                    ev1.record()
                    timing[key] = (ev0, ev1)
                else:
                    timing[key] = time.perf_counter() - tf
                if fwd[key].compiled is not None and fwd[key].calls == 1:
                    timing[key] = None
            done = None
            if cuda:
                done = torch.cuda.Event()
                done.record()
            # Retire the previous batch only now: on a GPU, this batch is already queued.
            if pending is not None:
                retire(pending)
            pending = _Pending(batch_rows, outs, errors, done, timing, inputs, kept)
        if pending is not None:
            retire(pending)
            pending = None
    finally:
        bar.close()
        thread.close()
    if result.fp32_retries:
        _say(f"{who}{result.fp32_retries} batch(es) overflowed float16 and were recomputed in fp32")
    result.images_per_second = {k: (fwd_rows[k] / fwd_seconds[k] if fwd_seconds[k] else None) for k in loaded}
    if result.errors:
        _say(f"{who}{result.errors} inputs failed to decode; recorded in the cache's error table")


def _write_stats(writer: CacheWriter, result: ExtractResult) -> None:
    """Keep the latest measured forward throughput per backbone (shown by info and reports)."""
    for key, ips in result.images_per_second.items():
        if ips:
            _atomic_write_text(writer.generation(key) / "stats.json",
                               json.dumps({"images_per_second": ips, "device": result.device,
                                           "precision": result.precision}))
