"""The HDF5 feature cache: the one contract between extraction (GPU side) and heads (CPU side).

Only this module touches h5py. Layout (see ../shared/design.md)::

    cache/NAME.h5                       index (small), rewritten atomically (tmp + os.replace)
      attrs: format_version, featstack_version, dataset_fingerprint, created_utc, n_samples
      /samples/id, /samples/label, /samples/split, /classes
      /errors/row, /errors/id, /errors/message          inputs that failed to decode
      /features/<key>   (N, D) virtual dataset over the shards; attrs: metadata + fingerprint,
                        complete, shards (JSON), missing (JSON)
    cache/NAME.shards/<key>/writer.lock                 flock: one writer per (cache, backbone)
    cache/NAME.shards/<key>/CURRENT.json                {"current": "gN", "previous": "gM"}
    cache/NAME.shards/<key>/gN/backbone.json            metadata + fingerprint + shard_rows
    cache/NAME.shards/<key>/gN/<start>-<stop>.h5        immutable shard: features, rows, errors;
                                                        attrs start, stop, fingerprint, checksum
    cache/NAME.shards/<key>/gN/verified.json            last `featstack verify` of that generation

Generations: ``--overwrite`` writes a new generation beside the one in use and switches
CURRENT.json (then the index) to it when complete; the previous one is kept for readers that
opened it. Every read checks each shard's row range and fingerprint against the index;
`featstack verify` also checks the blake2b checksum of the feature bytes. Reads go to the
shards of the generation the reader opened, not through the index's virtual dataset: a plain
(uncompressed) shard's rows are one run of bytes in its file, read as a memory-mapped view and
copied (converted) straight into the output; compressed shards are decoded by HDF5.

Why shards: HDF5 does not survive a writer killed mid-write. A shard is written under a
temporary name, closed, then renamed, so it is either complete or absent; resuming means
skipping the shards that exist. A virtual dataset reads a missing source as its fill value
(NaN) without complaint, so every read checks coverage against the shard list first: a missing
shard is an error, never silent NaNs.

The reader (:class:`Cache`) holds no open file handle between calls, so it can be pickled to
joblib/dask workers, which reopen the file by path.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from . import __version__
from .config import DEFAULT_SHARD_ROWS  # noqa: F401  (one default: the extract setting)
from .errors import CacheError, CacheMismatchError, DataError
from .locks import FileLock, check_job_holds, locking_enabled

FORMAT_VERSION = 1
#: where a labelled row can go; rows without a label (a loose folder of images, a manifest
#: without labels) get the split "unlabelled", never "train"
LABELLED_SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"
SPLITS = (*LABELLED_SPLITS, UNLABELLED)
CHUNK_BYTES = 1 << 20
_STR = h5py.string_dtype("utf-8")
_SHARD_RE = re.compile(r"^(\d+)-(\d+)\.h5$")
_GEN_RE = re.compile(r"^g(\d+)$")
POINTER = "CURRENT.json"        # per backbone folder: {"current": "gN", "previous": "gM"}
LOCK_NAME = "writer.lock"       # per backbone folder: one writer at a time
INDEX_LOCK_NAME = "index.lock"  # per shard root: one index build at a time
VERIFIED_NAME = "verified.json"  # per generation: when `featstack verify` last ran, what was bad
# Temp files older than this were left by an earlier, killed run (see _remove_stale_tmp).
RUN_STARTED = time.time()
# Metadata fields that decide what a feature matrix means. Versions and paths are recorded
# but left out: upgrading torch, or moving a weights file with the same bytes, does not make
# a matrix stale; different weights, preprocessing, storage dtype or rows do.
FINGERPRINT_FIELDS = (
    "key", "timm_name", "weights_sha256", "data_config", "preprocess", "dtype", "dim",
    "dataset_fingerprint",
)
# Counted in the fingerprint when present (extracted backbones record them; array caches do not).
# "source" (a model family other than timm) and "layer" (an intermediate layer) likewise;
# "preprocess_version" for the fast path (featstack.preprocess.PREPROCESS_VERSION).
OPTIONAL_FINGERPRINT_FIELDS = ("decode", "source", "layer", "preprocess_version")
# The fingerprint fields set by extraction settings rather than by the model and its weights.
SETTING_FINGERPRINT_FIELDS = ("preprocess", "dtype", "decode")
# What makes feature vectors comparable across caches (a saved model's fingerprint): the
# cache's fields without the dataset (a model predicts on other datasets) and the storage dtype
# (float16 and float32 storage of one extractor differ by rounding only). "decode" counts as
# null when absent (as in every model saved so far); other optional fields when present.
FEATURE_FINGERPRINT_FIELDS = tuple(f for f in FINGERPRINT_FIELDS
                                   if f not in ("dataset_fingerprint", "dtype")) + ("decode",)


def feature_fingerprint_fields(meta: dict) -> dict:
    """The part of a backbone's metadata a saved model's feature fingerprint covers."""
    fields = {f: meta.get(f) for f in FEATURE_FINGERPRINT_FIELDS}
    fields.update({f: meta[f] for f in OPTIONAL_FINGERPRINT_FIELDS if f in meta})
    return fields


def _shown(value) -> str:
    """A fingerprint field's value as one short token of an error line (hashes cut to 12)."""
    if isinstance(value, str) and len(value) >= 32 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    text = repr(value) if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_differences(saved: dict, found: dict, fields: Sequence[str] | None = None, *,
                            labels: tuple[str, str] = ("saved", "found")) -> str:
    """``"differs in: preprocess (saved 'fast', found 'reference'), ..."``: the one wording of
    every fingerprint refusal (extract, predict, evaluate, export, run), so the user sees which
    setting to change instead of two hashes. A mapping field (data_config) names its entries
    that differ. ``fields``: the fields to compare (default: every fingerprint field)."""
    fields = fields if fields is not None else FINGERPRINT_FIELDS + OPTIONAL_FINGERPRINT_FIELDS
    parts = []
    for f in fields:
        a, b = saved.get(f), found.get(f)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            pairs = [(f"{f}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
        else:
            pairs = [(f, a, b)]
        parts += [f"{name} ({labels[0]} {_shown(x)}, {labels[1]} {_shown(y)})" for name, x, y in pairs]
    return "differs in: " + (", ".join(parts) or "the fingerprint format")


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def split_mask(splits: np.ndarray, split: str) -> np.ndarray:
    """Rows of one split (an unknown split name is an error, not an empty selection)."""
    if split not in SPLITS:
        raise CacheError(f"unknown split {split!r}: splits are {', '.join(SPLITS)}")
    return np.asarray(splits) == split


def select_rows(labels: np.ndarray, splits: np.ndarray, split: str | None = None, labelled: bool = True,
                valid: np.ndarray | None = None) -> np.ndarray:
    """The one row selection (training, scoring, fine-tuning): indices of the rows in ``split``
    (None: any), labelled unless ``labelled=False``, and ``valid`` (input decoded) when given."""
    mask = np.ones(len(labels), dtype=bool) if valid is None else np.array(valid, dtype=bool)
    if split is not None:
        mask &= split_mask(splits, split)
    if labelled:
        mask &= np.asarray(labels) >= 0
    return np.flatnonzero(mask)


@dataclass
class SampleTable:
    """The rows of a cache: ids, labels, splits and class names, fixed before extraction.

    ``content`` holds optional per-sample content keys (array hashes) that go into the dataset
    fingerprint. ``sizes`` and ``mtimes`` (ns) are the input files' stats when listed: not in the
    fingerprint (a replaced image changes its rows, not the dataset), compared with what each
    shard recorded when it read the file (see :meth:`CacheWriter.input_changes`).
    """

    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    classes: list
    content: np.ndarray | None = None
    sizes: np.ndarray | None = None
    mtimes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray([str(i) for i in self.ids], dtype=object)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.splits = np.asarray([str(s) for s in self.splits], dtype=object)
        self.classes = [str(c) for c in self.classes]
        n = len(self.ids)
        if n == 0:
            raise DataError("the data source has no samples")
        if len(self.labels) != n or len(self.splits) != n:
            raise DataError(
                f"ids, labels and splits differ in length ({n}, {len(self.labels)}, {len(self.splits)})")
        if self.content is not None and len(self.content) != n:
            raise DataError(f"content keys: {len(self.content)} for {n} samples")
        if (self.sizes is None) != (self.mtimes is None):
            raise DataError("file sizes and mtimes come together")
        if self.sizes is not None:
            self.sizes = np.asarray(self.sizes, dtype=np.int64).reshape(-1)
            self.mtimes = np.asarray(self.mtimes, dtype=np.int64).reshape(-1)
            if len(self.sizes) != n or len(self.mtimes) != n:
                raise DataError(f"file stats: {len(self.sizes)} sizes, {len(self.mtimes)} mtimes for {n} samples")
        seen: dict[str, int] = {}
        for row, sid in enumerate(self.ids):
            if sid in seen:
                raise DataError(f"duplicate sample id {sid!r} at rows {seen[sid]} and {row}")
            seen[sid] = row
        bad = [s for s in set(self.splits) if s not in SPLITS]
        if bad:
            raise DataError(f"unknown split {sorted(bad)[0]!r}: splits are {', '.join(SPLITS)}")
        if len(set(self.classes)) != len(self.classes):
            raise DataError("class names are not unique")
        lo, hi = (int(self.labels.min()), int(self.labels.max()))
        if lo < -1 or hi >= len(self.classes):
            row = int(np.argmax((self.labels < -1) | (self.labels >= len(self.classes))))
            raise DataError(
                f"label {int(self.labels[row])} of sample {self.ids[row]!r} is outside "
                f"0..{len(self.classes) - 1} (-1 = unlabeled)")

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, split: str | None = None, labelled: bool = True) -> np.ndarray:
        """Rows of a data source by :func:`select_rows` (whether each input decodes is known only
        once it is read: the caller skips failures then)."""
        return select_rows(self.labels, self.splits, split, labelled)

    def fingerprint(self) -> str:
        """sha256 over everything that fixes what row i means."""
        content = b"" if self.content is None else "\0".join(map(str, self.content)).encode()
        return _sha256(
            _canonical_json(self.classes).encode(),
            "\0".join(self.ids).encode(),
            self.labels.astype("<i8").tobytes(),
            "\0".join(self.splits).encode(),
            content,
        )


class NonFiniteFeaturesError(CacheError):
    """A backbone produced inf/NaN, or values the storage dtype cannot hold."""


def _some(items: Sequence, k: int = 10) -> str:
    """Up to ``k`` items, then how many more."""
    items = list(items)
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(map(str, items[:k])) + more


def backbone_fingerprint(meta: dict) -> str:
    """sha256 of the metadata fields that decide what a backbone's feature matrix means."""
    missing = [f for f in FINGERPRINT_FIELDS if f not in meta]
    if missing:
        raise ValueError(f"backbone metadata lacks {missing}")
    fields = {f: meta[f] for f in FINGERPRINT_FIELDS}
    fields.update({f: meta[f] for f in OPTIONAL_FINGERPRINT_FIELDS if f in meta})
    return _sha256(_canonical_json(fields).encode())


def safe_key(key: str) -> str:
    """A backbone key usable as one path component and one HDF5 name."""
    return key.replace("/", "__").replace(":", "_")


def shard_root(index_path: str | os.PathLike) -> Path:
    p = Path(index_path)
    return p.with_name(p.stem + ".shards") if p.suffix else p.with_name(p.name + ".shards")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from e


def _write_hdf5(path: Path, fill) -> None:
    """Build an HDF5 file in memory with ``fill(f)``, then write its bytes under a temp name and
    rename. A full disk or a denied write is then a plain OSError, reported naming the file:
    HDF5 itself does not recover from failed writes (errors at close, even heap corruption).
    A crash leaves the complete file or none (plus a temp file the next run removes)."""
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        tmp.unlink(missing_ok=True)


def _write_error(path: Path, e: OSError) -> CacheError:
    """An OS or HDF5 error while writing, as one line naming the file (disk full, permission
    denied, ...). Files are written to a temp name and renamed, so what was written is intact."""
    text = e.strerror or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return CacheError(f"{path}: cannot write ({text}); the shards already written are intact, "
                      "re-run the same command to resume")


def _chunk_rows(dim: int, itemsize: int, rows: int) -> int:
    return max(1, min(rows, CHUNK_BYTES // max(1, dim * itemsize)))


def _list_shards(folder: Path) -> list[tuple[int, int, Path]]:
    out = []
    if folder.is_dir():
        for entry in folder.iterdir():
            m = _SHARD_RE.match(entry.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), entry))
    return sorted(out)


def _coverage(shards: Sequence[tuple[int, int, Path]], n: int) -> tuple[list, list]:
    """(missing ranges, overlapping ranges) of a shard list against rows 0..n."""
    missing, overlap, pos = [], [], 0
    for start, stop, _ in shards:
        if start > pos:
            missing.append([pos, start])
        elif start < pos:
            overlap.append([start, min(stop, pos)])
        pos = max(pos, stop)
    if pos < n:
        missing.append([pos, n])
    return missing, overlap


@dataclass
class _Plan:
    """What one writer writes for one backbone: the generation folder and the fingerprint,
    and the generation the pointer named when planned (re-checked before every shard)."""

    gen: Path
    fingerprint: str
    current: str


def _read_pointer(folder: Path) -> dict:
    """``{"current": "g2", "previous": "g1"}`` of a backbone folder ({} when none yet)."""
    p = folder / POINTER
    if not p.exists():
        if (folder / "backbone.json").exists():
            raise CacheError(f"{folder}: written by an older featstack (no generations); "
                             "delete that folder and re-extract, or use another cache")
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise CacheError(f"{p}: damaged generation pointer ({e}); delete it and re-extract") from e


def _read_meta(gen: Path | None) -> dict | None:
    p = None if gen is None else gen / "backbone.json"
    return json.loads(p.read_text()) if p is not None and p.exists() else None


def current_generation(folder: str | os.PathLike) -> Path | None:
    """The generation folder a backbone folder's pointer names (None: nothing written yet)."""
    name = _read_pointer(Path(folder)).get("current")
    return Path(folder) / name if name else None


def generation_dir(index_path: str | os.PathLike, key: str) -> Path | None:
    """Folder of the shards a backbone's features currently come from."""
    return current_generation(shard_root(index_path) / safe_key(key))


def _generations(folder: Path) -> list[Path]:
    gens = [p for p in folder.iterdir() if p.is_dir() and _GEN_RE.match(p.name)] if folder.is_dir() else []
    return sorted(gens, key=lambda p: int(p.name[1:]))


def _remove_stale_tmp(folder: Path, pattern: str = "*.tmp") -> None:
    """Temp files older than this run were left by a killed writer: nobody will finish them."""
    for tmp in folder.glob(pattern):
        try:
            if tmp.stat().st_mtime < RUN_STARTED:
                tmp.unlink()
        except OSError:
            pass


def features_checksum(features: np.ndarray) -> str:
    """blake2b of a feature block's bytes (little-endian, C order), as stored in a shard."""
    a = np.ascontiguousarray(features)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return "blake2b:" + hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def shard_problem(path: Path, start: int, stop: int, fingerprint: str, *,
                  checksum: bool = False, locking: bool | None = None) -> str | None:
    """Why a shard cannot be trusted for rows [start, stop) of this fingerprint, or None.

    Cheap (attributes only) unless ``checksum``: then the feature bytes are hashed and
    compared with the checksum written with them.
    """
    return inspect_shard(path, start, stop, fingerprint, checksum=checksum, locking=locking)[0]


def inspect_shard(path: Path, start: int, stop: int, fingerprint: str, *, checksum: bool = False,
                  locking: bool | None = None) -> tuple[str | None, list | None]:
    """(:func:`shard_problem`, where its feature rows lie in the file): one open of the file
    for both, so a reader checks a shard and learns how to read it at the cost of one."""
    try:
        with h5py.File(path, "r", locking=locking) as f:
            ds = f["features"]  # looked up once: each lookup costs as much as a check
            why = _shard_attr_problem(f.attrs, ds, start, stop, fingerprint, checksum)
            runs = None if why else raw_row_runs(ds)
            row_bytes = 0 if runs is None else ds.shape[1] * ds.dtype.itemsize
        # a view past the end of the file would crash the reader (SIGBUS) instead of raising
        if runs and max(off + (hi - lo) * row_bytes for lo, hi, off in runs) > os.path.getsize(path):
            return "is shorter than its feature rows (truncated)", None
        return why, runs
    except FileNotFoundError:
        return "missing", None
    except (OSError, KeyError, ValueError, TypeError) as e:
        return f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})", None


def _shard_attr_problem(a, ds, start: int, stop: int, fingerprint: str, checksum: bool) -> str | None:
    got = (int(a.get("start", -1)), int(a.get("stop", -1)))
    if got != (start, stop):
        return f"holds rows {got[0]}-{got[1]}, the index expects {start}-{stop}"
    if a.get("fingerprint") != fingerprint:
        return "written under another backbone fingerprint"
    if ds.shape[0] != stop - start:
        return f"holds {ds.shape[0]} feature rows, expected {stop - start}"
    if checksum:
        want = a.get("checksum")
        if want is None:
            return "has no checksum (written by an older featstack)"
        if features_checksum(ds[()]) != want:
            return "checksum mismatch: its feature bytes changed after they were written"
    return None


def raw_row_runs(ds) -> list[tuple[int, int, int]] | None:
    """Where a 2-D dataset's rows lie in its file, as runs ``[(row_lo, row_hi, byte_offset)]``
    of rows stored back to back (row-major, native byte order), or None when the bytes are not
    the values (filters such as compression, a foreign byte order) or not all allocated.

    A shard's chunks span full rows and are written in order, so its runs merge into one: a
    read is then a view of the file (no HDF5 call, no per-chunk Python)."""
    shape, dtype, dsid = ds.shape, ds.dtype, ds.id
    if len(shape) != 2 or not dtype.isnative or dtype.kind != "f":
        return None
    plist = dsid.get_create_plist()
    if plist.get_nfilters():
        return None
    row_bytes = shape[1] * dtype.itemsize
    layout = plist.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dsid.get_offset()
        return None if offset is None else [(0, shape[0], int(offset))]
    per, width = plist.get_chunk() if layout == h5py.h5d.CHUNKED else (0, 0)
    n_chunks = -(-shape[0] // per) if per else 0
    if width != shape[1] or dsid.get_num_chunks() != n_chunks:
        return None
    runs: list[list[int]] = []
    for info in sorted((dsid.get_chunk_info(i) for i in range(n_chunks)), key=lambda c: c.chunk_offset[0]):
        lo = int(info.chunk_offset[0])
        hi = min(lo + per, shape[0])
        if runs and runs[-1][1] == lo and runs[-1][2] + (lo - runs[-1][0]) * row_bytes == info.byte_offset:
            runs[-1][1] = hi
        else:
            runs.append([lo, hi, int(info.byte_offset)])
    return [tuple(r) for r in runs]


class CacheWriter:
    """Writes one cache: checks the dataset, plans the missing shards, writes them atomically,
    and rebuilds the index.

    One writer per (cache, backbone): :meth:`plan_backbone` takes an OS file lock on the
    backbone (see :mod:`featstack.locks`) held until :meth:`finalize` or :meth:`release`. A
    second writer is refused at once naming the holder, or waits with ``wait=True``. torchrun
    ranks > 0 (``follower=True``) write disjoint shards under their rank 0's lock.

    ``--overwrite`` never touches the shards in use: a backbone cached with another fingerprint
    gets a new generation folder beside the current one, and the pointer (then the index) is
    switched to it only when it is complete. Readers that opened the old generation keep
    reading it (the previous generation is kept until the next overwrite).
    """

    def __init__(self, path: str | os.PathLike, samples: SampleTable, *, locking: bool | None = None,
                 lock: bool | None = None, wait: bool = False, follower: bool = False, say=None,
                 check_finite: bool = True):
        self.path = Path(path)
        self.samples = samples
        self.locking = locking
        self.lock_enabled = locking_enabled(lock)
        self.wait = wait
        self.follower = follower
        self.say = say
        self.check_finite = check_finite
        self.root = shard_root(self.path)
        self.dataset_fingerprint = samples.fingerprint()
        self._locks: dict[str, FileLock] = {}
        self._plans: dict[str, _Plan] = {}
        if self.path.exists():
            try:
                with h5py.File(self.path, "r", locking=locking) as f:
                    old = f.attrs.get("dataset_fingerprint")
                    old_n = int(f.attrs.get("n_samples", -1))
            except OSError as e:
                raise CacheError(f"{self.path}: exists but is not a readable HDF5 file ({e}); "
                                 "move it away or pick another --cache path") from e
            if old is None:
                raise CacheError(f"{self.path}: exists but is not a featstack cache")
            if old != self.dataset_fingerprint:
                raise CacheMismatchError(
                    f"{self.path} was built from another dataset ({old_n} samples, fingerprint "
                    f"{str(old)[:12]}) than this one ({len(samples)} samples, fingerprint "
                    f"{self.dataset_fingerprint[:12]}{self._id_changes()}); use another --cache path "
                    "or delete it")

    def _id_changes(self) -> str:
        """', files added: ..., removed: ...' between the cached sample ids and these."""
        try:
            with h5py.File(self.path, "r", locking=self.locking) as f:
                old = set(f["samples/id"].asstr()[()])
        except (OSError, KeyError):
            return ""
        new = set(self.samples.ids)
        parts = [f"{len(ids)} {what}: {_some(sorted(ids))}"
                 for what, ids in (("added", new - old), ("removed", old - new)) if ids]
        return "; files " + ", ".join(parts) if parts else "; same files, other labels/splits/classes"

    def input_changes(self) -> tuple[dict, list]:
        """Input files changed since the shards that hold their rows read them.

        Compares each shard's recorded (size, mtime_ns) per row with the files' stats now (no
        file is read). Returns ({key: [stale shard paths]}, sorted changed rows); empty for
        sources without files (arrays: their content is in the dataset fingerprint)."""
        stale: dict[str, list] = {}
        rows: set = set()
        if self.samples.sizes is None or not self.root.is_dir():
            return stale, []
        now = np.stack([self.samples.sizes, self.samples.mtimes], axis=1)
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for gen in _generations(folder):
                meta = _read_meta(gen)
                for start, stop, shard in _list_shards(gen) if meta else ():
                    try:
                        with h5py.File(shard, "r", locking=self.locking) as f:
                            rec = f["inputs"][()] if "inputs" in f else None
                    except OSError:
                        continue  # a damaged shard is reported by the shard checks
                    if rec is None or rec.shape != (stop - start, 3):
                        continue
                    diff = np.flatnonzero((rec[:, :2] != now[start:stop]).any(axis=1))
                    if len(diff):
                        stale.setdefault(meta["key"], []).append(shard)
                        rows.update((start + diff).tolist())
        return stale, sorted(rows)

    def refresh(self, stale: dict) -> None:
        """Delete the stale shards (under each backbone's lock), so they are extracted again."""
        self.lock_backbones(stale)
        for shards in stale.values():
            for shard in shards:
                shard.unlink(missing_ok=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def backbone_dir(self, key: str) -> Path:
        return self.root / safe_key(key)

    def generation(self, key: str) -> Path:
        """The generation folder this writer writes the backbone's shards into."""
        if key not in self._plans:
            raise CacheError(f"backbone {key!r} was not planned in {self.path}")
        return self._plans[key].gen

    def read_backbone_meta(self, key: str) -> dict | None:
        """Metadata of the backbone's current generation (None when not cached)."""
        return _read_meta(current_generation(self.backbone_dir(key)))

    def cached_keys(self) -> list[str]:
        """Keys of every backbone with a current generation in this cache."""
        if not self.root.is_dir():
            return []
        metas = (_read_meta(current_generation(d)) for d in sorted(self.root.iterdir()) if d.is_dir())
        return [m["key"] for m in metas if m]

    # ------------------------------------------------------------------ locks
    def lock_backbones(self, keys: Iterable[str]) -> None:
        """Take the write lock of every backbone (in one fixed order, so two writers that
        wait for each other's backbones cannot deadlock)."""
        for key in sorted(set(keys), key=safe_key):
            self._lock(key)

    def _lock(self, key: str) -> None:
        if not self.lock_enabled or key in self._locks:
            return
        path = self.backbone_dir(key) / LOCK_NAME
        what = f"{self.path}: backbone {key!r}"
        if self.follower:
            check_job_holds(path, what)
            self._locks[key] = FileLock(path, what)  # rank 0's lock; nothing to release here
            return
        lock = FileLock(path, what)
        try:
            lock.acquire(wait=self.wait, on_wait=self.say)
        except BaseException:
            self.release()
            raise
        self._locks[key] = lock

    def release(self) -> None:
        """Drop every lock this writer holds (the kernel does it too when the process dies)."""
        for lock in self._locks.values():
            lock.release()
        self._locks.clear()

    # ------------------------------------------------------------------ planning
    def plan_backbone(self, meta: dict, *, shard_rows: int = DEFAULT_SHARD_ROWS,
                      overwrite: bool = False, repair: bool = False) -> list[tuple[int, int]]:
        """Lock and register a backbone; return the row ranges whose shards are still missing.

        An existing backbone with another fingerprint is refused unless ``overwrite``: then a
        new generation is started (or a pending one of this fingerprint resumed). An existing
        one with the same fingerprint keeps its shard size, so a resumed run writes exactly the
        shards the first run would have. Existing shards are checked (rows, fingerprint,
        readable); a bad one is an error naming it, unless ``repair``: then every shard's
        checksum is verified too and the bad ones are deleted, so they are planned again.
        """
        meta = dict(meta, dataset_fingerprint=self.dataset_fingerprint)
        meta["fingerprint"] = backbone_fingerprint(meta)
        if shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        key = meta["key"]
        folder = self.backbone_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        self._lock(key)
        ptr = _read_pointer(folder)
        cur = ptr.get("current")
        old = _read_meta(folder / cur) if cur else None
        if old is None:
            gen = self._start_generation(folder, meta, shard_rows)
            if not self.follower:
                self._write_pointer(folder, gen.name, None)
            cur = gen.name
        elif old.get("fingerprint") == meta["fingerprint"]:
            gen = folder / cur
        else:
            if not overwrite:
                diff = fingerprint_differences(old, meta, labels=("cached", "now"))
                raise CacheMismatchError(
                    f"{self.path}: backbone {key!r} is cached with another fingerprint "
                    f"({diff}); pass --overwrite to replace it")
            gen = self._start_generation(folder, meta, shard_rows, keep=cur)
        self._plans[key] = _Plan(gen, meta["fingerprint"], cur)
        rows = int(_read_meta(gen)["shard_rows"])
        if not self.follower:
            _remove_stale_tmp(gen)
            self._check_existing(key, gen, meta["fingerprint"], repair)
        n = len(self.samples)
        have = {(s, e) for s, e, _ in _list_shards(gen)}
        return [(s, min(s + rows, n)) for s in range(0, n, rows) if (s, min(s + rows, n)) not in have]

    def _start_generation(self, folder: Path, meta: dict, shard_rows: int, keep: str | None = None) -> Path:
        """A generation folder for ``meta``: a pending one of the same fingerprint is resumed;
        otherwise a new one is made, and pending generations of other fingerprints dropped."""
        for gen in _generations(folder):
            if gen.name != keep and (_read_meta(gen) or {}).get("fingerprint") == meta["fingerprint"]:
                return gen
        if self.follower:
            raise CacheError(f"{folder}: rank 0 registered no generation for fingerprint "
                             f"{meta['fingerprint'][:12]}")
        for gen in _generations(folder):
            if gen.name != keep:
                shutil.rmtree(gen, ignore_errors=True)
        taken = [int(g.name[1:]) for g in _generations(folder)]
        gen = folder / f"g{max(taken, default=0) + 1}"
        gen.mkdir()
        meta = dict(meta, shard_rows=int(shard_rows))
        meta.setdefault("created_utc", _dt.datetime.now(_dt.timezone.utc).isoformat())
        _atomic_write_text(gen / "backbone.json", json.dumps(meta, indent=1, default=str))
        return gen

    def _write_pointer(self, folder: Path, current: str, previous: str | None) -> None:
        _atomic_write_text(folder / POINTER, json.dumps({"current": current, "previous": previous}))

    def _check_existing(self, key: str, gen: Path, fingerprint: str, repair: bool) -> None:
        """Refuse to build on a bad shard; with ``repair`` delete the bad ones instead."""
        for start, stop, shard in _list_shards(gen):
            why = shard_problem(shard, start, stop, fingerprint, checksum=repair, locking=self.locking)
            if why is None:
                continue
            if not repair:
                raise CacheError(f"{shard}: {why}; run `featstack verify {self.path}` and re-extract "
                                 "with --repair")
            if self.say:
                self.say(f"repair: {shard}: {why}; extracting its rows again")
            shard.unlink()
        if repair:
            (gen / VERIFIED_NAME).unlink(missing_ok=True)

    def _recheck(self, key: str) -> _Plan:
        """Before every shard: this writer's generation is still the one its backbone is
        heading to, with this fingerprint (nobody overwrote it meanwhile)."""
        plan = self._plans.get(key)
        if plan is None:
            raise CacheError(f"backbone {key!r} was not planned in {self.path}")
        if self.lock_enabled and not self.follower and not self._locks[key].held:
            raise CacheError(f"{self.path}: backbone {key!r}: write lock released; re-plan first")
        now = _read_pointer(self.backbone_dir(key)).get("current")
        meta = _read_meta(plan.gen)
        if now != plan.current or meta is None or meta.get("fingerprint") != plan.fingerprint:
            raise CacheMismatchError(
                f"{self.path}: backbone {key!r} was changed by another writer while this one ran "
                f"(now generation {now}); stopped before writing more. Re-run to continue")
        return plan

    # ------------------------------------------------------------------ writing
    def write_shard(self, key: str, start: int, stop: int, features: np.ndarray,
                    error_rows: Iterable[int] = (), error_messages: Iterable[str] = (),
                    inputs: np.ndarray | None = None, *, compression: str | None = None) -> Path:
        """Write rows [start, stop) of one backbone as an immutable shard (tmp, then rename).

        The shard records its row range, the backbone fingerprint and a checksum of its
        feature bytes; the fingerprint is re-checked first (see :meth:`_recheck`). ``inputs``:
        per row (size, mtime_ns, content hash) of the file the features were computed from."""
        plan = self._recheck(key)
        meta = _read_meta(plan.gen)
        features = np.asarray(features)
        if features.shape != (stop - start, meta["dim"]):
            raise ValueError(f"shard {key} {start}-{stop}: features of shape {features.shape}, "
                             f"expected {(stop - start, meta['dim'])}")
        dtype = np.dtype(meta["dtype"])
        error_rows = [int(r) for r in error_rows]
        if self.check_finite:
            self._check_finite(key, start, features, dtype, error_rows)
        stored = features.astype(dtype, copy=False)
        final = plan.gen / f"{start}-{stop}.h5"
        for stale in plan.gen.glob(f"{start}-{stop}.h5.*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
        rows = stop - start

        def fill(f) -> None:
            f.create_dataset("features", data=stored,
                             chunks=(_chunk_rows(meta["dim"], dtype.itemsize, rows), meta["dim"]),
                             compression=compression)
            f.create_dataset("rows", data=np.arange(start, stop, dtype=np.int64))
            if inputs is not None:
                f.create_dataset("inputs", data=np.asarray(inputs, dtype=np.int64).reshape(rows, 3))
            f.create_dataset("errors/row", data=np.asarray(list(error_rows), dtype=np.int64))
            f.create_dataset("errors/message", data=np.asarray(list(error_messages), dtype=object), dtype=_STR)
            f.attrs.update(key=key, start=start, stop=stop, fingerprint=meta["fingerprint"],
                           checksum=features_checksum(stored))
        _write_hdf5(final, fill)
        return final

    def _check_finite(self, key: str, start: int, features: np.ndarray, dtype: np.dtype,
                      error_rows: list) -> None:
        """Refuse non-finite features, and values the storage dtype cannot hold, before they are
        stored: otherwise every such row is inf or NaN and it shows only at training time.

        Refused rather than silently widened to float32: the user chooses (``--dtype float32``),
        and every shard of a backbone keeps one dtype."""
        ok = np.ones(len(features), dtype=bool)
        ok[np.asarray(error_rows, dtype=np.int64) - start] = False
        bad = ok & ~np.isfinite(features).all(axis=1)
        why, hint = "non-finite features (inf or NaN)", "check the weights and the inputs"
        if not bad.any() and np.issubdtype(dtype, np.floating) and dtype.itemsize < features.dtype.itemsize:
            limit = float(np.finfo(dtype).max)
            bad = ok & (np.abs(features) > limit).any(axis=1)
            if bad.any():
                why = (f"features beyond {dtype.name}'s range (|x| up to "
                       f"{float(np.abs(features[bad]).max()):.3g} > {limit:.0f})")
                hint = "extract with --dtype float32"
        if bad.any():
            rows = start + np.flatnonzero(bad)
            raise NonFiniteFeaturesError(
                f"{self.path}: backbone {key!r} gave {why} for {int(bad.sum())} rows of {start}-"
                f"{start + len(features)}, first {_some(self.samples.ids[rows].tolist(), 3)}; not stored "
                f"(shards already written are kept); {hint}")

    def finalize(self) -> Path:
        """Switch completed new generations in, rebuild the index, release the locks.

        Only one process (rank 0) finalizes; it still holds every backbone's lock."""
        try:
            if not self.follower:
                for key, plan in self._plans.items():
                    if plan.gen.name != plan.current and self._complete(plan.gen):
                        self._switch(key, plan)
            return build_index(self.path, self.samples, locking=self.locking, lock=self.lock_enabled)
        finally:
            self.release()

    def _complete(self, gen: Path) -> bool:
        rows = int(_read_meta(gen)["shard_rows"])
        missing, overlap = _coverage(_list_shards(gen), len(self.samples))
        return not missing and not overlap and rows > 0

    def _switch(self, key: str, plan: _Plan) -> None:
        """Point the backbone at its new generation; keep the previous one for open readers,
        delete older ones."""
        folder = self.backbone_dir(key)
        self._recheck(key)
        self._write_pointer(folder, plan.gen.name, plan.current)
        for gen in _generations(folder):
            if gen.name not in (plan.gen.name, plan.current):
                shutil.rmtree(gen, ignore_errors=True)
        plan.current = plan.gen.name


def build_index(path: str | os.PathLike, samples: SampleTable, *, locking: bool | None = None,
                lock: bool | None = None) -> Path:
    """Write the index file: samples, errors and one virtual dataset per backbone folder.

    Index builds are serialised by a lock (two writers of different backbones of one cache
    finish in either order; the last build sees both); temp files of killed builds are removed.
    """
    path = Path(path)
    root = shard_root(path)
    root.mkdir(parents=True, exist_ok=True)
    index_lock = FileLock(root / INDEX_LOCK_NAME, f"{path}: index")
    if locking_enabled(lock):
        index_lock.acquire(wait=True)
    try:
        _remove_stale_tmp(path.parent, f"{path.name}.*.tmp")
        return _build_index(path, samples, locking)
    finally:
        index_lock.release()


def _build_index(path: Path, samples: SampleTable, locking: bool | None) -> Path:
    root = shard_root(path)
    n = len(samples)
    errors: dict[int, str] = {}
    backbones = []
    inputs = np.tile(np.asarray([-1, -1, 0], np.int64), (n, 1))  # size, mtime_ns, hash as read
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        gen = current_generation(folder)
        meta = _read_meta(gen)
        if meta is None:
            continue
        stats = gen / "stats.json"
        if stats.exists():  # measured throughput; informative, not part of the fingerprint
            meta["images_per_second"] = json.loads(stats.read_text()).get("images_per_second")
        if meta.get("dataset_fingerprint") != samples.fingerprint():
            raise CacheMismatchError(
                f"{folder}: shards of another dataset; delete that folder or use another cache")
        meta["generation"] = os.path.relpath(gen, path.parent)
        shards = _list_shards(gen)
        for start, stop, shard in shards:
            why = shard_problem(shard, start, stop, meta["fingerprint"], locking=locking)
            if why is not None:
                raise CacheError(f"{shard}: {why}; re-extract with --repair")
            with h5py.File(shard, "r", locking=locking) as f:
                for r, m in zip(f["errors/row"][()], f["errors/message"].asstr()[()]):
                    errors.setdefault(int(r), m)
                if "inputs" in f:
                    got = f["inputs"][()]
                    unset = inputs[start:stop, 1] == -1
                    inputs[start:stop][unset] = got[unset]
        backbones.append((meta, shards))
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill(f) -> None:
        f.attrs.update(format_version=FORMAT_VERSION, featstack_version=__version__,
                       dataset_fingerprint=samples.fingerprint(), n_samples=n,
                       created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat())
        f.create_dataset("samples/id", data=samples.ids, dtype=_STR)
        f.create_dataset("samples/label", data=samples.labels)
        f.create_dataset("samples/split", data=samples.splits, dtype=_STR)
        f.create_dataset("samples/size", data=inputs[:, 0])
        f.create_dataset("samples/mtime_ns", data=inputs[:, 1])
        f.create_dataset("samples/content_hash", data=inputs[:, 2])
        f.create_dataset("classes", data=np.asarray(samples.classes, dtype=object), dtype=_STR)
        erows = np.asarray(sorted(errors), dtype=np.int64)
        f.create_dataset("errors/row", data=erows)
        f.create_dataset("errors/id", data=samples.ids[erows] if len(erows) else np.asarray([], dtype=object),
                         dtype=_STR)
        f.create_dataset("errors/message", data=np.asarray([errors[r] for r in erows], dtype=object),
                         dtype=_STR)
        feats = f.create_group("features")
        for meta, shards in backbones:
            dim, dtype = int(meta["dim"]), np.dtype(meta["dtype"])
            layout = h5py.VirtualLayout(shape=(n, dim), dtype=dtype)
            for start, stop, shard in shards:
                rel = os.path.relpath(shard, path.parent)
                layout[start:stop] = h5py.VirtualSource(rel, "features", shape=(stop - start, dim))
            ds = feats.create_virtual_dataset(safe_key(meta["key"]), layout, fillvalue=np.nan)
            missing, overlap = _coverage(shards, n)
            if overlap:
                raise CacheError(f"{root / safe_key(meta['key'])}: shards overlap at rows "
                                 f"{overlap[0]}; delete that folder and re-run")
            for k, v in meta.items():
                if v is not None:
                    ds.attrs[k] = v if isinstance(v, (str, int, float)) else _canonical_json(v)
            ds.attrs["complete"] = not missing
            ds.attrs["missing"] = _canonical_json(missing)
            ds.attrs["shards"] = _canonical_json(
                [[s, e, os.path.relpath(p, path.parent)] for s, e, p in shards])
    _write_hdf5(path, fill)
    return path


def _decode_attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


class Cache:
    """Read-only view of a cache file. ``featstack.open_cache(path)`` returns one.

    Rows are in sample order. Rows whose image failed to decode are listed in :attr:`errors`
    and read as NaN; :attr:`valid` masks them out.
    """

    def __init__(self, path: str | os.PathLike, *, locking: bool | None = None):
        self.path = Path(path)
        self.locking = locking
        if not self.path.exists():
            raise CacheError(f"{self.path}: no such cache file")
        try:
            with h5py.File(self.path, "r", locking=locking) as f:
                if "format_version" not in f.attrs:
                    raise CacheError(f"{self.path}: not a featstack cache (no format_version)")
                if int(f.attrs["format_version"]) > FORMAT_VERSION:
                    raise CacheError(f"{self.path}: cache format {int(f.attrs['format_version'])} "
                                     f"is newer than this featstack reads ({FORMAT_VERSION})")
                self.attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
                self.ids = f["samples/id"].asstr()[()].astype(object)
                self.labels = f["samples/label"][()].astype(np.int64)
                self.splits = f["samples/split"].asstr()[()].astype(object)
                self.classes = list(f["classes"].asstr()[()])
                self.error_rows = f["errors/row"][()].astype(np.int64)
                self.errors = [
                    {"row": int(r), "id": i, "message": m}
                    for r, i, m in zip(self.error_rows, f["errors/id"].asstr()[()],
                                       f["errors/message"].asstr()[()])]
                self._meta = {}
                self._checked: dict = {}
                for name, ds in f["features"].items():
                    meta = {k: _decode_attr(v) for k, v in ds.attrs.items()}
                    meta.setdefault("key", name)
                    meta["_name"] = name
                    self._meta[meta["key"]] = meta
        except OSError as e:
            raise CacheError(f"{self.path}: not a readable HDF5 file ({e})") from e
        except KeyError as e:
            raise CacheError(f"{self.path}: damaged cache index, missing {e}") from e

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, n={len(self)}, backbones={self.backbones})"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dataset_fingerprint(self) -> str:
        return self.attrs["dataset_fingerprint"]

    @property
    def backbones(self) -> list[str]:
        """Keys of the backbones whose features are complete, in index order."""
        return [k for k, m in self._meta.items() if m.get("complete")]

    @property
    def all_backbones(self) -> list[str]:
        """Every backbone the index lists, complete or not."""
        return list(self._meta)

    @property
    def valid(self) -> np.ndarray:
        """Boolean mask of the rows whose input decoded (error rows are False)."""
        mask = np.ones(len(self), dtype=bool)
        mask[self.error_rows] = False
        return mask

    def rows(self, split: str | None = None, labelled: bool = True) -> np.ndarray:
        """Indices of the rows to fit or score on: input decoded, in ``split`` (None: any),
        and labelled unless ``labelled=False`` (:func:`select_rows`)."""
        return select_rows(self.labels, self.splits, split, labelled, valid=self.valid)

    def split_mask(self, split: str) -> np.ndarray:
        return split_mask(self.splits, split)

    def backbone_info(self, key: str) -> dict:
        """Metadata of one backbone: timm name, weights, data config, versions, fingerprint..."""
        self._require_known(key)
        return {k: v for k, v in self._meta[key].items() if not k.startswith("_")}

    def fingerprint(self, key: str) -> str:
        return self.backbone_info(key)["fingerprint"]

    def dim(self, key: str) -> int:
        return int(self.backbone_info(key)["dim"])

    def _require_known(self, key: str) -> None:
        if key not in self._meta:
            have = ", ".join(self._meta) or "none"
            raise CacheError(f"{self.path}: backbone {key!r} is not in this cache (it has: {have})")

    def _require_complete(self, key: str) -> None:
        self._require_known(key)
        meta = self._meta[key]
        if not meta.get("complete"):
            raise CacheError(
                f"{self.path}: backbone {key!r} is incomplete (rows {meta.get('missing')} missing); "
                "re-run the extraction to resume it")
        problem = self._shard_problems(key, first=True)
        if problem:
            rel, why = problem[0]
            raise CacheError(f"{self.path.parent / rel}: shard of backbone {key!r} {why}; run "
                             f"`featstack verify {self.path}`, then re-extract with --repair")

    def _shard_problems(self, key: str, first: bool = False) -> list[tuple[str, str]]:
        """Cheap checks of a backbone's shards against the index: each file exists, holds the
        rows the index maps to it and was written under the index's fingerprint. A file is
        re-checked only when its (inode, size, mtime) changed since this reader last checked, and
        the check records where its rows lie in the file (:func:`raw_row_runs`) for the read."""
        meta = self._meta[key]
        out = []
        for start, stop, rel in meta.get("shards", []):
            shard = self.path.parent / rel
            try:
                st = shard.stat()
                sig = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                sig = None
            if sig is not None and self._checked.get(str(shard), (None,))[0] == (sig, meta["fingerprint"]):
                continue
            why, runs = ("is missing on disk", None) if sig is None else inspect_shard(
                shard, start, stop, meta["fingerprint"], locking=self.locking)
            if why is None:
                self._checked[str(shard)] = ((sig, meta["fingerprint"]), runs)
                continue
            out.append((rel, why))
            if first:
                break
        return out

    def features(self, keys: str | Sequence[str], rows: np.ndarray | None = None,
                 dtype=np.float32) -> np.ndarray:
        """Feature matrix of one or several backbones, concatenated along columns.

        ``rows`` (indices or a boolean mask) selects rows; the result keeps their order.
        """
        keys = [keys] if isinstance(keys, str) else list(keys)
        if not keys:
            raise CacheError("features() needs at least one backbone key")
        for k in keys:
            self._require_complete(k)
        n = len(self)
        if rows is None:
            idx = None
            m = n
        else:
            rows = np.asarray(rows)
            idx = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise CacheError(f"row index out of range 0..{n - 1}")
            m = len(idx)
        dims = [self.dim(k) for k in keys]
        out = np.empty((m, sum(dims)), dtype=dtype)
        plan = _RowPlan.of(idx, n)
        col = 0
        for key, d in zip(keys, dims):
            self._read_backbone(key, plan, out[:, col:col + d])
            col += d
        return out

    def _read_backbone(self, key: str, plan: "_RowPlan", out: np.ndarray) -> None:
        """Rows of one backbone into ``out``, from the shards of the generation this reader
        opened (checked just before by :meth:`_require_complete`): each shard's rows are a view
        of the file's bytes (:func:`raw_row_runs`), copied and converted straight into the
        output; shards whose bytes are not plain values are read through HDF5."""
        meta = self._meta[key]
        shards = meta.get("shards", [])
        bounds = plan.bounds([(start, stop) for start, stop, _ in shards])
        for (start, stop, rel), (a, b) in zip(shards, bounds):
            if a == b:
                continue
            path = self.path.parent / rel
            runs = self._checked.get(str(path), (None, None))[1]
            try:
                if runs is None:
                    _read_shard_hdf5(path, start, plan, a, b, out, self.locking)
                else:
                    _read_shard_raw(path, start, runs, (stop - start, out.shape[1]), np.dtype(meta["dtype"]),
                                    plan, a, b, out)
            except OSError as e:
                raise CacheError(f"{path}: cannot read backbone {key!r} ({e}); run "
                                 f"`featstack verify {self.path}`") from e

    def health(self, key: str) -> dict:
        """complete / incomplete / corrupt, the first problem found, and the last verification.

        corrupt = a shard fails the cheap checks now, or failed its checksum at the last
        `featstack verify` (and was not re-extracted since)."""
        self._require_known(key)
        meta = self._meta[key]
        verified = self._verified(key)
        problems = self._shard_problems(key, first=True)
        problems += [(b["file"], b["reason"]) for b in verified.get("bad", [])]
        if problems:
            state = "corrupt"
        else:
            state = "complete" if meta.get("complete") else "incomplete"
        return {"state": state,
                "problem": f"{self.path.parent / problems[0][0]}: {problems[0][1]}" if problems else None,
                "verified_utc": verified.get("verified_utc")}

    def _verified(self, key: str) -> dict:
        gen = self._meta[key].get("generation")
        p = self.path.parent / gen / VERIFIED_NAME if gen else None
        try:
            return json.loads(p.read_text()) if p is not None else {}
        except (OSError, ValueError):
            return {}

    def summary(self) -> dict:
        """Everything `featstack info` shows, as plain JSON-able data."""
        counts = {s: int(np.sum(self.splits == s)) for s in SPLITS}
        if not counts[UNLABELLED]:  # only sources with unlabelled rows show the split
            del counts[UNLABELLED]
        labelled = self.labels >= 0
        return {
            "path": str(self.path),
            "format_version": self.attrs.get("format_version"),
            "featstack_version": self.attrs.get("featstack_version"),
            "created_utc": self.attrs.get("created_utc"),
            "dataset_fingerprint": self.dataset_fingerprint,
            "n_samples": len(self),
            "n_labelled": int(labelled.sum()),
            "splits": counts,
            "classes": self.classes,
            "class_counts": {c: int(np.sum(self.labels == i)) for i, c in enumerate(self.classes)},
            "n_errors": len(self.errors),
            "errors": self.errors[:20],
            "backbones": [
                {
                    "key": k,
                    "timm_name": m.get("timm_name"),
                    "dim": m.get("dim"),
                    "dtype": m.get("dtype"),
                    "weights": m.get("weights_source"),
                    "random_init": m.get("weights_source") == "none",
                    "weights_sha256": m.get("weights_sha256"),
                    "preprocess": m.get("preprocess"),
                    "data_config": m.get("data_config"),
                    "fingerprint": m.get("fingerprint"),
                    "complete": bool(m.get("complete")),
                    "missing": m.get("missing"),
                    **self.health(k),
                    "n_shards": len(m.get("shards", [])),
                    "images_per_second": m.get("images_per_second"),
                    "versions": m.get("versions"),
                }
                for k, m in self._meta.items()
            ],
        }


@dataclass
class _RowPlan:
    """Which rows a read wants, in an order that visits each shard once: the wanted rows
    sorted (``rows``; None = all), and where each goes in the output (``dest``; None = in
    order, so contiguous slices)."""

    n: int
    rows: np.ndarray | None
    dest: np.ndarray | None

    @classmethod
    def of(cls, idx: np.ndarray | None, n: int) -> "_RowPlan":
        if idx is None:
            return cls(n, None, None)
        if len(idx) < 2 or bool(np.all(idx[1:] >= idx[:-1])):
            return cls(n, idx, None)
        order = np.argsort(idx, kind="stable")
        return cls(n, idx[order], order)

    def bounds(self, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Per shard [start, stop): the slice [a, b) of the sorted wanted rows inside it."""
        if self.rows is None:
            return [(start, stop) for start, stop in ranges]
        edges = np.searchsorted(self.rows, np.asarray(ranges, dtype=np.int64).reshape(-1, 2), side="left")
        return [(int(a), int(b)) for a, b in edges]

    def local(self, start: int, a: int, b: int) -> np.ndarray | slice:
        """Rows [a, b) of the plan as row numbers inside a shard starting at ``start``."""
        return slice(a - start, b - start) if self.rows is None else self.rows[a:b] - start

    def put(self, out: np.ndarray, a: int, b: int, values: np.ndarray) -> None:
        if self.dest is None:
            out[a:b] = values
        else:
            out[self.dest[a:b]] = values


def _read_shard_raw(path: Path, start: int, runs: list, shape: tuple[int, int], dtype: np.dtype,
                    plan: _RowPlan, a: int, b: int, out: np.ndarray) -> None:
    """Plan rows [a, b) of one shard from a memory map of its file: per run of rows stored
    back to back, one view and one fancy-index or slice copy (converted to ``out``'s dtype)."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")  # unmapped when the last view goes
    local = plan.local(start, a, b)
    for lo, hi, offset in runs:
        view = np.ndarray((hi - lo, shape[1]), dtype=dtype, buffer=mm, offset=offset)
        if isinstance(local, slice):
            s0, s1 = max(local.start, lo), min(local.stop, hi)
            if s0 < s1:
                plan.put(out, a + s0 - local.start, a + s1 - local.start, view[s0 - lo:s1 - lo])
        else:
            i, j = np.searchsorted(local, (lo, hi))
            if i < j:
                plan.put(out, a + i, a + j, view[local[i:j] - lo])


def _read_shard_hdf5(path: Path, start: int, plan: _RowPlan, a: int, b: int, out: np.ndarray,
                     locking: bool | None) -> None:
    """Plan rows [a, b) of one shard through HDF5 (compressed or otherwise filtered shards):
    the shard's whole block once, then the wanted rows."""
    with h5py.File(path, "r", locking=locking) as f:
        block = f["features"][()]
    local = plan.local(start, a, b)
    plan.put(out, a, b, block[local])


def verify_cache(path: str | os.PathLike, keys: Sequence[str] | None = None, *,
                 progress=None) -> dict[str, list[tuple[str, str]]]:
    """Check every shard of the given backbones (default: all) byte for byte: rows,
    fingerprint, and the checksum of the feature bytes. Returns {key: [(file, reason), ...]}
    (empty lists when sound) and records the result beside the shards, for `featstack info`."""
    cache = Cache(path)
    keys = list(keys) if keys else cache.all_backbones
    for k in keys:
        cache._require_known(k)
    out = {}
    for key in keys:
        meta = cache._meta[key]
        bad = []
        for start, stop, rel in meta.get("shards", []):
            why = shard_problem(cache.path.parent / rel, start, stop, meta["fingerprint"], checksum=True,
                                locking=cache.locking)
            if why is not None:
                bad.append((rel, why))
            if progress is not None:
                progress(1)
        gen = meta.get("generation")
        rows = int(meta.get("shard_rows") or 0)
        for lo, hi in meta.get("missing") or []:
            for s in range(lo, hi, rows or (hi - lo)):
                e = min(s + (rows or hi - lo), hi)
                bad.append((os.path.join(gen or "", f"{s}-{e}.h5"), "missing"))
        out[key] = bad
        if gen and (cache.path.parent / gen).is_dir():
            _atomic_write_text(cache.path.parent / gen / VERIFIED_NAME, json.dumps({
                "verified_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "shards": len(meta.get("shards", [])),
                "bad": [{"file": f, "reason": r} for f, r in bad if r != "missing"]}))
    return out


def open_cache(path: str | os.PathLike, *, locking: bool | None = None) -> Cache:
    """Open a cache file for reading (see :class:`Cache`)."""
    return Cache(path, locking=locking)


def write_arrays_cache(path: str | os.PathLike, samples: SampleTable, features: dict,
                       *, dtype: str = "float32", shard_rows: int = DEFAULT_SHARD_ROWS,
                       metas: dict | None = None, check_finite: bool = False) -> Cache:
    """Write precomputed feature matrices as a cache (synthetic benchmarks, imported features).

    Goes through the same shard writer as extraction, so the result is an ordinary cache.
    Non-finite values are stored as given unless ``check_finite`` (extraction always checks;
    imported features are checked by bench and train when read).
    """
    with CacheWriter(path, samples, check_finite=check_finite) as writer:
        _write_arrays(writer, features, dtype, shard_rows, metas)
    return Cache(path)


def _write_arrays(writer: CacheWriter, features: dict, dtype: str, shard_rows: int, metas: dict | None) -> None:
    for key, X in features.items():
        X = np.asarray(X)
        meta = {"key": key, "timm_name": key, "weights_source": "arrays",
                "weights_sha256": _sha256(np.ascontiguousarray(X).tobytes()),
                "data_config": {}, "preprocess": "arrays", "dtype": dtype, "dim": int(X.shape[1]),
                "versions": {"featstack": __version__}}
        meta.update((metas or {}).get(key, {}))
        for start, stop in writer.plan_backbone(meta, shard_rows=shard_rows):
            writer.write_shard(key, start, stop, X[start:stop])
    writer.finalize()
