"""The backbone-combination benchmark: every subset of the cached backbones × head × fusion,
cross-validated on the training split, with each (backbone, head) fitted once and reused.

Why the reuse matters: for K backbones and subsets up to size m there are Σ C(K, s) subsets, and
a naive grid fits one stacking ensemble per subset, i.e. Σ |S| base heads per fold. The base heads
of ``single``, ``vote`` and ``stack`` only ever see one backbone's columns, so their fitted models
and out-of-fold scores are the same in every subset that contains that backbone. The bench
computes, once per (backbone, head, outer fold k):

* the base head fitted on outer-train k, with its raw outputs on outer-test k (used by ``single``,
  by ``vote``: argmax of the mean of the blocks' probabilities, and by ``stack`` at prediction);
* its inner out-of-fold scores on outer-train k (``cross_val_predict`` with the same seeded
  ``StratifiedKFold`` as :class:`featstack.fusion.StackClassifier`), from which ``stack`` fits its
  meta-learner per subset.

So ``stack``'s fold scores equal ``cross_validate(StackClassifier(head, dims, cv, random_state),
X, y, cv=StratifiedKFold(cv, shuffle=True, random_state))`` exactly, while the number of base fits
is ``K × heads × cv × (cv + 1)`` (plus ``cv + 1`` per (backbone, head) for the test-split refit),
whatever the number of subsets. ``concat`` cannot be shared (one head over all columns), so it
costs one fit per (subset, head, fold). The meta-learners are small (|S| × n_classes columns).

All work goes through joblib at the outermost level (tasks = (backbone, head, fold), then
(subset, head)); ``backend="dask"`` runs the same tasks on a dask.distributed cluster through
joblib's dask backend. This module (like the whole CPU side) never imports torch.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import itertools
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlparse

import numpy as np
from joblib import Parallel, delayed, parallel_config
from sklearn.base import clone
from sklearn.metrics import accuracy_score, f1_score

from . import __version__
from .cache import Cache, open_cache, select_rows
from .errors import CacheError, CacheMismatchError, ConfigError, DataError
from .fusion import bench_sizes_hint, fusion_spec, list_fusions, out_of_fold, stack_method, stack_splitter
from .heads import create_head, head_spec, labels_from_decision
from .models import check_finite_features, check_training_classes, inner_folds, require_training_rows
from .orphans import exit_with_parent, mark_parent

BACKENDS = ("loky", "threading", "dask")
CSV_COLUMNS = ["rank", "backbones", "head", "fusion", "size", "cv_accuracy_mean", "cv_accuracy_std",
               "cv_f1_macro_mean", "cv_f1_macro_std", "test_accuracy", "test_f1_macro", "fit_seconds",
               "n_train", "n_test", "random_init"]
_METRICS = ("cv_accuracy_mean", "cv_accuracy_std", "cv_f1_macro_mean", "cv_f1_macro_std",
            "test_accuracy", "test_f1_macro", "fit_seconds")
REFIT = -1  # fold index of the refit on all training rows, scored on the test split


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------

@dataclass
class BenchResult:
    """What a bench run produced.

    ``rows`` are ranked best first (cv accuracy, then cv macro-F1, then smaller subsets).
    ``folds`` maps (backbones, head, fusion) to the per-outer-fold ``accuracy`` and ``f1_macro``
    lists, so any row can be checked against a plain ``cross_validate`` on the same folds.
    ``n_base_fits`` counts the per-backbone head fits (outer and inner folds, refit included):
    it grows with the number of backbones, not with the number of subsets.
    """

    rows: list[dict]
    folds: dict = field(default_factory=dict)
    n_base_fits: int = 0
    n_concat_fits: int = 0
    n_meta_fits: int = 0
    n_train: int = 0
    n_test: int = 0
    n_excluded: int = 0
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    out: Path | None = None

    def best(self, metric: str = "cv_accuracy_mean") -> dict:
        """The best row by ``metric`` (see :func:`best_row`)."""
        return best_row(self.rows, metric)

    def table(self, top: int = 20) -> str:
        """The ranked table as fixed-width text (what the CLI prints)."""
        return format_table(self.rows, top=top)


# --------------------------------------------------------------------------------------------
# Features: arrays here, or read by path on the worker
# --------------------------------------------------------------------------------------------

def bench_rows(cache: Cache) -> tuple[np.ndarray, np.ndarray, int]:
    """(train rows, test rows, excluded) of a cache, as the bench uses them.

    Train: split "train", labelled, not in the error table. Test: the same for split "test".
    ``excluded`` counts labelled train rows dropped because their input failed to decode.
    """
    train = cache.rows("train")
    labelled_train = len(select_rows(cache.labels, cache.splits, "train"))  # decoded or not
    return train, cache.rows("test"), labelled_train - len(train)


@dataclass(frozen=True)
class CacheBlock:
    """A reference to one backbone's bench rows in a cache file, resolved on the worker.

    Workers that share the file system with the client read the features themselves (once per
    worker process, memoised) instead of receiving them over the network; the fingerprints
    make sure they read the same data the client validated.
    """

    path: str
    key: str
    dataset_fingerprint: str
    fingerprint: str


_BLOCK_MEMO: dict = {}
_BLOCK_MEMO_SIZE = 16


def _read_block(ref: CacheBlock) -> np.ndarray:
    memo_key = (ref.path, ref.key, ref.dataset_fingerprint, ref.fingerprint)
    X = _BLOCK_MEMO.get(memo_key)
    if X is not None:
        return X
    cache = open_cache(ref.path)
    if cache.dataset_fingerprint != ref.dataset_fingerprint:
        raise CacheMismatchError(f"{ref.path}: the cache seen by this worker holds another dataset "
                                 "than the client's; workers must share the client's file system")
    if cache.fingerprint(ref.key) != ref.fingerprint:
        raise CacheMismatchError(f"{ref.path}: backbone {ref.key!r} differs between this worker "
                                 "and the client; workers must share the client's file system")
    train, test, _ = bench_rows(cache)
    X = cache.features(ref.key, rows=np.concatenate([train, test]), dtype=np.float32)
    while len(_BLOCK_MEMO) >= _BLOCK_MEMO_SIZE:
        _BLOCK_MEMO.pop(next(iter(_BLOCK_MEMO)))
    _BLOCK_MEMO[memo_key] = X
    return X


def _resolve(src) -> np.ndarray:
    return _read_block(src) if isinstance(src, CacheBlock) else src


# --------------------------------------------------------------------------------------------
# Tasks (module level: pickled to loky / dask workers)
# --------------------------------------------------------------------------------------------

_splitter = stack_splitter  # the outer folds are seeded exactly like a stack's inner ones


_LIMIT_LOCK = threading.Lock()
_LIMIT_STATE: dict = {"controller": None, "depth": 0, "limiter": None}


@contextlib.contextmanager
def _one_thread():
    """Limit BLAS/OpenMP to one thread inside a task: the grid is parallel at the outermost level
    (joblib over tasks), and the small matrix products of a head fit run many times slower when
    BLAS threads compete with each other and with the other workers for the same cores.

    Reference-counted, so tasks running as threads of one process (threading backend, an
    in-process dask cluster) share one limit and the last one out restores the original."""
    exit_with_parent()  # a worker of a killed bench must not keep its cores busy
    st = _LIMIT_STATE
    with _LIMIT_LOCK:
        if st["controller"] is None:
            from threadpoolctl import ThreadpoolController
            st["controller"] = ThreadpoolController()
        if st["depth"] == 0:
            st["limiter"] = st["controller"].limit(limits=1)
        st["depth"] += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            st["depth"] -= 1
            if st["depth"] == 0:
                st["limiter"].restore_original_limits()
                st["limiter"] = None


def _base_task(tag, src, y, train_idx, test_idx, proto, cv, random_state, need_oof):
    """One (backbone, head, fold): the base head on outer-train, its outputs on outer-test and,
    for fusions that need them, its inner out-of-fold scores on outer-train."""
    with _one_thread():
        return _base(tag, _resolve(src), y, train_idx, test_idx, proto, cv, random_state, need_oof)


def _base(tag, X, y, train_idx, test_idx, proto, cv, random_state, need_oof):
    method = stack_method(proto)
    Xtr, ytr, Xte = X[train_idx], y[train_idx], X[test_idx]
    t0 = time.perf_counter()
    est = clone(proto).fit(Xtr, ytr)
    fit_s = time.perf_counter() - t0
    raw = getattr(est, method)(Xte) if len(Xte) else None
    pred = labels_from_decision(est, raw) if raw is not None and method == "decision_function" else None
    if pred is None:  # one pass over the test rows when the labels follow from the scores
        pred = est.predict(Xte) if len(Xte) else np.empty(0, dtype=ytr.dtype)
    oof, oof_s = None, 0.0
    if need_oof:
        t0 = time.perf_counter()
        oof = out_of_fold(proto, Xtr, ytr, cv, random_state)
        oof_s = time.perf_counter() - t0
    return tag, {"method": method, "raw": raw, "pred": pred, "oof": oof, "fit_s": fit_s,
                 "oof_s": oof_s, "n_fits": 1 + (cv if need_oof else 0)}


def _fit_task(tag, srcs, y, train_idx, test_idx, proto):
    """One (subset, head, fold) of a fusion the bench cannot assemble from shared per-backbone
    fits (``concat``, or a fusion registered without ``bench_combine``): its own estimator on
    all the subset's columns."""
    X = np.hstack([_resolve(s) for s in srcs])
    with _one_thread():
        t0 = time.perf_counter()
        est = clone(proto).fit(X[train_idx], y[train_idx])
        fit_s = time.perf_counter() - t0
        pred = est.predict(X[test_idx]) if len(test_idx) else np.empty(0, dtype=y.dtype)
    return tag, {"pred": pred, "fit_s": fit_s}


def _meta_task(tag, combine, folds, n_classes, random_state):
    """One (fusion, subset, head): per fold, the fusion's ``bench_combine`` over the shared
    per-backbone outputs (a stack fits its meta-learner here)."""
    out = {}
    with _one_thread():
        for k, (parts, ytr) in folds.items():
            t0 = time.perf_counter()
            pred, n_fits = combine(parts, ytr, n_classes, random_state)
            out[k] = {"pred": np.asarray(pred, dtype=np.int64), "fit_s": time.perf_counter() - t0,
                      "n_fits": n_fits}
    return tag, out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _names(value: str | Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    items = [v for v in items if v]
    dup = sorted({v for v in items if items.count(v) > 1})
    if dup:
        raise ConfigError(f"{what} {dup[0]!r} is listed twice")
    return items


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_classes(cache: Cache, y: np.ndarray, cv: int, need_oof: bool, tune: bool,
                   outer: list) -> None:
    """The class-count rule: every class with at least ``cv`` rows and, for fusions that need
    out-of-fold scores or for --tune, enough rows in every outer-training fold for the inner
    folds."""
    check_training_classes(cache, y, cv, f"the cv={cv} folds", "lower --cv or add samples")
    inner, why = inner_folds(cv, need_oof, tune)
    if inner:
        present, counts = np.unique(y, return_counts=True)
        for train_idx, _ in outer:
            sub = np.bincount(np.searchsorted(present, y[train_idx]), minlength=len(present))
            bad = np.flatnonzero(sub < inner)
            if len(bad):
                i = int(bad[0])
                raise DataError(
                    f"training split of {cache.path}: class {cache.classes[present[i]]!r} has {int(counts[i])} "
                    f"rows, so an outer training fold keeps only {int(sub[i])} of them, fewer than "
                    f"{why}; lower --cv or add samples")


def _plan_subsets(keys: list[str], fusions: list[str], max_size: int) -> list[tuple[str, ...]]:
    """Every subset of ``keys`` of a size some requested fusion takes (sizes 1..max_size)."""
    specs = [fusion_spec(f) for f in fusions]
    subsets = []
    for size in range(1, min(max_size, len(keys)) + 1):
        if any(_takes(spec, size) for spec in specs):
            subsets.extend(itertools.combinations(keys, size))
    return subsets


def _takes(spec, size: int) -> bool:
    """Whether the bench evaluates a fusion on subsets of ``size`` backbones."""
    return spec.min_backbones <= size and (spec.max_backbones is None or size <= spec.max_backbones)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------

class _Backend:
    """The joblib configuration of a run (and, for dask, the client it owns)."""

    def __init__(self, backend: str | None, scheduler: str | None, n_jobs: int | None,
                 share_fs: bool | None):
        backend = backend or "loky"
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        mark_parent()
        self.name = backend
        self.n_jobs = n_jobs
        self.client = None
        self.cluster = None
        self.owns_client = False
        self.share_fs = True
        self.address = None
        if backend != "dask":
            if scheduler:
                raise ConfigError("--scheduler is only used with --backend dask")
            return
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ConfigError("--backend dask needs dask.distributed: install featstack[dask] "
                              "(pip install 'featstack[dask]')") from None
        address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        if address:
            try:
                self.client = Client(address, timeout="30s", set_as_default=False)
            except (OSError, TimeoutError) as e:
                raise ConfigError(f"cannot connect to the dask scheduler at {address!r}: {e}") from e
            host = urlparse(address if "://" in address else f"tcp://{address}").hostname or ""
            local = address.startswith("inproc://") or host in ("localhost", "127.0.0.1", "::1")
        else:
            workers = max(1, n_jobs if n_jobs and n_jobs > 0 else (os.cpu_count() or 1))
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster, set_as_default=False)
            local = True
        self.owns_client = True
        self.address = address or self.cluster.scheduler_address
        self.share_fs = local if share_fs is None else bool(share_fs)
        self.n_jobs = -1

    def config(self, scatter: list | None = None):
        if self.name != "dask":
            return parallel_config(backend=self.name, n_jobs=self.n_jobs)
        kw = {"scatter": scatter} if scatter else {}
        return parallel_config(backend="dask", n_jobs=-1, client=self.client, **kw)

    def close(self) -> None:
        if self.client is not None and self.owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _run_tasks(tasks: list, backend: _Backend, bar, scatter: list | None = None) -> dict:
    """Run (tag, delayed call) tasks through joblib, updating the progress bar as they finish."""
    if not tasks:
        return {}
    out = {}
    with backend.config(scatter):  # loky, threading and dask all support generators
        for tag, value in Parallel(return_as="generator_unordered")(tasks):
            out[tag] = value
            bar.update(1)
    return out


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------

def run_bench(cache: Cache | str | os.PathLike, *, heads: str | Sequence[str],
              fusions: str | Sequence[str], backbones: str | Sequence[str] | None = None,
              max_size: int = 3, cv: int = 5, n_jobs: int | None = 1, random_state: int = 0,
              tune: bool = False, out: str | os.PathLike | None = None, backend: str | None = "loky",
              scheduler: str | None = None, share_fs: bool | None = None,
              progress: bool = True) -> BenchResult:
    """Cross-validate every backbone subset (sizes 1..``max_size``) × head × fusion.

    ``single`` is evaluated on subsets of size 1, ``concat``/``vote``/``stack`` on sizes >= 2.
    Folds: ``StratifiedKFold(cv, shuffle=True, random_state)`` over the cache's training rows
    (split "train", labelled, not in the error table); where labelled test rows exist, every
    model is also refit on all training rows and scored on them. Per (backbone, head) the base
    fits are done once and shared by every subset (see the module docstring), so the result
    equals fitting each model separately, at the cost of the backbones rather than the subsets.

    ``fit_seconds`` of a row is what fitting that model on one outer-training fold costs on its
    own (mean over folds; shared parts counted in full), so rows compare as stand-alone models.

    Every task runs with one BLAS/OpenMP thread (parallelism is over tasks: use ``n_jobs``);
    small head fits are many times faster that way than with competing BLAS threads.

    ``backend``: ``loky`` (default), ``threading`` or ``dask`` (``scheduler`` address, else
    ``DASK_SCHEDULER_ADDRESS``, else a LocalCluster with ``n_jobs`` workers). With dask,
    ``share_fs`` (default: True for local schedulers) makes tasks read the cache by path on the
    workers; otherwise the feature arrays are scattered to them. With ``out``, writes
    results.csv, results.md, bench.json, heatmap.png and best_by_size.png there.
    """
    t_start = time.perf_counter()
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    head_list = _names(heads, "head") or []
    if not head_list:
        raise ConfigError("no head given: pass --heads logreg,... (see featstack.heads)")
    for h in head_list:
        head_spec(h)
    fusion_list = _names(fusions, "fusion") or []
    if not fusion_list:
        raise ConfigError(f"no fusion given: pass --fusions {','.join(list_fusions())}")
    for f in fusion_list:
        fusion_spec(f)
    max_size = _check_int("max_size", max_size, 1)
    cv = _check_int("cv", cv, 2)
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0):
        raise ConfigError(f"n_jobs must be a non-zero integer (-1 = all cores), got {n_jobs!r}")
    keys = _names(backbones, "backbone")
    if keys is None:
        keys = list(cache.backbones)
        if not keys:
            raise CacheError(f"{cache.path} holds no complete backbone to bench "
                             f"(listed: {', '.join(cache.all_backbones) or 'none'})")
    for k in keys:
        if k not in cache.all_backbones:
            raise CacheError(f"{cache.path}: backbone {k!r} is not in this cache "
                             f"(it has: {', '.join(cache.all_backbones) or 'none'})")
    subsets = _plan_subsets(keys, fusion_list, max_size)
    combos = [(s, f) for s in subsets for f in fusion_list if _takes(fusion_spec(f), len(s))]
    if not combos:
        raise ConfigError(
            f"nothing to evaluate: fusions {', '.join(fusion_list)} with {len(keys)} backbone(s) and "
            f"max_size {max_size} ({bench_sizes_hint()})")

    be = _Backend(backend, scheduler, n_jobs, share_fs)  # unknown backend, dask missing: fail early
    try:
        return _run(cache, be, keys, head_list, fusion_list, subsets, combos, max_size, cv, n_jobs,
                    random_state, tune, out, progress, t_start)
    finally:
        be.close()


def _run(cache, be, keys, head_list, fusion_list, subsets, combos, max_size, cv, n_jobs, random_state,
         tune, out, progress, t_start) -> BenchResult:
    from tqdm.auto import tqdm

    train_rows, test_rows, n_excluded = bench_rows(cache)
    require_training_rows(cache, train_rows)
    y_train_raw = cache.labels[train_rows]
    y_test = cache.labels[test_rows]
    n_train, n_test = len(train_rows), len(test_rows)
    classes, y = np.unique(y_train_raw, return_inverse=True)
    y = y.astype(np.int64)
    specs = {f: fusion_spec(f) for f in fusion_list}
    want_oof = any(specs[f].needs_oof for _, f in combos)
    want_base = any(specs[f].bench_combine is not None for _, f in combos)
    outer = list(_splitter(cv, random_state).split(np.zeros(n_train), y)) \
        if len(np.unique(y)) >= 2 and np.bincount(y).min() >= cv else []
    _check_classes(cache, y_train_raw, cv, want_oof, tune, outer)
    folds = {k: (tr, te) for k, (tr, te) in enumerate(outer)}
    if n_test:
        folds[REFIT] = (np.arange(n_train), n_train + np.arange(n_test))

    # Features: read once per backbone here (validated), then arrays or by-path references.
    all_rows = np.concatenate([train_rows, test_rows])
    used = sorted({k for s in subsets for k in s}, key=keys.index)
    arrays = {}
    for k in used:
        X = cache.features(k, rows=all_rows, dtype=np.float32)
        check_finite_features(cache, X, all_rows, [k], [X.shape[1]])
        arrays[k] = X
    dims = {k: arrays[k].shape[1] for k in used}

    scatter = None
    if be.name == "dask" and be.share_fs:
        path = str(Path(cache.path).resolve())
        srcs = {k: CacheBlock(path, k, cache.dataset_fingerprint, cache.fingerprint(k)) for k in used}
    else:
        srcs = arrays
        if be.name == "dask":
            scatter = list(arrays.values()) + [y]

    # Heads are built here, in the caller's process, where every registered head exists.
    protos = {h: create_head(h, tune=tune, random_state=random_state) for h in head_list}
    base_tasks = []
    if want_base:
        for k in used:
            for h in head_list:
                for f, (tr, te) in folds.items():
                    base_tasks.append(delayed(_base_task)(
                        ("base", k, h, f), srcs[k], y, tr, te, protos[h], cv, random_state, want_oof))
    fit_tasks = [
        delayed(_fit_task)(("fit", fu, s, h, f), [srcs[k] for k in s], y, tr, te,
                           specs[fu].build(h, tuple(dims[k] for k in s), cv=cv, random_state=random_state,
                                           tune=tune, n_jobs=None))
        for s, fu in combos if specs[fu].bench_combine is None for h in head_list
        for f, (tr, te) in folds.items()]
    combined = [(s, fu) for s, fu in combos if specs[fu].bench_combine is not None]
    bar = tqdm(total=len(base_tasks) + len(fit_tasks) + len(combined) * len(head_list), desc="bench",
               unit="task", disable=not progress, dynamic_ncols=True)
    with bar:
        done = _run_tasks(base_tasks + fit_tasks, be, bar, scatter)
        combine_tasks = [
            delayed(_meta_task)(("combine", fu, s, h), specs[fu].bench_combine,
                                   {f: ([done[("base", k, h, f)] for k in s], y[tr]) for f, (tr, _) in folds.items()},
                                   len(classes), random_state)
            for s, fu in combined for h in head_list]
        done.update(_run_tasks(combine_tasks, be, bar))

    # Scores
    n_base_fits = sum(v["n_fits"] for t, v in done.items() if t[0] == "base")
    n_concat_fits = sum(1 for t in done if t[0] == "fit")
    n_meta_fits = sum(m["n_fits"] for t, v in done.items() if t[0] == "combine" for m in v.values())
    fold_ids = [k for k in folds if k != REFIT]
    rows, fold_scores = [], {}
    for s, fu in combos:
        for h in head_list:
            preds, times = {}, {}
            for f in folds:
                if specs[fu].bench_combine is None:
                    p = done[("fit", fu, s, h, f)]
                    preds[f], times[f] = p["pred"], p["fit_s"]
                else:
                    parts = [done[("base", k, h, f)] for k in s]
                    m = done[("combine", fu, s, h)][f]
                    preds[f] = m["pred"]
                    own_oof = specs[fu].needs_oof  # a fusion's cost counts the inner folds it uses
                    times[f] = sum(p["fit_s"] + (p["oof_s"] if own_oof else 0.0) for p in parts) + m["fit_s"]
            acc = [accuracy_score(y_train_raw[folds[f][1]], classes[preds[f]]) for f in fold_ids]
            f1 = [f1_score(y_train_raw[folds[f][1]], classes[preds[f]], average="macro", zero_division=0)
                  for f in fold_ids]
            name = "+".join(s)
            row = {"backbones": name, "head": h, "fusion": fu, "size": len(s),
                   "cv_accuracy_mean": float(np.mean(acc)), "cv_accuracy_std": float(np.std(acc)),
                   "cv_f1_macro_mean": float(np.mean(f1)), "cv_f1_macro_std": float(np.std(f1)),
                   "test_accuracy": None, "test_f1_macro": None,
                   "fit_seconds": float(np.mean([times[f] for f in fold_ids])),
                   "n_train": n_train, "n_test": n_test}
            if n_test:
                yhat = classes[preds[REFIT]]
                row["test_accuracy"] = float(accuracy_score(y_test, yhat))
                row["test_f1_macro"] = float(f1_score(y_test, yhat, average="macro", zero_division=0))
            rows.append(row)
            fold_scores[(name, h, fu)] = {"accuracy": [float(a) for a in acc],
                                          "f1_macro": [float(v) for v in f1]}
    rows = mark_random_init(rank_rows(rows), cache)

    settings = {"heads": head_list, "fusions": fusion_list, "backbones": keys, "max_size": max_size,
                "cv": cv, "random_state": random_state, "tune": bool(tune), "n_jobs": n_jobs,
                "backend": be.name, "scheduler": be.address, "share_fs": be.share_fs if be.name == "dask" else None}
    result = BenchResult(rows=rows, folds=fold_scores, n_base_fits=n_base_fits,
                         n_concat_fits=n_concat_fits, n_meta_fits=n_meta_fits, n_train=n_train,
                         n_test=n_test, n_excluded=n_excluded,
                         seconds=time.perf_counter() - t_start, settings=settings)
    if out is not None:
        result.out = write_outputs(result, cache, out, dims=dims)
    return result


def mark_random_init(rows: list[dict], cache: Cache) -> list[dict]:
    """Set each row's ``random_init``: its backbones with seeded random weights ("+"-joined; empty
    when all are pretrained), so a random-init score is never mistaken for a pretrained one."""
    random = {k for k in cache.backbones if cache.backbone_info(k).get("weights_source") == "none"}
    for r in rows:
        r["random_init"] = "+".join(k for k in str(r["backbones"]).split("+") if k in random)
    return rows


def _rank_key(row: dict, metric: str) -> tuple:
    """THE ranking rule (the bench table, ``BenchResult.best``, the pipeline's choice of model
    and the report all rank through it): ``metric`` (rows without a value last), then cv
    macro-F1, then smaller subsets, then by name (deterministic, so equal runs give equal files)."""
    value, f1 = row.get(metric), row.get("cv_f1_macro_mean")
    return (value is None, -float(value or 0.0), -float(f1 or 0.0), int(row.get("size") or 1),
            str(row.get("backbones")), str(row.get("head")), str(row.get("fusion")))


def rank_rows(rows: Iterable[dict], metric: str = "cv_accuracy_mean") -> list[dict]:
    """Copies of the rows, best first by :func:`_rank_key`, with ``rank`` set from 1."""
    ranked = sorted(rows, key=lambda r: _rank_key(r, metric))
    return [{"rank": i + 1, **{k: v for k, v in r.items() if k != "rank"}} for i, r in enumerate(ranked)]


def best_row(rows: Sequence[dict], metric: str = "cv_accuracy_mean") -> dict:
    """The first row by the ranking rule among those with a value for ``metric``; a ConfigError
    when there is none or ``metric`` is not a bench column."""
    rows = list(rows)
    if not rows:
        raise ConfigError("the bench produced no rows")
    if metric not in rows[0]:
        raise ConfigError(f"{metric!r} is not a bench column ({', '.join(rows[0])})")
    scored = [r for r in rows if r[metric] is not None]
    if not scored:
        raise ConfigError(f"no row has a value for {metric!r} (is there a test split?)")
    return min(scored, key=lambda r: _rank_key(r, metric))


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def _cell(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _init_cell(r: dict) -> str:
    rnd = r.get("random_init")
    return f"RANDOM INIT: {rnd}" if rnd else ""


def format_table(rows: Sequence[dict], top: int = 20) -> str:
    """Fixed-width ranked table of the first ``top`` rows (mean ± std over folds)."""
    head = ["#", "backbones", "head", "fusion", "cv acc", "cv f1", "test acc", "fit s", "random init"]
    body = []
    for r in list(rows)[:top]:
        body.append([str(r["rank"]), r["backbones"], r["head"], r["fusion"],
                     f"{r['cv_accuracy_mean']:.4f} ± {r['cv_accuracy_std']:.4f}",
                     f"{r['cv_f1_macro_mean']:.4f} ± {r['cv_f1_macro_std']:.4f}",
                     _cell(r["test_accuracy"]) or "-", f"{r['fit_seconds']:.3f}", _init_cell(r)])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more rows in results.csv")
    return "\n".join(lines)


def _markdown(result: BenchResult, cache: Cache) -> str:
    s = result.settings
    lines = [f"# Bench of {cache.path}", "",
             f"{len(result.rows)} models: backbones {', '.join(s['backbones'])} (subsets up to "
             f"{min(s['max_size'], len(s['backbones']))}) × heads {', '.join(s['heads'])} × fusions {', '.join(s['fusions'])}. "
             f"{s['cv']}-fold stratified CV (seed {s['random_state']}) on {result.n_train} training rows"
             + (f" ({result.n_excluded} excluded: decode errors)" if result.n_excluded else "")
             + (f"; test scores after a refit on all of them, on {result.n_test} test rows."
                if result.n_test else "; no labelled test split."),
             f"{result.n_base_fits} base fits (shared by all subsets), {result.n_concat_fits} concat "
             f"fits, {result.n_meta_fits} meta-learner fits, {result.seconds:.1f} s.", "",
             "| rank | backbones | head | fusion | cv accuracy | cv macro-F1 | test accuracy | "
             "test macro-F1 | fit s | random init |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result.rows:
        lines.append(
            f"| {r['rank']} | {r['backbones']} | {r['head']} | {r['fusion']} | "
            f"{r['cv_accuracy_mean']:.4f} ± {r['cv_accuracy_std']:.4f} | "
            f"{r['cv_f1_macro_mean']:.4f} ± {r['cv_f1_macro_std']:.4f} | "
            f"{_cell(r['test_accuracy']) or '-'} | {_cell(r['test_f1_macro']) or '-'} | "
            f"{r['fit_seconds']:.3f} | {_init_cell(r)} |")
    return "\n".join(lines) + "\n"


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_outputs(result: BenchResult, cache: Cache, out: str | os.PathLike,
                  dims: dict | None = None) -> Path:
    """results.csv, results.md, bench.json and the two PNG plots, in ``out`` (created)."""
    from . import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in result.rows:
            w.writerow({k: _cell(r[k], 6) if isinstance(r[k], float) else _cell(r[k]) for k in CSV_COLUMNS})
    os.replace(tmp, out / "results.csv")
    (out / "results.md").write_text(_markdown(result, cache))
    doc = {
        "featstack_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "cache": str(cache.path),
        "cache_fingerprint": cache.dataset_fingerprint,
        "backbone_fingerprints": {k: cache.fingerprint(k) for k in result.settings["backbones"]},
        "dims": dims or {},
        "classes": list(cache.classes),
        "settings": result.settings,
        "n_train": result.n_train, "n_test": result.n_test, "n_excluded": result.n_excluded,
        "n_base_fits": result.n_base_fits, "n_concat_fits": result.n_concat_fits,
        "n_meta_fits": result.n_meta_fits, "seconds": result.seconds,
        "rows": [{k: _json_safe(v) for k, v in r.items()} for r in result.rows],
        "folds": [{"backbones": b, "head": h, "fusion": f, **v} for (b, h, f), v in result.folds.items()],
    }
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    plots.heatmap(result.rows, out / "heatmap.png")
    plots.best_by_size(result.rows, out / "best_by_size.png")
    return out
