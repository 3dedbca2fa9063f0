"""The backbone-combination benchmark: every subset of the cached backbones × head × fusion,
cross-validated on the training split, with each (backbone, head) fitted once and reused.

Why the reuse matters: for K backbones and subsets up to size m there are Σ C(K, s) subsets, and
a naive grid fits one stacking ensemble per subset, i.e. Σ |S| base heads per fold. The base heads
of ``single``, ``vote`` and ``stack`` only ever see one backbone's columns, so their fitted models
and out-of-fold scores are the same in every subset that contains that backbone. The bench
computes, once per (backbone, head, outer fold k):

* the base head fitted on outer-train k, with its raw outputs on outer-test k (used by ``single``,
  by ``vote``: argmax of the mean of the blocks' probabilities, and by ``stack`` at prediction);
* its inner out-of-fold scores on outer-train k (what :func:`featstack.fusion.out_of_fold` computes:
  the same seeded ``StratifiedKFold`` and size pins as :class:`featstack.fusion.StackClassifier`),
  from which ``stack`` fits its meta-learner per subset.

So ``stack``'s fold scores equal ``cross_validate(StackClassifier(head, dims, cv, random_state),
X, y, cv=StratifiedKFold(cv, shuffle=True, random_state))`` exactly, while the number of base fits
is ``K × heads × cv × (cv + 1)`` (plus ``cv + 1`` per (backbone, head) for the test-split refit),
whatever the number of subsets. ``concat`` cannot be shared (one head over all columns), so it
costs one fit per (subset, head, fold). The meta-learners are small (|S| × n_classes columns),
but there is one per (subset, head, fold): all of one (head, fold)'s are fitted in one task, side
by side (:func:`featstack.fusion.bench_stack_many`, :mod:`featstack.logistic`), which on small
grids took the meta-learners from 60% to 20% of the base fits' time.

All work goes through joblib at the outermost level (tasks = (backbone, fold) for the heads that
start with the same scaler, fitted once for them all (:mod:`featstack.head_groups`; (backbone,
head, fold) when that would leave too few tasks to keep the workers busy; under
``stack_folds="shared"``, one task per shared fit for those heads), then (fusion, head, fold)
over all subsets), one task per dispatch (each is long enough to be worth one; joblib's
automatic batching of short tasks can leave a worker idle at the end of a phase); ``backend="dask"`` runs the same tasks on a
dask.distributed cluster through joblib's dask backend. This module (like the whole CPU side) never imports torch.
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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlparse

import numpy as np
from joblib import Parallel, delayed, parallel_config
from sklearn.base import clone

from . import __version__
from .bench_progress import BenchProgress
from .cache import Cache, open_cache, select_rows
from .config import RANK_METRICS, STACK_FOLDS
from .errors import BenchError, CacheError, CacheMismatchError, ConfigError, DataError
from .fusion import (FUSION_SPECS, FusionSpec, aligned_scores, bench_sizes_hint, fusion_spec, list_fusions,
                     stack_method,
                     stack_splitter)
from .head_groups import first_step_key, fit_heads
from .heads import HEADS, HeadSpec, create_head, head_spec, labels_from_decision, pin_size_choices, size_pins
from .models import check_finite_features, check_training_classes, inner_folds, require_training_rows
from .orphans import exit_with_parent, mark_parent

BACKENDS = ("loky", "threading", "dask")
CSV_COLUMNS = ["rank", "backbones", "head", "fusion", "size", "cv_accuracy_mean", "cv_accuracy_se", "cv_accuracy_std",
               "cv_f1_macro_mean", "cv_f1_macro_se", "cv_f1_macro_std", "tied_with_best", "test_accuracy",
               "test_f1_macro", "fit_seconds", "n_train", "n_test", "random_init", "status", "error"]
REFIT = -1  # fold index of the refit on all training rows, scored on the test split


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------

@dataclass
class BenchResult:
    """What a bench run produced.

    ``rows`` are ranked by :func:`rank_rows` (cv accuracy; rank 1 is the cheapest configuration
    tied with the best within noise; failed cells last, with ``status`` "failed" and ``error``).
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
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    out: Path | None = None

    def best(self, metric: str = "cv_accuracy_mean") -> dict:
        """The pick by a cross-validated ``metric`` (see :func:`best_row`)."""
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


def _failure(what: str, error: Exception) -> dict:
    """A task's result when its fit failed: one line naming the task and the error, so the grid
    records the failed cells and goes on (one degenerate cell must not cost the whole grid)."""
    lines = str(error).strip().splitlines()
    text = f"{what}: {type(error).__name__}" + (f": {lines[0]}" if lines else "")
    return {"error": text if len(text) <= 300 else text[:297] + "..."}


def _fold_name(fold: int) -> str:
    return "the refit on all training rows" if fold == REFIT else f"outer fold {fold + 1}"


def _attempt(what: str, step, *args) -> dict:
    """``step(*args)`` (a dict) with the warnings it raised as data (``warnings``: distinct
    "Category: message" lines, reported once by the bench instead of once per fit on stderr),
    or, when it raises, :func:`_failure` naming ``what``."""
    with _recorded_warnings() as caught:
        try:
            out = step(*args)
        except Exception as e:  # noqa: BLE001 - recorded as the failed cells' error
            return _failure(what, e)
    out["warnings"] = sorted(caught)
    return out


@contextlib.contextmanager
def _recorded_warnings():
    """Yield a set that, once the block ends, holds the warnings raised inside as distinct
    "Category: message" lines.

    Warnings are captured only in a process's main thread (this process at n_jobs 1, a loky
    worker): ``warnings.catch_warnings`` swaps process-wide state, which tasks running as
    concurrent threads (threading backend, dask worker threads) would restore out of order."""
    lines: set[str] = set()
    if threading.current_thread() is not threading.main_thread():
        yield lines
        return
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        yield lines
    lines.update(f"{w.category.__name__}: {(str(w.message).splitlines() or [''])[0]}" for w in got)


def _base_task(tags, src, y, train_idx, test_idx, protos, cv, random_state, need_oof, beats):
    """One (backbone, fold) for one or several heads (tags ("base", backbone, head, fold)): each
    head on outer-train, its outputs on outer-test and, for fusions that need them, its inner
    out-of-fold scores on outer-train. Heads with the same first step share its fits
    (:mod:`featstack.head_groups`); each head succeeds or fails alone. Returns [(tag, result)]."""
    X = _resolve(src)  # outside the attempt: a cache that cannot be read fails the bench, not a cell
    for beat in beats:
        beat.start()
    with _one_thread():
        return _base_group(tags, X, y, train_idx, test_idx, protos, cv, random_state, need_oof, beats)


def _base_group(tags, X, y, train_idx, test_idx, protos, cv, random_state, need_oof, beats) -> list:
    heads = dict(zip(tags, protos))
    run = _HeadRuns(tags, beats)
    res = {tag: {"oof": None, "oof_s": 0.0, "n_fits": 1 + (cv if need_oof else 0)} for tag in tags}

    def outer(tag, fitted) -> None:
        r, Xs = res[tag], fitted.X_score["test"]
        r["method"] = method = stack_method(heads[tag])  # a head without scores fails here, alone
        r["raw"] = getattr(fitted.final, method)(Xs) if len(test_idx) else None
        r["pred"] = _labels(fitted.final, method, r["raw"], Xs) if len(test_idx) else np.empty(0, dtype=y.dtype)
        r["fit_s"] = fitted.seconds

    run.each(fit_heads(heads, X, y, train_idx, {"test": test_idx}, run.watch), outer)
    if need_oof:
        ytr = y[train_idx]
        classes = np.unique(ytr)
        pinned = {tag: pin_size_choices(clone(p), len(train_idx)) for tag, p in heads.items()}
        for a, b in stack_splitter(cv, random_state).split(np.zeros((len(ytr), 1)), ytr):
            def inner(tag, fitted, b=b) -> None:
                t0 = time.perf_counter()
                scores = aligned_scores(fitted.final, res[tag]["method"], fitted.X_score["held"], classes)
                r = res[tag]
                if r["oof"] is None:
                    r["oof"] = np.empty((len(ytr),) + scores.shape[1:], dtype=scores.dtype)
                r["oof"][b] = scores
                r["oof_s"] += fitted.seconds + time.perf_counter() - t0

            live = {tag: p for tag, p in pinned.items() if tag not in run.failed}
            run.each(fit_heads(live, X, y, train_idx[a], {"held": train_idx[b]}, run.watch), inner)
    return run.results(res, lambda tag: f"{tag[2]} on {tag[1]}, {_fold_name(tag[3])}")


class _HeadRuns:
    """The heads of one grouped task, each succeeding or failing alone: per head its warnings
    (:func:`_recorded_warnings`), its first error, and its heartbeat, which hears of each of
    its fits."""

    def __init__(self, tags: list, beats: list):
        self.beat_of = dict(zip(tags, beats))
        self.caught = {tag: set() for tag in tags}
        self.failed: dict = {}

    @contextlib.contextmanager
    def watch(self, names: list):
        """Record the warnings raised inside for each of ``names`` (``fit_heads``'s ``watch``)."""
        with _recorded_warnings() as lines:
            yield
        for name in names:
            self.caught[name].update(lines)

    def each(self, fits: dict, use) -> None:
        """``use(tag, fitted)`` (scoring) for every head whose fit succeeded; a fit's or a use's
        exception fails that head, and the heartbeat hears of the fit when it is used."""
        for tag, fitted in fits.items():
            if isinstance(fitted, Exception):
                self.failed[tag] = fitted
                continue
            t0 = time.perf_counter()
            try:
                with self.watch([tag]):
                    use(tag, fitted)
            except Exception as exc:  # noqa: BLE001 - recorded as this head's failure
                self.failed[tag] = exc
                continue
            self.beat_of[tag].fit(fitted.seconds + time.perf_counter() - t0)

    def results(self, res: dict, name_of) -> list:
        """[(tag, its result with its warnings, or its failure named by ``name_of(tag)``)]."""
        return [(tag, _failure(name_of(tag), self.failed[tag]) if tag in self.failed
                 else res[tag] | {"warnings": sorted(self.caught[tag])}) for tag in self.beat_of]


GROUP_TASKS_PER_WORKER = 4
"""Heads share a base task only when that leaves at least this many tasks per worker."""


def _head_groups(protos: dict, n_slots: int, workers: int) -> list[tuple[str, ...]]:
    """Which heads one base task fits together, per (backbone, fold): the heads whose first
    steps are equal (:func:`featstack.head_groups.first_step_key`: one scaler fit serves them
    all), when the ``n_slots`` (backbone, fold) pairs are enough tasks to keep ``workers``
    busy (:data:`GROUP_TASKS_PER_WORKER` each); otherwise, and for the other heads, one head
    per task (fewer, longer tasks would leave workers idle at the end)."""
    if n_slots < GROUP_TASKS_PER_WORKER * max(1, workers):
        return [(h,) for h in protos]
    groups: dict = {}
    for h, proto in protos.items():
        key = first_step_key(proto)
        groups.setdefault(h if key is None else key, []).append(h)
    return [tuple(hs) for hs in groups.values()]


def _labels(est, method: str, scores: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Predicted labels of X, from the decision scores already computed when they determine them
    (one pass over the rows instead of two)."""
    pred = labels_from_decision(est, scores) if method == "decision_function" else None
    return est.predict(X) if pred is None else pred


def _model_task(tags, src, y, train_idx, score_on, protos, classes, beats):
    """One shared fit (``stack_folds="shared"``) for one or several heads (tags ("model",
    backbone, head, outer folds left out, pinned size choices)): each head on ``train_idx``,
    scored (stack method, one column per class) on each named row set of ``score_on``; an
    outer model (no pinned size choices, at most one fold left out) also predicts their labels.
    Heads with the same first step share its fit, as in :func:`_base_task`."""
    X = _resolve(src)
    for beat in beats:
        beat.start()
    with _one_thread():
        return _model_group(tags, X, y, train_idx, score_on, protos, classes, beats)


def _model_group(tags, X, y, train_idx, score_on, protos, classes, beats) -> list:
    heads = {tag: clone(p).set_params(**dict(tag[4])) if tag[4] else p for tag, p in zip(tags, protos)}
    run = _HeadRuns(tags, beats)
    res = {}

    def scored(tag, fitted) -> None:
        method = stack_method(heads[tag])
        scores = {name: aligned_scores(fitted.final, method, Xs, classes) for name, Xs in fitted.X_score.items()}
        preds = {} if tag[4] else {name: _labels(fitted.final, method, scores[name], Xs)
                                   for name, Xs in fitted.X_score.items()}
        res[tag] = {"method": method, "scores": scores, "preds": preds, "fit_s": fitted.seconds, "n_fits": 1}

    run.each(fit_heads(heads, X, y, train_idx, score_on, run.watch), scored)
    return run.results(res, lambda tag: f"{tag[2]} on {tag[1]}, {_model_name(tag[3])}")


def _model_name(left_out: tuple) -> str:
    if not left_out:
        return "the refit on all training rows"
    return "without outer fold" + ("s " if len(left_out) > 1 else " ") + " and ".join(str(f + 1) for f in left_out)


def _shared_fits(folds: dict, proto, n_train: int) -> dict:
    """Under ``stack_folds="shared"``, which fit serves each fold of one (backbone, head):
    fold → (its outer model's key, {outer fold j: the key of the fit scoring j for its inner
    out-of-fold scores}). A key is (outer folds left out, pinned size choices).

    Outer fold f's model leaves out f (as in nested mode); its inner scores on outer fold j come
    from the model leaving out f and j, the same fit for f and j (when the size choices pinned
    for f's and j's training sizes agree: always, but near svm-rbf's switch). The test-split
    refit's inner models leave out one outer fold each: the outer models themselves when the
    head makes no size choice."""
    outer = [f for f in folds if f != REFIT]
    plan = {}
    for f, (tr, _) in folds.items():
        left = () if f == REFIT else (f,)
        pins = tuple(sorted(size_pins(proto, n_train if f == REFIT else len(tr)).items()))
        plan[f] = ((left, ()), {j: (tuple(sorted(set(left) | {j})), pins) for j in outer if j != f})
    return plan


def _shared_models(plan: dict, folds: dict) -> dict:
    """The distinct fits of a :func:`_shared_fits` plan → {fold: rows to score}."""
    need: dict = {}
    for f, (outer_key, inner) in plan.items():
        need.setdefault(outer_key, {})[f] = folds[f][1]
        for j, key in inner.items():
            need.setdefault(key, {})[j] = folds[j][1]
    return need


def _shared_base(done: dict, k: str, h: str, folds: dict, plan: dict) -> dict:
    """``_base``'s result for every fold of (k, h), assembled from the shared fits."""
    out = {}
    for f, (tr, te) in folds.items():
        outer_key, inner_keys = plan[f]
        model = done[("model", k, h, *outer_key)]
        inner = {j: done[("model", k, h, *key)] for j, key in inner_keys.items()}
        err = _first_error([model, *inner.values()])
        if err:
            out[f] = {"error": err}
            continue
        parts = [m["scores"][j] for j, m in inner.items()]
        oof = np.empty((len(tr),) + parts[0].shape[1:], dtype=np.result_type(*parts))
        for j, part in zip(inner, parts):
            oof[np.searchsorted(tr, folds[j][1])] = part
        out[f] = {"method": model["method"], "raw": model["scores"][f] if len(te) else None,
                  "pred": model["preds"][f], "oof": oof, "fit_s": model["fit_s"],
                  "oof_s": sum(m["fit_s"] for m in inner.values()), "n_fits": 0}
    return out


def _fit_task(tag, srcs, y, train_idx, test_idx, proto, beat):
    """One (subset, head, fold) of a fusion the bench cannot assemble from shared per-backbone
    fits (``concat``, or a fusion registered without ``bench_combine``): its own estimator on
    all the subset's columns."""
    X = np.hstack([_resolve(s) for s in srcs])
    beat.start()
    with _one_thread():
        return [(tag, _attempt(f"{tag[1]} of {'+'.join(tag[2])} with {tag[3]}, {_fold_name(tag[4])}", _fit,
                              X, y, train_idx, test_idx, proto, beat))]


def _fit(X, y, train_idx, test_idx, proto, beat):
    t0 = time.perf_counter()
    est = clone(proto).fit(X[train_idx], y[train_idx])
    fit_s = time.perf_counter() - t0
    pred = est.predict(X[test_idx]) if len(test_idx) else np.empty(0, dtype=y.dtype)
    beat.fit(time.perf_counter() - t0)
    return {"pred": pred, "fit_s": fit_s}


def _combine_task(tag, combine, combine_many, cells, ytr, n_classes, random_state, beat):
    """One (fusion, head, fold): the fusion's ``bench_combine`` over the shared per-backbone
    outputs of every subset in ``cells`` ({subset: parts}); a stack fits its meta-learners here,
    all of the fold's side by side (``bench_combine_many``). The value: per subset its result or
    failure, and the group's fit seconds."""
    _, fu, h, f = tag
    names = {s: f"{fu} of {'+'.join(s)} with {h}, {_fold_name(f)}" for s in cells}
    beat.start()
    with _one_thread():
        if combine_many is None:
            got = {s: _attempt(names[s], _combine, combine, parts, ytr, n_classes, random_state, beat)
                   for s, parts in cells.items()}
        else:
            group = _attempt(f"{fu} with {h}, {_fold_name(f)}", _combine_many, combine_many, cells, ytr,
                             n_classes, random_state, beat, names)
            got = group.get("cells") or {s: group for s in cells}  # the whole group failed: every cell says why
            if group.get("warnings") and got:
                first = next(iter(got.values()))
                first["warnings"] = sorted(set(first.get("warnings", [])) | set(group["warnings"]))
    return [(tag, {"cells": got, "fit_s": sum(v.get("fit_s", 0.0) for v in got.values())})]


def _cells_of_groups(groups: dict, folds: dict) -> dict:
    """The combine tasks' results per cell: ``("combine", fusion, subset, head)`` → per fold its
    result, or the failure of its first fold that failed."""
    cells: dict = {}
    for (_, fu, h, f), value in groups.items():
        for s, r in value["cells"].items():
            cells.setdefault(("combine", fu, s, h), {})[f] = r
    out = {}
    for tag, per_fold in cells.items():
        err = _first_error(per_fold[f] for f in folds if f in per_fold)
        out[tag] = {"error": err} if err else {f: per_fold[f] for f in folds}
    return out


def _combine(combine, parts, ytr, n_classes, random_state, beat):
    t0 = time.perf_counter()
    pred, n_fits = combine(parts, ytr, n_classes, random_state)
    beat.fit(time.perf_counter() - t0)
    return {"pred": np.asarray(pred, dtype=np.int64), "fit_s": time.perf_counter() - t0, "n_fits": n_fits}


def _combine_many(combine_many, cells, ytr, n_classes, random_state, beat, names):
    """All cells of a group at once; a cell whose own fit raised fails alone, named as
    :func:`_attempt` names it. Fit seconds are the group's, shared equally by its cells."""
    t0 = last = time.perf_counter()

    def on_done(_i: int) -> None:  # the bar moves as each cell's meta-learner converges
        nonlocal last
        now = time.perf_counter()
        beat.fit(now - last)
        last = now

    results = combine_many(list(cells.values()), ytr, n_classes, random_state, on_done=on_done)
    share = (time.perf_counter() - t0) / max(len(cells), 1)
    out = {}
    for s, r in zip(cells, results):
        if isinstance(r, BaseException):
            out[s] = _failure(names[s], r)
        else:
            pred, n_fits = r
            out[s] = {"pred": np.asarray(pred, dtype=np.int64), "fit_s": share, "n_fits": n_fits, "warnings": []}
    return {"cells": out}


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
        if any(spec.takes(size) for spec in specs):
            subsets.extend(itertools.combinations(keys, size))
    return subsets


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

    @property
    def workers(self) -> int:
        """Tasks that run at once (the progress bar's ETA divides the work left by it)."""
        if self.name != "dask":
            from joblib import effective_n_jobs

            return effective_n_jobs(self.n_jobs)
        try:
            return max(1, sum(w.get("nthreads", 1) for w in self.client.scheduler_info()["workers"].values()))
        except Exception:  # noqa: BLE001 - an estimate only
            return 1

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


def _run_tasks(tasks: list, backend: _Backend, bar: BenchProgress, scatter: list | None = None) -> dict:
    """Run ({tag: heartbeat}, delayed call returning [(tag, result)]) tasks through joblib; the
    bar hears of each result (and, through the heartbeats, of each fit before that)."""
    if not tasks:
        return {}
    beats = {tag: beat for task_beats, _ in tasks for tag, beat in task_beats.items()}
    out = {}
    with backend.config(scatter):  # loky, threading and dask all support generators
        for pairs in Parallel(return_as="generator_unordered", batch_size=1)(call for _, call in tasks):
            for tag, value in pairs:
                out[tag] = value
                bar.finish(beats[tag], _task_seconds(value))
    return out


def _task_seconds(value: dict) -> float | None:
    """Seconds a finished task spent in its fits (None when it failed): the ETA's measurements."""
    if "error" in value:
        return None
    if "fit_s" in value:
        return value["fit_s"] + value.get("oof_s", 0.0)
    return sum(v["fit_s"] for v in value.values())


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------

def run_bench(cache: Cache | str | os.PathLike, *, heads: str | Sequence[str],
              fusions: str | Sequence[str], backbones: str | Sequence[str] | None = None,
              max_size: int = 3, cv: int = 5, n_jobs: int | None = 1, random_state: int = 0,
              tune: bool = False, out: str | os.PathLike | None = None, backend: str | None = "loky",
              scheduler: str | None = None, share_fs: bool | None = None,
              progress: bool = True, stack_folds: str = "nested") -> BenchResult:
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
    if stack_folds not in STACK_FOLDS:
        raise ConfigError(f"stack_folds must be one of {', '.join(STACK_FOLDS)}, got {stack_folds!r}")
    if stack_folds == "shared" and cv < 3:
        raise ConfigError(f"stack_folds shared needs cv >= 3 (its inner folds are the other cv-1 outer folds, "
                          f"fitted without two of them), got cv={cv}")
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
    combos = [(s, f) for s in subsets for f in fusion_list if fusion_spec(f).takes(len(s))]
    if not combos:
        raise ConfigError(
            f"nothing to evaluate: fusions {', '.join(fusion_list)} with {len(keys)} backbone(s) and "
            f"max_size {max_size} ({bench_sizes_hint()})")

    be = _Backend(backend, scheduler, n_jobs, share_fs)  # unknown backend, dask missing: fail early
    try:
        return _run(cache, be, keys, head_list, fusion_list, subsets, combos, max_size, cv, n_jobs,
                    random_state, tune, out, progress, t_start, stack_folds)
    finally:
        be.close()


def _run(cache, be, keys, head_list, fusion_list, subsets, combos, max_size, cv, n_jobs, random_state,
         tune, out, progress, t_start, stack_folds) -> BenchResult:
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
    combined = [(s, fu) for s, fu in combos if specs[fu].bench_combine is not None]
    base_units = 1 + (cv if want_oof else 0)
    shared = stack_folds == "shared" and want_oof and want_base
    shared_plan = {h: _shared_fits(folds, protos[h], n_train) for h in head_list} if shared else {}
    models = {h: _shared_models(shared_plan[h], folds) for h in shared_plan}
    if shared:
        slots: dict = {}  # (folds left out, folds scored) -> [(head, pins)]: fits on the same rows, scoring the same rows
        for h in head_list:
            for (left, pins), score_on in models[h].items():
                slots.setdefault((left, frozenset(score_on)), []).append((h, pins))
        together = _head_groups(protos, len(used) * len(slots), be.workers)
        plan = []
        for k in used:
            for (left, _), members in slots.items():
                for hs in together:
                    group = tuple((h, pins) for h, pins in members if h in hs)
                    if group:
                        plan.append((("models", k, left, group), len(group)))
    else:
        together = _head_groups(protos, len(used) * len(folds), be.workers)
        plan = [(("base", k, hs, f), base_units * len(hs)) for k in (used if want_base else []) for hs in together
                for f in folds]
    plan += [(("fit", fu, s, h, f), 1) for s, fu in combos if specs[fu].bench_combine is None
             for h in head_list for f in folds]
    total = sum(u for _, u in plan) + len(combined) * len(head_list) * len(folds)
    with BenchProgress(total, be.workers, enabled=progress) as bar:
        tasks = []
        for tag, units in plan:
            if tag[0] == "models":
                _, k, left, group = tag
                rows = np.setdiff1d(np.arange(n_train), np.concatenate([folds[f][1] for f in left] or [[]]))
                beats = {("model", k, h, left, pins): bar.heartbeat(f"{h} on {k}, {_model_name(left)}", 1,
                                                                    (h, "base", dims[k]), dims[k])
                         for h, pins in group}
                score_on = models[group[0][0]][(left, group[0][1])]
                tasks.append((beats, delayed(_model_task)(list(beats), srcs[k], y, rows, score_on,
                                                          [protos[h] for h, _ in group], np.arange(len(classes)),
                                                          list(beats.values()))))
            elif tag[0] == "base":
                _, k, hs, f = tag
                beats = {("base", k, h, f): bar.heartbeat(f"{h} on {k}, {_fold_name(f)}", base_units,
                                                          (h, "base", dims[k]), dims[k]) for h in hs}
                tasks.append((beats, delayed(_base_task)(list(beats), srcs[k], y, *folds[f], [protos[h] for h in hs],
                                                         cv, random_state, want_oof, list(beats.values()))))
            else:
                _, fu, s, h, f = tag
                width = sum(dims[k] for k in s)
                beat = bar.heartbeat(f"{fu} of {'+'.join(s)} with {h}, {_fold_name(f)}", 1, (h, fu, width), width)
                est = specs[fu].build(h, tuple(dims[k] for k in s), cv=cv, random_state=random_state, tune=tune,
                                      n_jobs=None)
                tasks.append(({tag: beat}, delayed(_fit_task)(tag, [srcs[k] for k in s], y, *folds[f], est, beat)))
        done = _run_tasks(tasks, be, bar, scatter)
        for k in (used if shared else []):
            for h in head_list:
                done.update({("base", k, h, f): v for f, v in _shared_base(done, k, h, folds, shared_plan[h]).items()})
        tasks = []
        for fu in dict.fromkeys(fu for _, fu in combined):
            for h in head_list:
                subsets = []
                for s in (s for s, f2 in combined if f2 == fu):
                    if _first_error(done[("base", k, h, f)] for k in s for f in folds) is not None:
                        bar.drop(len(folds))  # the cell failed in a base fit: nothing to combine
                    else:
                        subsets.append(s)
                for f, (tr, _) in (folds.items() if subsets else ()):
                    cells = {s: [done[("base", k, h, f)] for k in s] for s in subsets}
                    # kind (name, stage, width): one unit is one cell's meta-learner, whatever the group
                    beat = bar.heartbeat(f"{fu} with {h}, {_fold_name(f)} ({len(cells)} subsets)", len(cells),
                                         (f"meta {h}", fu, 1), 1)
                    tag = ("combine", fu, h, f)
                    tasks.append(({tag: beat}, delayed(_combine_task)(tag, specs[fu].bench_combine,
                                                                      specs[fu].bench_combine_many, cells, y[tr],
                                                                      len(classes), random_state, beat)))
        done.update(_cells_of_groups(_run_tasks(tasks, be, bar), folds))

    # Scores
    n_base_fits = sum(v.get("n_fits", 0) for t, v in done.items() if t[0] in ("base", "model"))
    n_concat_fits = sum(1 for t, v in done.items() if t[0] == "fit" and "error" not in v)
    n_meta_fits = sum(m["n_fits"] for t, v in done.items() if t[0] == "combine" and "error" not in v
                      for m in v.values())
    fold_ids = [k for k in folds if k != REFIT]
    y_true = {f: (y_train_raw[te] if f != REFIT else y_test) for f, (_, te) in folds.items()}
    rows, fold_scores = [], {}
    for s, fu in combos:
        for h in head_list:
            row = {"backbones": "+".join(s), "head": h, "fusion": fu, "size": len(s)}
            got = _cell_outputs(done, specs[fu], s, h, folds)
            if isinstance(got, str):
                row.update(dict.fromkeys(SCORE_COLUMNS), n_train=n_train, n_test=n_test, status="failed", error=got)
            else:
                preds, times = got
                row.update(_scores({f: (y_true[f], classes[preds[f]]) for f in folds}, fold_ids),
                           fit_seconds=float(np.mean([times[f] for f in fold_ids])), n_train=n_train,
                           n_test=n_test, status="ok", error="")
                fold_scores[(row["backbones"], h, fu)] = {"accuracy": row["cv_accuracy_folds"],
                                                          "f1_macro": row["cv_f1_macro_folds"]}
            rows.append(row)
    rows = mark_random_init(rank_rows(rows), cache)

    settings = {"heads": head_list, "fusions": fusion_list, "backbones": keys, "max_size": max_size,
                "cv": cv, "random_state": random_state, "tune": bool(tune), "n_jobs": n_jobs,
                "stack_folds": stack_folds,
                "backend": be.name, "scheduler": be.address, "share_fs": be.share_fs if be.name == "dask" else None}
    result = BenchResult(rows=rows, folds=fold_scores, n_base_fits=n_base_fits,
                         n_concat_fits=n_concat_fits, n_meta_fits=n_meta_fits, n_train=n_train,
                         n_test=n_test, n_excluded=n_excluded, warnings=_distinct_warnings(done),
                         seconds=time.perf_counter() - t_start, settings=settings)
    if out is not None:
        result.out = write_outputs(result, cache, out, dims=dims)
    if all(r["status"] == "failed" for r in rows):
        where = f" (errors in {result.out / 'results.csv'})" if result.out else ""
        raise BenchError(f"every one of the {len(rows)} configurations failed{where}; the first: {rows[0]['error']}")
    return result


def _distinct_warnings(done: dict) -> list[str]:
    """Every distinct warning the fits raised ("Category: message"), with how many tasks raised it."""
    counts: dict[str, int] = {}
    for tag, v in done.items():
        for part in (v.values() if tag[0] == "combine" and "error" not in v else [v]):
            for w in part.get("warnings", ()):
                counts[w] = counts.get(w, 0) + 1
    return [f"{w} ({n} task{'s' if n > 1 else ''})" for w, n in sorted(counts.items())]


def _first_error(results: Iterable[dict]) -> str | None:
    return next((r["error"] for r in results if "error" in r), None)


def _cell_outputs(done: dict, spec, s: tuple, h: str, folds: dict) -> tuple[dict, dict] | str:
    """(predicted class indices, fit seconds) per fold of one (subset, head, fusion) cell, or the
    error of the first of its tasks that failed."""
    if spec.bench_combine is None:
        got = {f: done[("fit", spec.name, s, h, f)] for f in folds}
        err = _first_error(got.values())
        return err if err else ({f: g["pred"] for f, g in got.items()}, {f: g["fit_s"] for f, g in got.items()})
    parts = {f: [done[("base", k, h, f)] for k in s] for f in folds}
    err = _first_error(p for f in folds for p in parts[f]) or _first_error([done[("combine", spec.name, s, h)]])
    if err:
        return err
    meta = done[("combine", spec.name, s, h)]
    # a fusion's cost counts the inner folds it uses
    times = {f: sum(p["fit_s"] + (p["oof_s"] if spec.needs_oof else 0.0) for p in parts[f]) + meta[f]["fit_s"]
             for f in folds}
    return {f: meta[f]["pred"] for f in folds}, times


SCORE_COLUMNS = ("cv_accuracy_mean", "cv_accuracy_se", "cv_accuracy_std", "cv_accuracy_folds", "cv_f1_macro_mean",
                 "cv_f1_macro_se", "cv_f1_macro_std", "cv_f1_macro_folds", "test_accuracy", "test_f1_macro",
                 "fit_seconds")


def _scores(truth_pred: dict, fold_ids: list) -> dict:
    """The score columns of a cell from (true, predicted) labels per fold: per cross-validated
    metric the fold scores, their mean, spread (std over folds) and the standard error of the mean;
    the test scores from the refit (None without a test split)."""
    got = {f: accuracy_and_macro_f1(*tp) for f, tp in truth_pred.items()}
    out = {"test_accuracy": None, "test_f1_macro": None}
    for i, name in enumerate(("accuracy", "f1_macro")):
        folds = [got[f][i] for f in fold_ids]
        out.update({f"cv_{name}_mean": float(np.mean(folds)), f"cv_{name}_se": standard_error(folds),
                    f"cv_{name}_std": float(np.std(folds)), f"cv_{name}_folds": folds})
        if REFIT in got:
            out[f"test_{name}"] = got[REFIT][i]
    return out


def accuracy_and_macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """``accuracy_score`` and ``f1_score(average="macro", zero_division=0)`` of integer labels,
    the same numbers by the same formulas (per label present in either: 2·tp / (n_true + n_pred);
    then the mean over those labels) from three bincounts, without scikit-learn's per-call input
    validation, which on a small grid cost about as much as the meta-learner fits."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n = int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    hit = y_true == y_pred
    tp = np.bincount(y_true[hit], minlength=n)
    both = (np.bincount(y_true, minlength=n) + np.bincount(y_pred, minlength=n)).astype(np.float64)
    present = both > 0
    return float(np.average(hit)), float(np.mean(2.0 * tp[present] / both[present]))


def mark_random_init(rows: list[dict], cache: Cache) -> list[dict]:
    """Set each row's ``random_init``: its backbones with seeded random weights ("+"-joined; empty
    when all are pretrained), so a random-init score is never mistaken for a pretrained one."""
    random = {k for k in cache.backbones if cache.backbone_info(k).get("weights_source") == "none"}
    for r in rows:
        r["random_init"] = "+".join(k for k in str(r["backbones"]).split("+") if k in random)
    return rows


# --------------------------------------------------------------------------------------------
# Ranking: the one rule
# --------------------------------------------------------------------------------------------

TIE_SE = 2.0  # a paired difference within this many of its standard errors is noise


def standard_error(scores: Sequence[float]) -> float | None:
    """Standard error of a CV mean from its fold scores (sample std / sqrt(k)): how precisely
    the mean is known, as opposed to the spread of one fold (the std). None below 2 folds."""
    a = np.asarray(scores, dtype=float)
    return float(np.std(a, ddof=1) / np.sqrt(len(a))) if len(a) >= 2 else None


def within_noise(best: Sequence[float], other: Sequence[float]) -> bool:
    """Whether ``other``'s fold scores are within noise of ``best``'s on the same k folds: the
    mean paired difference d = best - other is at most :data:`TIE_SE` standard errors of that
    difference (sample std of d over sqrt(k)).

    Why paired: both were scored on the same folds, so the fold-to-fold variation they share
    (an easy fold is easy for every model) cancels out, and the test is far sharper than
    comparing two means with their own error bars. Why not the Nadeau–Bengio corrected
    t-test: at k = 5 it ties 5-10 point gaps on small data, which would hand the pick to the
    cheapest head too often; two standard errors errs toward keeping the better-scoring model.
    """
    d = np.asarray(best, dtype=float) - np.asarray(other, dtype=float)
    if len(d) == 0 or d.mean() <= 1e-12:  # not worse on average: tied by definition
        return True
    se = standard_error(d)
    return se is not None and bool(d.mean() <= TIE_SE * se)


def _check_rank_metric(metric: str) -> None:
    if metric not in RANK_METRICS:
        raise ConfigError(f"{metric!r} is not a cross-validated bench column; models are ranked by "
                          f"{' or '.join(RANK_METRICS)} (never by the test split or by a cost)")


def _folds_of(row: dict, metric: str) -> list | None:
    return row.get(metric.replace("_mean", "_folds"))


def _tied(best: dict, row: dict, metric: str) -> bool:
    """``row`` within noise of ``best`` by ``metric`` (paired over the same folds; rows from an
    older bench.json without fold scores: tied only on an equal mean)."""
    a, b = _folds_of(best, metric), _folds_of(row, metric)
    if a is None or b is None or len(a) != len(b):
        return float(row[metric]) >= float(best[metric])
    return within_noise(a, b)


def _costs(row: dict) -> tuple:
    """Cheaper first: fewer backbones, then the faster head, then the simpler fusion (the
    registries' ``cost`` ranks; a name this process has not registered counts as the default)."""
    return (int(row.get("size") or 1), getattr(HEADS.get(row.get("head")), "cost", HeadSpec.cost),
            getattr(FUSION_SPECS.get(row.get("fusion")), "cost", FusionSpec.cost))


def _names_of(row: dict) -> tuple:
    return str(row.get("backbones")), str(row.get("head")), str(row.get("fusion"))


def _by_metric(row: dict, metric: str) -> tuple:
    """Better first: ``metric``, then the other cross-validated metric, then cheaper, then by
    name (a total order, so equal runs give equal files)."""
    other = next(m for m in RANK_METRICS if m != metric)
    return (-float(row[metric]), -float(row.get(other) or 0.0)) + _costs(row) + _names_of(row)


def _by_cost(row: dict, metric: str) -> tuple:
    """The tie-break order: cheaper first, then better by ``metric``, then by name."""
    return _costs(row) + (-float(row[metric]),) + _names_of(row)


def rank_rows(rows: Iterable[dict], metric: str = "cv_accuracy_mean") -> list[dict]:
    """THE ranking rule (the bench table, ``BenchResult.best``, the pipeline's choice of model and
    the report all rank through it). Copies of the rows with ``rank`` (from 1) and
    ``tied_with_best`` set:

    1. the best by ``metric`` is the row with the highest mean (see :func:`_by_metric`);
    2. every row whose fold scores are within noise of the best's (:func:`within_noise`, paired
       over the same folds) is tied with it;
    3. the tied rows come first, cheapest first (fewer backbones, then the faster head, then the
       simpler fusion: :func:`_costs`), so rank 1, the pick, is the cheapest configuration that
       the data cannot tell from the best; then the other rows by ``metric``; then the rows
       without a value (failed cells), by name.

    Whether a row is tied depends only on itself and the best row, and the pick is the first tied
    row in a total order, so removing rows that are neither the pick nor the best never changes
    the pick.
    """
    _check_rank_metric(metric)
    rows = list(rows)
    scored = [r for r in rows if r.get(metric) is not None]
    unscored = sorted((r for r in rows if r.get(metric) is None), key=_names_of)
    ordered, tied = [], []
    if scored:
        best = min(scored, key=lambda r: _by_metric(r, metric))
        tied = [r for r in scored if r is best or _tied(best, r, metric)]
        tied_ids = {id(r) for r in tied}
        rest = [r for r in scored if id(r) not in tied_ids]
        ordered = sorted(tied, key=lambda r: _by_cost(r, metric)) + sorted(rest, key=lambda r: _by_metric(r, metric))
    return [{**{k: v for k, v in r.items() if k not in ("rank", "tied_with_best")}, "rank": i + 1,
             "tied_with_best": i < len(tied)} for i, r in enumerate(ordered + unscored)]


def best_row(rows: Sequence[dict], metric: str = "cv_accuracy_mean") -> dict:
    """The pick: rank 1 by :func:`rank_rows`. A ConfigError when there are no rows, ``metric``
    is not a cross-validated column, or no row has a value for it."""
    rows = list(rows)
    if not rows:
        raise ConfigError("the bench produced no rows")
    _check_rank_metric(metric)
    if all(r.get(metric) is None for r in rows):
        raise ConfigError(f"no configuration has a value for {metric!r} (every cell failed)")
    return rank_rows(rows, metric)[0]


def pick_line(rows: Sequence[dict]) -> str:
    """One line on the pick (rank 1): what it is, its CV accuracy ± standard error, and how many
    configurations it was tied with."""
    pick = best_row(rows)
    n_tied = sum(1 for r in rows if r.get("tied_with_best"))
    ties = (f"; {n_tied} configurations tied within noise, this is the cheapest (fewer backbones, then "
            "faster head, then simpler fusion)" if n_tied > 1 else "")
    n_failed = sum(1 for r in rows if r.get("status") == "failed")
    failed = f"; {n_failed} failed (see results.csv)" if n_failed else ""
    return (f"{pick['backbones']} / {pick['head']} / {pick['fusion']}: cv accuracy {_mean_se(pick, 'accuracy')} "
            f"(± standard error){ties}{failed}")


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def _cell(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mean_se(r: dict, name: str) -> str:
    """"mean ± standard error" of a cross-validated metric ("-" for a failed cell)."""
    mean, se = r.get(f"cv_{name}_mean"), r.get(f"cv_{name}_se")
    if mean is None:
        return "-"
    return f"{mean:.4f} ± {se:.4f}" if se is not None else f"{mean:.4f}"


def _note(r: dict) -> str:
    """What a reader must not miss about a row: a failed cell's error, random-init backbones."""
    if r.get("status") == "failed":
        return f"FAILED: {r.get('error')}"
    rnd = r.get("random_init")
    return f"RANDOM INIT: {rnd}" if rnd else ""


def _table_cells(r: dict, float_cell) -> list[str]:
    return [str(r["rank"]), r["backbones"], r["head"], r["fusion"], _mean_se(r, "accuracy"),
            float_cell(r.get("cv_accuracy_std")), _mean_se(r, "f1_macro"), "tied" if r.get("tied_with_best") else "",
            float_cell(r.get("test_accuracy")), float_cell(r.get("fit_seconds"), 3), _note(r)]


TABLE_HEADER = ["#", "backbones", "head", "fusion", "cv acc ± se", "cv acc sd", "cv f1 ± se", "tie", "test acc",
                "fit s", "notes"]
TIE_NOTE = ("± is the standard error of the CV mean, sd the spread over folds; \"tied\": within two standard "
            "errors of the paired difference to the best over the same folds; rank 1 is the cheapest tied row "
            "(fewer backbones, then faster head, then simpler fusion)")


def format_table(rows: Sequence[dict], top: int = 20) -> str:
    """Fixed-width ranked table of the first ``top`` rows (mean ± standard error, spread, ties)."""
    body = [_table_cells(r, lambda v, d=4: _cell(v, d) or "-") for r in list(rows)[:top]]
    widths = [max(len(x[i]) for x in [TABLE_HEADER] + body) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [TABLE_HEADER] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more rows in results.csv")
    return "\n".join(lines + [TIE_NOTE])


def stack_folds_note(settings: dict) -> str:
    """A sentence saying how the stack rows' inner folds were drawn, when it is not the default."""
    if settings.get("stack_folds") != "shared" or "stack" not in settings.get("fusions", ()):
        return ""
    return (" Stack rows: on each outer fold, the inner folds were the other outer folds (--stack-folds shared: a "
            f"{settings['cv'] - 1}-fold inner CV whose fits two outer folds share).")


def _markdown(result: BenchResult, cache: Cache) -> str:
    s = result.settings
    lines = [f"# Bench of {cache.path}", "",
             f"{len(result.rows)} models: backbones {', '.join(s['backbones'])} (subsets up to "
             f"{min(s['max_size'], len(s['backbones']))}) × heads {', '.join(s['heads'])} × fusions {', '.join(s['fusions'])}. "
             f"{s['cv']}-fold stratified CV (seed {s['random_state']}) on {result.n_train} training rows"
             + (f" ({result.n_excluded} excluded: decode errors)" if result.n_excluded else "")
             + (f"; test scores after a refit on all of them, on {result.n_test} test rows."
                if result.n_test else "; no labelled test split.") + stack_folds_note(s),
             f"{result.n_base_fits} base fits (shared by all subsets), {result.n_concat_fits} concat "
             f"fits, {result.n_meta_fits} meta-learner fits, {result.seconds:.1f} s.", "", TIE_NOTE + ".", "",
             "| " + " | ".join(TABLE_HEADER) + " |",
             "|---:|---|---|---|---:|---:|---:|---|---:|---:|---|"]
    for r in result.rows:
        cells = _table_cells(r, lambda v, d=4: _cell(v, d) or "-")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
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
            w.writerow({k: _cell(r.get(k), 6) for k in CSV_COLUMNS})
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
        "n_meta_fits": result.n_meta_fits, "seconds": result.seconds, "warnings": result.warnings,
        "rows": [{k: _json_safe(v) for k, v in r.items()} for r in result.rows],
        "folds": [{"backbones": b, "head": h, "fusion": f, **v} for (b, h, f), v in result.folds.items()],
    }
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    plots.heatmap(result.rows, out / "heatmap.png")
    plots.best_by_size(result.rows, out / "best_by_size.png")
    return out
