"""Trained models: fit a head × fusion on a cache's training split, save it, load it, predict.

A saved model is a FOLDER with exactly two files and no pickle::

    model.skops   the fitted estimator, written by ``skops.io.dump``; loaded with an explicit
                  allowlist of the types our heads and fusions are made of, so a file holding
                  anything else is refused before any object is built
    model.json    what the estimator means: backbones (in column order), block widths, head,
                  fusion, class names (in the estimator's output order), the feature
                  fingerprint of every backbone, versions, training parameters and scores

Prediction refuses a cache whose backbone features were produced differently (other weights,
preprocessing or width) than those the model was trained on, naming the backbone: the matrices
would line up by shape and silently give wrong predictions.

This module (and the rest of the CPU side) never imports torch.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.abc
import io
import json
import os
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .cache import (FEATURE_FINGERPRINT_FIELDS, Cache, feature_fingerprint_fields,  # noqa: F401
                    fingerprint_differences, open_cache)
from .atomic import atomic_paths
from .errors import CacheError, CacheMismatchError, ConfigError, DataError, FeatstackError, read_format_json
from .fusion import (FUSION_SPECS, build_model, check_backbone_count, check_class_counts, first_non_finite,
                     fusion_root_types, fusion_spec, proba_from_prediction, stack_method)
from .heads import HEADS, TUNE_CV, TUNE_TYPES, head_spec, type_name

MODEL_FORMAT = "featstack-model"
MODEL_FORMAT_VERSION = 1
ESTIMATOR_FILE = "model.skops"
META_FILE = "model.json"
FEATURE_DTYPE = "float32"

# Containers and arrays any saved head or fusion is made of. The skops load allowlist is these,
# --tune's types, and every registered head's and fusion's ``allowed_types`` (see allowed_types()):
# loading refuses a file holding any other type before building a single object from it (skops
# resolves types by name; the list is the whole of what we are prepared to instantiate).
BASE_TYPES: tuple[str, ...] = (
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int",
    "builtins.float", "builtins.bool", "builtins.NoneType", "builtins.slice",
    "numpy.ndarray", "numpy.ma.MaskedArray", "numpy.dtype",
    "numpy.float64", "numpy.float32", "numpy.float16", "numpy.int64", "numpy.int32",
    "numpy.int8", "numpy.uint8", "numpy.bool", "numpy.bool_",
)


def allowed_types() -> tuple[str, ...]:
    """Every type a saved model may contain, derived from the head and fusion registries."""
    types = set(BASE_TYPES) | set(TUNE_TYPES)
    for spec in (*HEADS.values(), *FUSION_SPECS.values()):
        types.update(spec.allowed_types)
    return tuple(sorted(types))


def estimator_roots() -> set[str]:
    """Types a saved model's top-level object may have: each registered head's estimator, a
    --tune search around one, and each registered fusion's estimator."""
    return {TUNE_TYPES[0]} | {type_name(spec.build(0)) for spec in HEADS.values()} | set(fusion_root_types())


def __getattr__(name: str):
    if name == "ALLOWED_TYPES":  # kept for callers of the former constant; always current
        return allowed_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ModelError(FeatstackError):
    """A saved model folder that is missing, incomplete, of another format or untrusted."""


# --------------------------------------------------------------------------------------------
# skops without torch
# --------------------------------------------------------------------------------------------

class _BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _skops_io():
    """``skops.io``, imported without dragging in torch.

    At import, skops lists scikit-learn's estimators by walking every scikit-learn module, and
    one of them (the array-API shim for torch) imports torch when it is installed: 2-3 s and a
    GPU stack for a CPU command. Hiding torch for the duration of that one import gives skops
    exactly what it gets on a machine without torch (that shim is skipped), and nothing else.
    """
    if "skops.io" in sys.modules or "torch" in sys.modules:
        import skops.io
        return skops.io
    import sklearn  # noqa: F401  (its own imports must see the real environment)
    blocker = _BlockTorch()
    sys.meta_path.insert(0, blocker)
    try:
        import skops.io
    finally:
        sys.meta_path.remove(blocker)
    return skops.io


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------

def feature_fingerprint(info: dict) -> str:
    """sha256 of what makes a backbone's feature vectors comparable across caches (weights,
    preprocessing, width), leaving out the dataset and the storage dtype."""
    payload = json.dumps(feature_fingerprint_fields(info), sort_keys=True,
                         separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _parse_backbones(backbones: str | Sequence[str]) -> list[str]:
    keys = [k.strip() for k in backbones.split(",")] if isinstance(backbones, str) else list(backbones)
    keys = [k for k in keys if k]
    if not keys:
        raise ConfigError("no backbone given: pass --backbones a,b (see `featstack info CACHE`)")
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"backbone {dup[0]!r} is listed twice")
    return keys


# --------------------------------------------------------------------------------------------
# SavedModel
# --------------------------------------------------------------------------------------------

@dataclass
class SavedModel:
    """A fitted estimator plus what it needs to be applied to a cache safely.

    ``classes`` are the class names of the training cache, indexed by its integer labels: the
    estimator was fitted on those labels and :meth:`predict` returns them (as
    ``estimator.predict`` does), :meth:`predict_names` the names. Probability and score columns
    follow ``estimator.classes_``, named by :attr:`output_classes` (the same list unless a class
    had no training rows). ``fingerprints`` map each backbone to its :func:`feature_fingerprint`.
    """

    estimator: object
    backbones: list
    dims: list
    head: str
    fusion: str
    classes: list
    fingerprints: dict
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else f"{self.head}/{self.fusion} model"

    @property
    def score_kind(self) -> str:
        """"proba" if the estimator gives class probabilities, else "score" (decision values)."""
        return "proba" if stack_method(self.estimator) == "predict_proba" else "score"

    @property
    def output_classes(self) -> list:
        """Names of the estimator's output columns (probabilities, scores), in order."""
        return [self.classes[int(c)] for c in self.estimator.classes_]

    def check_cache(self, cache: Cache | str | os.PathLike) -> Cache:
        """Refuse a cache that lacks one of the model's backbones or whose features for it were
        extracted differently (the error names the backbone); return the opened cache."""
        cache = cache if isinstance(cache, Cache) else open_cache(cache)
        for key, want in zip(self.backbones, self.fingerprints_list()):
            if key not in cache.all_backbones:
                have = ", ".join(cache.all_backbones) or "none"
                raise CacheMismatchError(
                    f"backbone {key!r} of model {self.name} is not in {cache.path} (it has: {have}); "
                    f"extract it with `featstack extract ... --backbones {key} --cache {cache.path}`")
            info = cache.backbone_info(key)
            got = feature_fingerprint(info)
            if got != want:
                raise CacheMismatchError(
                    f"backbone {key!r} in {cache.path} was extracted differently from the one model "
                    f"{self.name} was trained on (fingerprint model {want[:12]}, cache {got[:12]}; "
                    f"{self._differences(key, info)}); re-extract it the same way")
        return cache

    def _differences(self, key: str, info: dict) -> str:
        """Which feature fingerprint fields of ``key`` differ between the model and a cache."""
        saved = (self.meta.get("feature_fields") or {}).get(key)
        if saved is None:  # saved before models recorded the fields: only the hashes are known
            return "this model records no fingerprint fields: other weights, preprocessing or width"
        return fingerprint_differences(saved, feature_fingerprint_fields(info), labels=("model", "cache"))

    def fingerprints_list(self) -> list[str]:
        return [self.fingerprints[k] for k in self.backbones]

    def features(self, cache: Cache | str | os.PathLike, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """(X, row indices) for ``rows`` of a checked cache; ``rows=None`` = every row whose
        input decoded. A non-finite feature is a DataError naming the sample and backbone."""
        cache = self.check_cache(cache)
        idx = _row_indices(cache, rows)
        X = cache.features(self.backbones, rows=idx, dtype=np.dtype(self.meta.get("dtype", FEATURE_DTYPE)))
        check_finite_features(cache, X, idx, self.backbones, self.dims)
        return X, idx

    def scores(self, cache: Cache | str | os.PathLike, rows=None) -> np.ndarray:
        """(n, n_classes) probabilities if the estimator has them, else decision values (a
        binary decision d as [-d, d], so the argmax is the prediction either way)."""
        X, _ = self.features(cache, rows)
        return self._scores(X)

    def _scores(self, X: np.ndarray) -> np.ndarray:
        method = stack_method(self.estimator)
        out = np.asarray(getattr(self.estimator, method)(X), dtype=np.float64)
        if out.ndim == 1:
            out = np.column_stack([-out, out])
        return out

    def predict(self, cache: Cache | str | os.PathLike, rows=None) -> np.ndarray:
        """Predicted integer labels (of the training cache's class list, :attr:`classes`) for
        ``rows`` (None = every row whose input decoded)."""
        X, _ = self.features(cache, rows)
        return np.asarray(self.estimator.predict(X), dtype=np.int64)

    def predict_names(self, cache: Cache | str | os.PathLike, rows=None) -> np.ndarray:
        """Predicted class names: what to compare with another cache, whose class list (and so
        integer labels) may differ from the training cache's."""
        return self._names(self.predict(cache, rows))

    def predict_proba(self, cache: Cache | str | os.PathLike, rows=None) -> np.ndarray:
        """Class probabilities (columns named by :attr:`output_classes`); heads without probabilities
        get the softmax of their decision values, as in a vote."""
        X, _ = self.features(cache, rows)
        method = stack_method(self.estimator)
        return proba_from_prediction(getattr(self.estimator, method)(X), method)

    def _names(self, pred: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[np.asarray(pred, dtype=np.int64)]


def _row_indices(cache: Cache, rows) -> np.ndarray:
    if rows is None:
        return np.flatnonzero(cache.valid)
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (len(cache),):
            raise ConfigError(f"row mask has {rows.shape[0]} entries for {len(cache)} rows of {cache.path}")
        return np.flatnonzero(rows)
    return rows.astype(np.int64).reshape(-1)


def check_finite_features(cache: Cache, X: np.ndarray, idx: np.ndarray, backbones: Sequence[str],
                          dims: Sequence[int]) -> None:
    """The finite-value rule (:func:`featstack.fusion.first_non_finite`) on features read from a
    cache: a DataError naming the sample, row and backbone of the first NaN or infinity."""
    start = 0
    for key, d in zip(backbones, dims):
        bad = first_non_finite(X[:, start:start + d])
        start += d
        if bad is not None:
            row = int(idx[bad[0]])
            reason = ("its input failed to decode" if row in set(cache.error_rows.tolist())
                      else "the cache holds NaN or infinity there; re-extract that backbone")
            raise DataError(f"sample {cache.ids[row]!r} (row {row}) has non-finite features for "
                            f"backbone {key!r} in {cache.path} ({reason}); {bad[2]} such "
                            "row(s) in this selection")


def train_rows(cache: Cache) -> np.ndarray:
    """Rows a model is fitted on: split "train", labelled, and decoded without error."""
    return cache.rows("train")


def require_training_rows(cache: Cache, rows: np.ndarray) -> None:
    """A DataError when a cache has no row to fit on."""
    if len(rows) == 0:
        raise DataError(f"{cache.path} has no labelled training rows (split 'train', label set, "
                        "decoded without error)")


def labelled_rows(cache: Cache, split: str) -> np.ndarray:
    """Labelled, decoded rows of one split (for scoring)."""
    return cache.rows(split)


def inner_folds(cv: int, needs_oof: bool, tune: bool) -> tuple[int, str]:
    """(rows each class needs in a training set, what needs them): the stacking folds of a
    fusion that needs out-of-fold scores, and the inner folds of --tune."""
    need, why = 0, ""
    if needs_oof:
        need, why = cv, f"the cv={cv} stacking folds"
    if tune and TUNE_CV > need:
        need, why = TUNE_CV, f"the {TUNE_CV} inner folds of --tune"
    return need, why


def check_training_classes(cache: Cache, y: np.ndarray, need: int, why: str, hint: str) -> None:
    """The class-count rule (:func:`featstack.fusion.check_class_counts`) on a cache's training
    rows: a DataError naming the cache and the classes by name."""
    check_class_counts(y, need, why, names=cache.classes, subject=f"the training split of {cache.path}",
                       unit="row(s)", hint=hint, error=DataError)


def best_model(rows: Sequence[dict], metric: str = "cv_accuracy_mean") -> tuple[list[str], str, str]:
    """(backbones, head, fusion) of the bench's best row by ``metric`` (the bench's ranking rule,
    :func:`featstack.bench.best_row`): what ``model: best`` trains, in a pipeline and on the CLI."""
    from .bench import best_row

    best = best_row(rows, metric)
    return str(best["backbones"]).split("+"), str(best["head"]), str(best["fusion"])


def read_bench_rows(folder: str | os.PathLike) -> list[dict]:
    """The result rows of a bench output folder (its bench.json); one ConfigError line naming the
    file when it is missing or unreadable."""
    path = Path(folder) / "bench.json"
    try:
        rows = json.loads(path.read_text())["rows"]
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; run `featstack bench CACHE --out {folder}` first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a featstack bench result ({type(e).__name__}: {e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path}: 'rows' is not a list of result rows")
    return rows


def train_model(cache: Cache | str | os.PathLike, backbones: str | Sequence[str], head: str,
                fusion: str, *, out: str | os.PathLike | None = None, tune: bool = False,
                cv: int = 5, random_state: int = 0, n_jobs: int | None = None,
                progress: bool = False) -> SavedModel:
    """Fit ``head`` × ``fusion`` on the cache's training split and (with ``out``) save it.

    Only rows with split "train", a label, and no decode error are used; validation and test
    rows never influence the fit (also not through ``--tune``). Where a test split exists,
    its accuracy is recorded in the model's metadata.
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    keys = _parse_backbones(backbones)
    fusion_spec(fusion)
    head_spec(head)
    check_backbone_count(fusion, len(keys), keys)
    if not isinstance(cv, int) or cv < 2:
        raise ConfigError(f"--cv must be an integer >= 2, got {cv!r}")
    for k in keys:
        if k not in cache.all_backbones:
            have = ", ".join(cache.all_backbones) or "none"
            raise CacheError(f"{cache.path}: backbone {k!r} is not in this cache (it has: {have})")
    dims = [cache.dim(k) for k in keys]
    rows = train_rows(cache)
    require_training_rows(cache, rows)
    X = cache.features(keys, rows=rows, dtype=np.dtype(FEATURE_DTYPE))
    check_finite_features(cache, X, rows, keys, dims)
    y = cache.labels[rows]
    check_training_classes(cache, y, *inner_folds(cv, fusion_spec(fusion).needs_oof, tune), hint="lower --cv, drop --tune or add samples")

    est = build_model(head, fusion, dims, cv=cv, random_state=random_state, tune=tune, n_jobs=n_jobs)
    if progress:  # one sklearn fit: no natural progress bar, so say what is running and on what
        print(f"fitting {head} x {fusion} on {len(rows)} rows x {sum(dims)} features "
              f"({'+'.join(keys)}){' with --tune' if tune else ''} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    est.fit(X, y)
    fit_seconds = time.perf_counter() - t0
    train_acc = float(np.mean(est.predict(X) == y))

    import sklearn
    infos = {k: cache.backbone_info(k) for k in keys}
    meta = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "featstack_version": __version__,
        "sklearn_version": sklearn.__version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "backbones": keys,
        "dims": dims,
        "head": head,
        "fusion": fusion,
        "classes": list(cache.classes),
        "labels": [int(c) for c in est.classes_],
        "fingerprints": {k: feature_fingerprint(infos[k]) for k in keys},
        "feature_fields": {k: feature_fingerprint_fields(infos[k]) for k in keys},
        "cache_fingerprints": {k: infos[k].get("fingerprint") for k in keys},
        "timm_names": {k: infos[k].get("timm_name") for k in keys},
        "cache_fingerprint": cache.dataset_fingerprint,
        "cache_path": str(cache.path),
        "dtype": FEATURE_DTYPE,
        "output": stack_method(est),
        "params": {"cv": cv, "random_state": random_state, "tune": bool(tune)},
        "train_rows": int(len(rows)),
        "train_accuracy": train_acc,
        "fit_seconds": round(fit_seconds, 3),
    }
    saved = SavedModel(estimator=est, backbones=keys, dims=dims, head=head, fusion=fusion,
                       classes=meta["classes"], fingerprints=meta["fingerprints"], meta=meta)
    test = labelled_rows(cache, "test")
    if len(test):
        meta["test_rows"] = int(len(test))
        meta["test_accuracy"] = float(np.mean(saved.predict(cache, rows=test) == cache.labels[test]))
    if out is not None:
        save_model(out, saved)
    return saved


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------

def save_model(path: str | os.PathLike, saved: SavedModel) -> Path:
    """Write ``saved`` as a model folder (model.skops + model.json), each file atomically.

    Refuses to write into a non-empty folder that is not a model folder, so a typo in --out
    cannot clutter (or be mistaken for) another directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a folder; a saved model is a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / META_FILE).exists():
        raise ConfigError(f"{path}: folder is not empty and holds no {META_FILE}; "
                          "pick a new --out folder")
    data = _skops_io().dumps(saved.estimator)
    _, bad, _ = _types_of(data, path / ESTIMATOR_FILE)
    if bad:  # load_model would refuse this file: say why now, naming the head
        raise ModelError(f"{path / ESTIMATOR_FILE}: the fitted {saved.head} x {saved.fusion} model holds "
                         f"type(s) outside the load allowlist ({', '.join(bad[:5])}); add them to the "
                         f"head's spec (register_head(..., allowed_types=(...)))")
    path.mkdir(parents=True, exist_ok=True)
    meta = dict(saved.meta)
    meta.update(format=MODEL_FORMAT, format_version=MODEL_FORMAT_VERSION,
                backbones=list(saved.backbones), dims=[int(d) for d in saved.dims],
                head=saved.head, fusion=saved.fusion, classes=list(saved.classes),
                fingerprints=dict(saved.fingerprints),
                estimator_sha256=hashlib.sha256(data).hexdigest())
    if hasattr(saved.estimator, "classes_"):
        meta["labels"] = [int(c) for c in saved.estimator.classes_]
    with atomic_paths(path / ESTIMATOR_FILE, path / META_FILE) as (tmp_est, tmp_meta):
        tmp_est.write_bytes(data)
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    saved.meta, saved.path = meta, path
    return path


def _schema_types(node, out: set) -> None:
    if isinstance(node, dict):
        if "__module__" in node and "__class__" in node:
            out.add(f"{node['__module__']}.{node['__class__']}")
        for v in node.values():
            _schema_types(v, out)
    elif isinstance(node, list):
        for v in node:
            _schema_types(v, out)


def _types_of(data: bytes, file: Path) -> tuple[list[str], list[str], str]:
    """(types skops distrusts, types outside :func:`allowed_types`, root type) of a skops file's
    bytes, read from its schema without building anything."""
    try:
        untrusted = list(_skops_io().get_untrusted_types(data=data))
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            schema = json.loads(z.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ModelError(f"{file}: not a readable skops file ({e})") from e
    types: set = set()
    _schema_types(schema, types)
    bad = sorted((set(untrusted) | types) - set(allowed_types()))
    return untrusted, bad, f"{schema.get('__module__')}.{schema.get('__class__')}"


def _read_model_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise ModelError(f"{file}: not a readable skops file ({e})") from e


def check_model_file(file: str | os.PathLike, data: bytes | None = None) -> list[str]:
    """Every type a model.skops file would build, refused (ModelError naming the file and the
    type) if one is outside :func:`allowed_types`; returns the types skops itself distrusts,
    which are then passed to ``skops.io.load`` as trusted. ``data``: the file's bytes, when the
    caller has read them already (so what is checked is exactly what is loaded)."""
    file = Path(file)
    if data is None:
        data = _read_model_bytes(file)
    untrusted, bad, root = _types_of(data, file)
    if bad:
        raise ModelError(f"{file}: refusing to load type {bad[0]!r}, which featstack models never "
                         f"contain ({len(bad)} such type(s): {', '.join(bad[:5])}); the file was "
                         "not written by featstack or has been tampered with")
    if root not in estimator_roots():
        raise ModelError(f"{file}: holds a {root}, not a featstack head or fusion")
    return untrusted


def _read_meta(path: Path) -> dict:
    meta = read_format_json(path / META_FILE, fmt=MODEL_FORMAT, version=MODEL_FORMAT_VERSION,
                            required=("backbones", "dims", "head", "fusion", "classes", "fingerprints"),
                            error=ModelError, what="saved model")
    mfile = path / META_FILE
    if len(meta["backbones"]) != len(meta["dims"]):
        raise ModelError(f"{mfile}: {len(meta['backbones'])} backbones but {len(meta['dims'])} dims")
    missing = [k for k in meta["backbones"] if k not in meta["fingerprints"]]
    if missing:
        raise ModelError(f"{mfile}: field 'fingerprints' lacks backbone {missing[0]!r}")
    if meta["fusion"] not in FUSION_SPECS:
        raise ModelError(f"{mfile}: field 'fusion' is {meta['fusion']!r}, not one of "
                         f"{', '.join(FUSION_SPECS)} (a fusion registered in another process must be "
                         "registered again before loading)")
    if meta["head"] not in HEADS:
        raise ModelError(f"{mfile}: head {meta['head']!r} is not registered in this process; register it "
                         "again (featstack.register_head) before loading the model")
    return meta


def check_estimator_hash(meta: dict, data: bytes, efile: Path) -> None:
    """Refuse a model.skops whose bytes are not the ones model.json was written with (another
    head's file copied in, a damaged or edited file): model.json's ``estimator_sha256`` is the
    folder's one content hash. Folders saved before the field existed load unchecked."""
    want = meta.get("estimator_sha256")
    if want is None:
        return
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise ModelError(f"{efile}: content hash {got[:12]} differs from the {want[:12]} that "
                         f"{META_FILE} records; this is not the estimator the folder was saved with "
                         "(replaced, edited or damaged): save the model again")


def load_model(path: str | os.PathLike) -> SavedModel:
    """Load a model folder written by :func:`save_model` (never through pickle).

    The skops file's types are checked against :func:`allowed_types` before anything is built.
    """
    path = Path(path)
    if path.is_file() and path.name in (META_FILE, ESTIMATOR_FILE):
        path = path.parent
    if not path.is_dir():
        raise ModelError(f"{path}: no such model folder")
    meta = _read_meta(path)
    efile = path / ESTIMATOR_FILE
    if not efile.exists():
        raise ModelError(f"{path}: model folder lacks {ESTIMATOR_FILE}")
    data = _read_model_bytes(efile)
    trusted = check_model_file(efile, data)  # types first: the refusal that names what is wrong
    check_estimator_hash(meta, data, efile)
    sio = _skops_io()
    import sklearn
    if meta.get("sklearn_version") and meta["sklearn_version"] != sklearn.__version__:
        warnings.warn(f"{path} was saved with scikit-learn {meta['sklearn_version']}, this is "
                      f"{sklearn.__version__}; predictions may differ slightly", stacklevel=2)
    try:
        est = sio.loads(data, trusted=trusted)
    except Exception as e:  # skops raises a variety of errors on damaged files
        raise ModelError(f"{efile}: cannot be loaded ({type(e).__name__}: {e})") from e
    labels = [int(c) for c in getattr(est, "classes_", [])]
    if labels != list(meta.get("labels", labels)) or not labels or \
            not all(0 <= c < len(meta["classes"]) for c in labels):
        raise ModelError(f"{path}: estimator predicts labels {labels} but {META_FILE} lists "
                         f"{len(meta['classes'])} classes with labels {meta.get('labels')}")
    n_in = getattr(est, "n_features_in_", None)
    if n_in is not None and n_in != sum(meta["dims"]):
        raise ModelError(f"{path}: estimator takes {n_in} features but dims {meta['dims']} sum to "
                         f"{sum(meta['dims'])}")
    return SavedModel(estimator=est, backbones=list(meta["backbones"]), dims=[int(d) for d in meta["dims"]],
                      head=meta["head"], fusion=meta["fusion"], classes=list(meta["classes"]),
                      fingerprints=dict(meta["fingerprints"]), meta=meta, path=path)
