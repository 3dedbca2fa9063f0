"""Several heads fitted on the same rows, their identical first step fitted once.

Every built-in head is a ``Pipeline`` that starts with its own scaler, and four of them start
with the same ``StandardScaler()``. A bench fits each (backbone, fold) with every head: fitting,
applying and re-validating that scaler once per head was, with the pipelines' own dispatch,
a fifth of a small stack grid's base fits (``benchmarks/bench_grid.py --backbones 4 --dim 128
--train 1000 --classes 10``). Here heads whose first steps are equal share one fit of it: the
step is fitted on the rows, applied to them and to the rows to score, and each head's remaining
steps are fitted on the result. The models are exactly those ``head.fit`` builds (a pipeline
fits its first step and then the rest on that step's output, which is what is done here, once),
so every score is unchanged (``tests/test_head_groups.py`` compares them bit for bit).

A first step is shared only when that cannot change what it computes: the same type with the
same plain parameters (numbers, strings, None, tuples of them), and no unseeded ``random_state``.

CPU side: no torch here.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Hashable, Mapping

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.pipeline import Pipeline

_PLAIN = (bool, int, float, str, type(None), np.integer, np.floating, np.bool_)


def first_step_key(est: BaseEstimator) -> tuple | None:
    """A key equal for heads whose first pipeline steps compute the same thing on the same
    rows (so one fit can serve them all), or None when ``est``'s first step is not shared:
    not a pipeline of at least two steps, a first step that is not a transformer, parameters
    that are not plain values or tuples of them (estimators, arrays: equal-looking is not
    equal), or an unseeded ``random_state``."""
    if not isinstance(est, Pipeline) or len(est.steps) < 2:
        return None
    step = est.steps[0][1]
    if step is None or isinstance(step, str) or not hasattr(step, "fit_transform") or not hasattr(step, "transform"):
        return None
    params = step.get_params(deep=False)
    if not all(_plain(v) for v in params.values()):
        return None
    if "random_state" in params and not isinstance(params["random_state"], (int, np.integer)):
        return None
    return (type(step), tuple(sorted((k, type(v).__name__, repr(v)) for k, v in params.items())))


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(_plain(v) for v in value))


@dataclass
class FittedHead:
    """One head fitted on a row set: ``model`` is the fitted head as ``head.fit`` returns it;
    ``final`` (its last step when the first was shared, else ``model``) applied to
    ``X_score[name]`` gives ``model``'s outputs on the rows ``score_on[name]``; ``seconds``:
    what fitting it alone costs (the shared step's fit and transforms counted in full)."""

    model: BaseEstimator
    final: BaseEstimator
    X_score: dict
    seconds: float


def fit_heads(heads: Mapping[Hashable, BaseEstimator], X: np.ndarray, y: np.ndarray, fit_rows: np.ndarray,
              score_on: Mapping[Hashable, np.ndarray],
              watch: Callable[[list], ContextManager] | None = None) -> dict:
    """Fit a clone of every head on ``X[fit_rows]``; per head name its :class:`FittedHead`
    (to score each named row set of ``score_on``, each transformed on its own, as the head's
    own ``decision_function(X[rows])`` would; an empty set has 0 rows to score and is not
    transformed) or the exception its fit raised (a failing head fails alone; a failing shared
    step fails the heads that share it). The heads of a group share their fitted first step
    (one object: read it, do not refit it).

    ``watch(names)``, when given, is entered around each piece of work with the names of the
    heads it is for (one head's own fit; a shared step: all heads sharing it), e.g. to record
    the warnings each head raised."""
    watch = watch or (lambda names: contextlib.nullcontext())
    out: dict = {}
    groups: dict = {}
    for name, head in heads.items():
        key = first_step_key(head)
        groups.setdefault(("alone", name) if key is None else ("shared", key), []).append(name)
    for (how, _), names in groups.items():
        if how == "alone":
            with watch(names):
                out[names[0]] = _fit_whole(heads[names[0]], X, y, fit_rows, score_on)
            continue
        t0 = time.perf_counter()
        try:
            with watch(names):
                step = clone(heads[names[0]].steps[0][1])
                X_fit = step.fit_transform(X[fit_rows], y[fit_rows])
                X_score = {key: _apply(step, X[rows]) for key, rows in score_on.items()}
        except Exception as exc:  # noqa: BLE001 - every head sharing the step fails with it
            out.update(dict.fromkeys(names, exc))
            continue
        shared_s = time.perf_counter() - t0
        for name in names:
            with watch([name]):
                out[name] = _fit_rest(heads[name], step, X_fit, y[fit_rows], X_score, shared_s)
    return out


def _apply(transformer, X: np.ndarray) -> np.ndarray:
    """``transformer.transform(X)``; an empty row set stays as it is (scikit-learn refuses 0
    rows, and there is nothing to score)."""
    return transformer.transform(X) if len(X) else X


def _fit_whole(head: BaseEstimator, X, y, fit_rows, score_on):
    t0 = time.perf_counter()
    try:
        model = clone(head).fit(X[fit_rows], y[fit_rows])
    except Exception as exc:  # noqa: BLE001 - this head fails alone
        return exc
    return FittedHead(model, model, {key: X[rows] for key, rows in score_on.items()}, time.perf_counter() - t0)


def _fit_rest(head: Pipeline, step, X_fit: np.ndarray, y_fit: np.ndarray, X_score: dict, shared_s: float):
    """``head`` with ``step`` (fitted) as its first step and the others fitted on its output:
    what ``Pipeline.fit`` does after fitting the first step."""
    t0 = time.perf_counter()
    try:
        model = clone(head)
        model.steps[0] = (model.steps[0][0], step)
        rest = model[1:]  # the same step objects: fitting them fits the model's
        if len(rest.steps) > 1:
            X_fit = rest[:-1].fit_transform(X_fit, y_fit)
            X_score = {key: _apply(rest[:-1], Xs) for key, Xs in X_score.items()}
        final = rest.steps[-1][1]
        final.fit(X_fit, y_fit)
    except Exception as exc:  # noqa: BLE001 - this head fails alone
        return exc
    return FittedHead(model, final, X_score, shared_s + time.perf_counter() - t0)
