"""The HDF5 feature cache: the one contract between extraction (GPU side) and heads (CPU side).

Only this module touches h5py. Layout (see ../shared/design.md)::

    cache/NAME.h5                       index (small), rewritten atomically (tmp + os.replace)
      attrs: format_version, featstack_version, dataset_fingerprint, created_utc, n_samples
      /samples/id, /samples/label, /samples/split, /classes
      /errors/row, /errors/id, /errors/message          inputs that failed to decode
      /features/<key>   (N, D) virtual dataset over the shards; attrs: metadata + fingerprint,
                        complete, shards (JSON), missing (JSON)
    cache/NAME.shards/<key>/backbone.json               metadata + fingerprint + shard_rows
    cache/NAME.shards/<key>/<start>-<stop>.h5           immutable shard: features, rows, errors

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
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from . import __version__
from .config import DEFAULT_SHARD_ROWS  # noqa: F401  (one default: the extract setting)
from .errors import CacheError, CacheMismatchError, DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
CHUNK_BYTES = 1 << 20
_STR = h5py.string_dtype("utf-8")
_SHARD_RE = re.compile(r"^(\d+)-(\d+)\.h5$")
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


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


@dataclass
class SampleTable:
    """The rows of a cache: ids, labels, splits and class names, fixed before extraction.

    ``content`` holds optional per-sample content keys (file sizes, array hashes) that go into
    the dataset fingerprint, so a changed image under the same name is noticed cheaply.
    """

    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    classes: list
    content: np.ndarray | None = None

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
    tmp.write_text(text)
    os.replace(tmp, path)


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


class CacheWriter:
    """Writes one cache: checks the dataset, plans the missing shards, writes them atomically,
    and rebuilds the index. Several processes (torchrun ranks) may write disjoint shards of the
    same cache at once; only one of them should call :meth:`finalize`.
    """

    def __init__(self, path: str | os.PathLike, samples: SampleTable, *, locking: bool | None = None):
        self.path = Path(path)
        self.samples = samples
        self.locking = locking
        self.root = shard_root(self.path)
        self.dataset_fingerprint = samples.fingerprint()
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
                    f"{self.dataset_fingerprint[:12]}); use another --cache path or delete it")

    def backbone_dir(self, key: str) -> Path:
        return self.root / safe_key(key)

    def read_backbone_meta(self, key: str) -> dict | None:
        p = self.backbone_dir(key) / "backbone.json"
        return json.loads(p.read_text()) if p.exists() else None

    def plan_backbone(self, meta: dict, *, shard_rows: int = DEFAULT_SHARD_ROWS,
                      overwrite: bool = False) -> list[tuple[int, int]]:
        """Register a backbone and return the row ranges whose shards are still missing.

        An existing backbone with another fingerprint is refused unless ``overwrite``; then its
        shards are deleted. An existing one with the same fingerprint keeps its shard size, so
        a resumed run writes exactly the shards the first run would have.
        """
        meta = dict(meta, dataset_fingerprint=self.dataset_fingerprint)
        meta["fingerprint"] = backbone_fingerprint(meta)
        key = meta["key"]
        folder = self.backbone_dir(key)
        old = self.read_backbone_meta(key)
        if old is not None and old.get("fingerprint") != meta["fingerprint"]:
            if not overwrite:
                diff = [f for f in FINGERPRINT_FIELDS + OPTIONAL_FINGERPRINT_FIELDS if old.get(f) != meta.get(f)]
                raise CacheMismatchError(
                    f"{self.path}: backbone {key!r} is cached with another fingerprint "
                    f"(differs in: {', '.join(diff) or 'format'}); pass --overwrite to replace it")
            shutil.rmtree(folder)
            old = None
        if old is not None:
            shard_rows = int(old["shard_rows"])
        if shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        meta["shard_rows"] = int(shard_rows)
        meta.setdefault("created_utc", _dt.datetime.now(_dt.timezone.utc).isoformat())
        folder.mkdir(parents=True, exist_ok=True)
        if old is None:
            _atomic_write_text(folder / "backbone.json", json.dumps(meta, indent=1, default=str))
        n = len(self.samples)
        have = {(s, e) for s, e, _ in _list_shards(folder)}
        return [(s, min(s + shard_rows, n)) for s in range(0, n, shard_rows)
                if (s, min(s + shard_rows, n)) not in have]

    def write_shard(self, key: str, start: int, stop: int, features: np.ndarray,
                    error_rows: Iterable[int] = (), error_messages: Iterable[str] = (),
                    *, compression: str | None = None) -> Path:
        """Write rows [start, stop) of one backbone as an immutable shard (tmp, then rename)."""
        meta = self.read_backbone_meta(key)
        if meta is None:
            raise CacheError(f"backbone {key!r} was not planned in {self.path}")
        features = np.asarray(features)
        if features.shape != (stop - start, meta["dim"]):
            raise ValueError(f"shard {key} {start}-{stop}: features of shape {features.shape}, "
                             f"expected {(stop - start, meta['dim'])}")
        dtype = np.dtype(meta["dtype"])
        folder = self.backbone_dir(key)
        final = folder / f"{start}-{stop}.h5"
        tmp = folder / f"{start}-{stop}.h5.{uuid.uuid4().hex}.tmp"
        for stale in folder.glob(f"{start}-{stop}.h5.*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
        rows = stop - start
        try:
            with h5py.File(tmp, "w", locking=self.locking) as f:
                f.create_dataset("features", data=features.astype(dtype, copy=False),
                                 chunks=(_chunk_rows(meta["dim"], dtype.itemsize, rows), meta["dim"]),
                                 compression=compression)
                f.create_dataset("rows", data=np.arange(start, stop, dtype=np.int64))
                f.create_dataset("errors/row", data=np.asarray(list(error_rows), dtype=np.int64))
                f.create_dataset("errors/message", data=np.asarray(list(error_messages), dtype=object),
                                 dtype=_STR)
                f.attrs.update(key=key, start=start, stop=stop, fingerprint=meta["fingerprint"])
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def finalize(self) -> Path:
        """Rebuild the index from the samples and whatever shards exist (atomically)."""
        return build_index(self.path, self.samples, locking=self.locking)


def build_index(path: str | os.PathLike, samples: SampleTable, *, locking: bool | None = None) -> Path:
    """Write the index file: samples, errors and one virtual dataset per backbone folder."""
    path = Path(path)
    root = shard_root(path)
    n = len(samples)
    errors: dict[int, str] = {}
    backbones = []
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            bj = folder / "backbone.json"
            if not bj.exists():
                continue
            meta = json.loads(bj.read_text())
            stats = folder / "stats.json"
            if stats.exists():  # measured throughput; informative, not part of the fingerprint
                meta["images_per_second"] = json.loads(stats.read_text()).get("images_per_second")
            if meta.get("dataset_fingerprint") != samples.fingerprint():
                raise CacheMismatchError(
                    f"{folder}: shards of another dataset; delete that folder or use another cache")
            shards = _list_shards(folder)
            for start, stop, shard in shards:
                try:
                    with h5py.File(shard, "r", locking=locking) as f:
                        if f.attrs.get("fingerprint") != meta["fingerprint"]:
                            raise CacheMismatchError(f"{shard}: shard of another backbone fingerprint")
                        for r, m in zip(f["errors/row"][()], f["errors/message"].asstr()[()]):
                            errors.setdefault(int(r), m)
                except OSError as e:
                    raise CacheError(f"{shard}: unreadable shard ({e}); delete it and re-run") from e
            backbones.append((meta, shards))
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w", locking=locking) as f:
            f.attrs.update(format_version=FORMAT_VERSION, featstack_version=__version__,
                           dataset_fingerprint=samples.fingerprint(), n_samples=n,
                           created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat())
            f.create_dataset("samples/id", data=samples.ids, dtype=_STR)
            f.create_dataset("samples/label", data=samples.labels)
            f.create_dataset("samples/split", data=samples.splits, dtype=_STR)
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
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
        and labelled unless ``labelled=False``."""
        mask = self.valid
        if split is not None:
            mask &= self.split_mask(split)
        if labelled:
            mask &= self.labels >= 0
        return np.flatnonzero(mask)

    def split_mask(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise CacheError(f"unknown split {split!r}: splits are {', '.join(SPLITS)}")
        return self.splits == split

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
        for start, stop, rel in meta.get("shards", []):
            if not (self.path.parent / rel).exists():
                raise CacheError(f"{self.path}: shard {rel} of backbone {key!r} (rows {start}-{stop}) "
                                 "is missing on disk; re-run the extraction to rebuild it")

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
        col = 0
        with h5py.File(self.path, "r", locking=self.locking) as f:
            for key, d in zip(keys, dims):
                ds = f["features"][self._meta[key]["_name"]]
                out[:, col:col + d] = _read_rows(ds, idx, n, dtype)
                col += d
        return out

    def summary(self) -> dict:
        """Everything `featstack info` shows, as plain JSON-able data."""
        counts = {s: int(np.sum(self.splits == s)) for s in SPLITS}
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
                    "n_shards": len(m.get("shards", [])),
                    "images_per_second": m.get("images_per_second"),
                    "versions": m.get("versions"),
                }
                for k, m in self._meta.items()
            ],
        }


def _read_rows(ds, idx: np.ndarray | None, n: int, dtype) -> np.ndarray:
    """Read all rows (in chunk-aligned slabs) or selected rows of a (virtual) dataset."""
    d = ds.shape[1]
    step = max(1, (8 * CHUNK_BYTES) // max(1, d * ds.dtype.itemsize))
    if idx is None or len(idx) > n // 8:
        full = np.empty((n, d), dtype=dtype)
        for s in range(0, n, step):
            full[s:s + step] = ds[s:s + step]
        return full if idx is None else full[idx]
    order = np.unique(idx)
    got = ds[order] if len(order) else np.empty((0, d), ds.dtype)
    return got.astype(dtype)[np.searchsorted(order, idx)]


def open_cache(path: str | os.PathLike, *, locking: bool | None = None) -> Cache:
    """Open a cache file for reading (see :class:`Cache`)."""
    return Cache(path, locking=locking)


def write_arrays_cache(path: str | os.PathLike, samples: SampleTable, features: dict,
                       *, dtype: str = "float32", shard_rows: int = DEFAULT_SHARD_ROWS,
                       metas: dict | None = None) -> Cache:
    """Write precomputed feature matrices as a cache (synthetic benchmarks, imported features).

    Goes through the same shard writer as extraction, so the result is an ordinary cache.
    """
    writer = CacheWriter(path, samples)
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
    return Cache(path)
