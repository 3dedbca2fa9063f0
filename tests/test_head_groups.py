"""Heads fitted together with a shared first step are exactly the heads fitted alone."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

import featstack.bench as bench
from featstack.bench import run_bench
from featstack.fusion import stack_method
from featstack.head_groups import first_step_key, fit_heads
from featstack.heads import HEADS, create_head, list_heads, register_head
from test_bench import make_cache


def _data(n: int, d: int, k: int, seed: int, dtype=np.float32):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % k)
    X = rng.normal(size=(k, d))[y] * 0.7 + rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, size=d)
    return (X + rng.normal(size=d) * 5).astype(dtype), y


def _alone(head, X, y, fit_rows, score_rows):
    model = clone(head).fit(X[fit_rows], y[fit_rows])
    method = stack_method(model)
    return getattr(model, method)(X[score_rows]), model.predict(X[score_rows])


def _together(fitted, head, name="score"):
    method = stack_method(head)
    Xs = fitted.X_score[name]
    return getattr(fitted.final, method)(Xs), fitted.final.predict(Xs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_registered_head_fitted_together_equals_alone(dtype):
    """All built-in heads at once (four share one StandardScaler fit, two one MinMaxScaler fit):
    scores and labels bit for bit those of each head's own fit, and the fitted pipeline itself
    predicts the same."""
    X, y = _data(240, 12, 4, seed=1, dtype=dtype)
    fit_rows, score_rows = np.arange(0, 240, 2)[:100], np.arange(1, 240, 2)
    heads = {h: create_head(h, random_state=3) for h in list_heads()}
    keys = {h: first_step_key(p) for h, p in heads.items()}
    assert keys["logreg"] == keys["linear-svm"] == keys["gaussian-nb"] == keys["svm-rbf"] is not None
    assert keys["multinomial-nb"] == keys["complement-nb"] is not None and keys["complement-nb"] != keys["logreg"]
    got = fit_heads(heads, X, y, fit_rows, {"score": score_rows})
    assert set(got) == set(heads)
    for h, head in heads.items():
        scores, labels = _alone(head, X, y, fit_rows, score_rows)
        g_scores, g_labels = _together(got[h], head)
        assert g_scores.dtype == scores.dtype and np.array_equal(g_scores, scores), h
        assert np.array_equal(g_labels, labels), h
        assert np.array_equal(got[h].model.predict(X[score_rows]), labels), h
        assert got[h].seconds > 0
    # one scaler object serves the heads that share it
    assert got["logreg"].model.steps[0][1] is got["gaussian-nb"].model.steps[0][1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(30, 120), d=st.integers(1, 9), k=st.integers(2, 5), seed=st.integers(0, 10_000),
       wide=st.booleans())
def test_shared_first_step_property(n, d, k, seed, wide):
    """Any rows, widths, class counts and scales: fitted together equals fitted alone."""
    X, y = _data(n, d, k, seed)
    if wide:
        X = X * 1e3
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.permutation(n)[: n * 2 // 3])
    score_rows = np.setdiff1d(np.arange(n), fit_rows)
    if len(np.unique(y[fit_rows])) < 2:
        return
    heads = {h: create_head(h, random_state=seed) for h in ("logreg", "linear-svm", "gaussian-nb", "svm-rbf")}
    got = fit_heads(heads, X, y, fit_rows, {"score": score_rows})
    for h, head in heads.items():
        scores, labels = _alone(head, X, y, fit_rows, score_rows)
        g_scores, g_labels = _together(got[h], head)
        assert np.array_equal(g_scores, scores) and np.array_equal(g_labels, labels), h


class _Boom(BaseEstimator, TransformerMixin):
    def fit(self, X, y=None):
        raise ValueError("boom: cannot fit this step")

    def transform(self, X):
        return X


def test_a_failing_head_or_shared_step_fails_alone():
    X, y = _data(80, 5, 3, seed=2)
    rows, score = np.arange(60), np.arange(60, 80)
    heads = {
        "ok": make_pipeline(StandardScaler(), LogisticRegression()),
        "bad-final": make_pipeline(StandardScaler(), LogisticRegression(C=-1.0)),  # fails at fit
        "boom-1": make_pipeline(_Boom(), LogisticRegression()),
        "boom-2": make_pipeline(_Boom(), LogisticRegression(C=2.0)),
        "minmax": make_pipeline(MinMaxScaler(), LogisticRegression()),
    }
    got = fit_heads(heads, X, y, rows, {"score": score})
    assert isinstance(got["bad-final"], ValueError)
    assert isinstance(got["boom-1"], ValueError) and "boom" in str(got["boom-1"]) and got["boom-2"] is got["boom-1"]
    for h in ("ok", "minmax"):
        scores, _ = _alone(heads[h], X, y, rows, score)
        assert np.array_equal(_together(got[h], heads[h])[0], scores)


def test_first_step_key_shares_only_steps_that_compute_the_same():
    clf = LogisticRegression()
    assert first_step_key(make_pipeline(StandardScaler(), clf)) == first_step_key(make_pipeline(StandardScaler(), clf))
    assert first_step_key(make_pipeline(StandardScaler(), clf)) != first_step_key(
        make_pipeline(StandardScaler(with_mean=False), clf))
    assert first_step_key(make_pipeline(MinMaxScaler(clip=True), clf)) != first_step_key(make_pipeline(MinMaxScaler(), clf))
    assert first_step_key(make_pipeline(Nystroem(random_state=1), clf)) is not None
    assert first_step_key(make_pipeline(Nystroem(random_state=None), clf)) is None  # a new draw per fit
    assert first_step_key(make_pipeline(Nystroem(random_state=np.random.RandomState(0)), clf)) is None
    assert first_step_key(make_pipeline(MinMaxScaler(feature_range=np.array([0, 1])), clf)) is None  # not plain
    assert first_step_key(make_pipeline(clf)) is None  # one step: nothing to share
    assert first_step_key(clf) is None
    assert first_step_key(create_head("logreg", tune=True)) is None  # a search: it fits its own pipelines


@pytest.mark.parametrize("stack_folds", ["nested", "shared"])
def test_bench_with_heads_together_equals_heads_apart(tmp_path, monkeypatch, stack_folds):
    """The bench's grouped tasks (per backbone and fold, or per shared fit, for the heads
    sharing a first step) give every score of one task per head, and the same fit counts;
    svm-rbf's pinned size choices ride along in the group."""
    cache = make_cache(tmp_path / "x.h5", dims=(5, 4, 3), n_classes=3, n_train=60, n_test=12)
    grid = dict(heads=["logreg", "gaussian-nb", "linear-svm", "multinomial-nb", "svm-rbf"],
                fusions=["single", "vote", "stack"], max_size=3, cv=3, n_jobs=1, progress=False,
                stack_folds=stack_folds)
    protos = {h: create_head(h) for h in grid["heads"]}
    assert bench._head_groups(protos, 12, 1) == [("logreg", "gaussian-nb", "linear-svm", "svm-rbf"), ("multinomial-nb",)]
    assert bench._head_groups(protos, 12, 4) == [(h,) for h in grid["heads"]]
    together = run_bench(cache, **grid)
    monkeypatch.setattr(bench, "GROUP_TASKS_PER_WORKER", 10**6)
    apart = run_bench(cache, **grid)
    assert together.folds == apart.folds and together.n_base_fits == apart.n_base_fits
    assert {r["status"] for r in together.rows} == {"ok"}
    strip = ("fit_seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in together.rows] == \
        [{k: v for k, v in r.items() if k not in strip} for r in apart.rows]


def test_fit_heads_scores_each_named_row_set_as_its_own_call():
    X, y = _data(150, 6, 3, seed=5)
    fit_rows = np.arange(0, 150, 3)
    score_on = {"a": np.arange(1, 150, 3), "b": np.arange(2, 150, 3)[:7], "empty": np.arange(0)}
    heads = {h: create_head(h) for h in ("logreg", "gaussian-nb", "multinomial-nb")}
    got = fit_heads(heads, X, y, fit_rows, score_on)
    for h, head in heads.items():
        assert set(got[h].X_score) == set(score_on)
        for name, rows in score_on.items():
            if not len(rows):
                continue
            scores, labels = _alone(head, X, y, fit_rows, rows)
            g_scores, g_labels = _together(got[h], head, name)
            assert np.array_equal(g_scores, scores) and np.array_equal(g_labels, labels), (h, name)


class _Unconverged(LogisticRegression):
    """A logistic regression stopped after one iteration: it warns on every fit."""

    def __init__(self, max_iter=1):
        super().__init__(max_iter=max_iter)


def test_grouped_heads_keep_their_own_warnings_and_failures(tmp_path):
    """In one task, a head's warnings are counted for that head's tasks only, and a head that
    fails fails its cells alone."""
    cache = make_cache(tmp_path / "x.h5", dims=(4, 3), n_classes=3, n_train=45, n_test=0)
    register_head("warns-together", lambda seed: make_pipeline(StandardScaler(), _Unconverged()))
    register_head("fails-together", lambda seed: make_pipeline(StandardScaler(), LogisticRegression(C=-1.0)))
    try:
        res = run_bench(cache, heads=["warns-together", "gaussian-nb", "fails-together"], fusions=["single", "stack"],
                        max_size=2, cv=3, n_jobs=1, progress=False)
    finally:
        HEADS.pop("warns-together")
        HEADS.pop("fails-together")
    conv = [w for w in res.warnings if w.startswith("ConvergenceWarning")]
    assert len(conv) == 1 and conv[0].endswith("(6 tasks)"), res.warnings  # 2 backbones x 3 folds
    status = {(r["backbones"], r["head"], r["fusion"]): r["status"] for r in res.rows}
    assert {s for (_, h, _), s in status.items() if h == "fails-together"} == {"failed"}
    assert {s for (_, h, _), s in status.items() if h != "fails-together"} == {"ok"}
    err = next(r["error"] for r in res.rows if r["head"] == "fails-together")
    assert err.startswith("fails-together on ") and "C" in err


class _PredictOnly(ClassifierMixin, BaseEstimator):
    """A classifier with labels but no scores: it cannot be stacked or voted."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        return np.full(len(X), self.classes_[0])


def test_a_head_without_scores_fails_its_cells_alone_in_a_shared_task(tmp_path):
    cache = make_cache(tmp_path / "x.h5", dims=(4, 3), n_classes=3, n_train=45, n_test=9)
    register_head("labels-only", lambda seed: make_pipeline(StandardScaler(), _PredictOnly()))
    try:
        assert bench._head_groups({h: create_head(h) for h in ("labels-only", "gaussian-nb")}, 8, 1) == [
            ("labels-only", "gaussian-nb")]
        res = run_bench(cache, heads=["labels-only", "gaussian-nb"], fusions=["single", "stack"], max_size=2, cv=3,
                        n_jobs=1, progress=False)
    finally:
        HEADS.pop("labels-only")
    for r in res.rows:
        if r["head"] == "labels-only":
            assert r["status"] == "failed" and "neither predict_proba nor decision_function" in r["error"], r
        else:
            assert r["status"] == "ok", r
