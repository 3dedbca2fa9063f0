"""Fusions: soft vote and stacking across backbone blocks, checked against scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.datasets import make_classification
from sklearn.ensemble import StackingClassifier
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

from featstack.errors import ConfigError
from featstack.fusion import (FUSIONS, StackClassifier, VoteClassifier, block_proba, block_scores,
                              build_model, check_fusion, softmax)
from featstack.heads import create_head, list_heads

DIMS = (5, 4, 3)


def _blocks_data(n_classes: int, n: int = 150, seed: int = 1):
    X, y = make_classification(n_samples=n, n_features=sum(DIMS), n_informative=6, n_redundant=2,
                               n_classes=n_classes, class_sep=1.0, random_state=seed)
    return X, y


def _to_float64(X):
    return np.asarray(X, dtype=np.float64)


def _sklearn_stack(head: str, dims, cv: int, rs: int, float64_meta: bool = True) -> StackingClassifier:
    """scikit-learn's stacking of ``head`` per block; ``float64_meta``: its meta-learner fitted on
    the out-of-fold scores as float64, as ours is (scikit-learn alone fits float32 scores in
    float32)."""
    bounds = np.cumsum((0,) + tuple(dims))
    estimators = [
        (f"b{i}", Pipeline([
            ("cols", ColumnTransformer([("sel", "passthrough", slice(int(bounds[i]), int(bounds[i + 1])))])),
            ("head", create_head(head, random_state=rs)),
        ]))
        for i in range(len(dims))
    ]
    final = LogisticRegression(max_iter=1000, random_state=rs)
    if float64_meta:
        final = Pipeline([("float64", FunctionTransformer(_to_float64)), ("lr", final)])
    return StackingClassifier(estimators=estimators,
                              final_estimator=final,
                              cv=StratifiedKFold(cv, shuffle=True, random_state=rs))


# ------------------------------------------------------------------ equality with scikit-learn

@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # cached features are float32
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("head", list_heads())
def test_stack_equals_sklearn_stacking(head, n_classes, dtype):
    method = "predict_proba" if hasattr(create_head(head), "predict_proba") else "decision_function"
    X, y = _blocks_data(n_classes)
    X = X.astype(dtype)
    Xtr, ytr, Xte = X[:110], y[:110], X[110:]
    ours = StackClassifier(head=head, dims=DIMS, cv=4, random_state=7).fit(Xtr, ytr)
    ref = _sklearn_stack(head, DIMS, cv=4, rs=7).fit(Xtr, ytr)
    assert ours.stack_methods_ == ref.stack_method_ == [method] * 3
    for data in (Xtr, Xte):
        np.testing.assert_allclose(ours.transform(data), ref.transform(data), rtol=0, atol=1e-10)
        np.testing.assert_allclose(ours.predict_proba(data), ref.predict_proba(data), rtol=0, atol=1e-10)
        np.testing.assert_allclose(ours.decision_function(data), ref.decision_function(data),
                                   rtol=0, atol=1e-10)
        np.testing.assert_array_equal(ours.predict(data), ref.predict(data))
    # binary → one meta column per block; multiclass → one per class per block
    assert ours.transform(Xte).shape[1] == (1 if n_classes == 2 else n_classes) * len(DIMS)
    # the final estimators learned the same coefficients from the same out-of-fold matrix
    np.testing.assert_allclose(ours.final_estimator_.coef_, ref.final_estimator_[-1].coef_, atol=1e-10)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("head", ["logreg", "gaussian-nb"])  # the heads whose scores are float32 on float32
def test_stack_on_float32_features_is_sklearn_stacking_up_to_float32_rounding(head, n_classes):
    """scikit-learn fits the meta-learner of float32 scores in float32 arithmetic; ours fits it in
    float64. The two optima differ by float32 rounding only: same labels, probabilities within 1e-5."""
    X, y = _blocks_data(n_classes)
    X = X.astype(np.float32)
    ours = StackClassifier(head=head, dims=DIMS, cv=4, random_state=7).fit(X[:110], y[:110])
    ref = _sklearn_stack(head, DIMS, cv=4, rs=7, float64_meta=False).fit(X[:110], y[:110])
    assert ref.final_estimator_.coef_.dtype == np.float32  # the difference this test is about
    for data in (X[:110], X[110:]):
        np.testing.assert_array_equal(ours.predict(data), ref.predict(data))
        np.testing.assert_allclose(ours.predict_proba(data), ref.predict_proba(data), rtol=0, atol=1e-5)


def test_stack_with_string_labels_and_custom_final_estimator_matches_sklearn():
    X, y = _blocks_data(3, seed=4)
    labels = np.array(["cat", "dog", "fox"])[y]
    ours = StackClassifier("logreg", DIMS, final_estimator=GaussianNB(), cv=3, random_state=2).fit(X, labels)
    ref = _sklearn_stack("logreg", DIMS, 3, 2).set_params(final_estimator=GaussianNB()).fit(X, labels)
    np.testing.assert_array_equal(ours.classes_, ["cat", "dog", "fox"])
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-10)
    assert not hasattr(ours, "decision_function")  # GaussianNB has none: not offered


def test_stack_parallel_equals_serial():
    X, y = _blocks_data(3)
    a = StackClassifier("svm-rbf", DIMS, cv=3, n_jobs=1).fit(X, y)
    b = StackClassifier("svm-rbf", DIMS, cv=3, n_jobs=2).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


def test_stack_refits_base_heads_on_all_rows():
    X, y = _blocks_data(3)
    st = StackClassifier("logreg", DIMS, cv=5).fit(X, y)
    assert len(st.estimators_) == 3
    for est, d in zip(st.estimators_, DIMS):
        assert est.named_steps["scale"].n_samples_seen_ == len(X) and est.n_features_in_ == d
    assert st.n_features_in_ == sum(DIMS)


# ------------------------------------------------------------------ vote

@pytest.mark.parametrize("n_classes", [2, 3])
def test_vote_is_the_mean_of_per_block_probabilities(n_classes):
    X, y = _blocks_data(n_classes)
    vote = VoteClassifier("logreg", DIMS, random_state=0).fit(X, y)
    bounds = np.cumsum((0,) + DIMS)
    want = np.mean([create_head("logreg").fit(X[:, a:b], y).predict_proba(X[:, a:b])
                    for a, b in zip(bounds[:-1], bounds[1:])], axis=0)
    np.testing.assert_allclose(vote.predict_proba(X), want, atol=1e-12)
    np.testing.assert_array_equal(vote.predict(X), np.argmax(want, axis=1))
    np.testing.assert_allclose(vote.predict_proba(X).sum(axis=1), 1.0)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_vote_with_decision_only_heads_uses_softmax(n_classes):
    X, y = _blocks_data(n_classes)
    vote = VoteClassifier("linear-svm", DIMS).fit(X, y)
    bounds = np.cumsum((0,) + DIMS)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        d = create_head("linear-svm").fit(X[:, a:b], y).decision_function(X[:, a:b])
        if d.ndim == 1:  # binary: softmax([0, d]) == [1 - sigmoid(d), sigmoid(d)]
            p1 = 1 / (1 + np.exp(-d))
            parts.append(np.column_stack([1 - p1, p1]))
        else:
            e = np.exp(d - d.max(axis=1, keepdims=True))
            parts.append(e / e.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(vote.predict_proba(X), np.mean(parts, axis=0), atol=1e-12)


def test_vote_beats_its_weakest_block():
    """Late fusion is useful: on blocks of unequal quality, the vote beats the worst block."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 80)
    good = rng.normal(size=(240, 6)) + np.eye(3)[y] @ rng.normal(size=(3, 6)) * 2
    noise = rng.normal(size=(240, 6))
    X = np.hstack([good, noise])
    idx = rng.permutation(240)
    tr, te = idx[:160], idx[160:]
    vote = VoteClassifier("logreg", (6, 6)).fit(X[tr], y[tr])
    noise_only = create_head("logreg").fit(noise[tr], y[tr])
    assert np.mean(vote.predict(X[te]) == y[te]) > np.mean(noise_only.predict(noise[te]) == y[te]) + 0.2


# ------------------------------------------------------------------ block helpers

def test_block_scores_and_proba_shapes():
    X, y = _blocks_data(2)
    lr = create_head("logreg").fit(X, y)
    svm = create_head("linear-svm").fit(X, y)
    np.testing.assert_array_equal(block_scores(lr, X), lr.predict_proba(X)[:, 1:])
    np.testing.assert_array_equal(block_scores(svm, X), svm.decision_function(X).reshape(-1, 1))
    np.testing.assert_allclose(block_proba(svm, X)[:, 1], 1 / (1 + np.exp(-svm.decision_function(X))))
    X3, y3 = _blocks_data(3)
    svm3 = create_head("svm-rbf").fit(X3, y3)
    assert block_scores(svm3, X3).shape == (len(X3), 3)
    np.testing.assert_allclose(block_proba(svm3, X3), softmax(svm3.decision_function(X3)))
    big = softmax(np.array([[1000.0, 0.0], [0.0, -1000.0]]))  # stable for huge decision values
    assert np.isfinite(big).all() and big[0, 0] == 1.0


# ------------------------------------------------------------------ build_model

def test_build_model_maps_fusions():
    assert FUSIONS == ("single", "concat", "vote", "stack")
    assert isinstance(build_model("logreg", "single", [7]), Pipeline)
    assert isinstance(build_model("logreg", "concat", [3, 4]), Pipeline)
    assert isinstance(build_model("logreg", "concat", [3, 4], tune=True), GridSearchCV)
    v = build_model("svm-rbf", "vote", [3, 4], random_state=5)
    assert isinstance(v, VoteClassifier) and v.dims == (3, 4) and v.random_state == 5
    s = build_model("gaussian-nb", "stack", [3, 4], cv=3, n_jobs=2)
    assert isinstance(s, StackClassifier) and (s.cv, s.n_jobs, s.head) == (3, 2, "gaussian-nb")
    with pytest.raises(ConfigError, match="'single' takes exactly one backbone, got 2"):
        build_model("logreg", "single", [3, 4])
    with pytest.raises(ConfigError, match=r"unknown fusion 'stak' \(did you mean 'stack'\?\)"):
        build_model("logreg", "stak", [3])
    with pytest.raises(ConfigError, match="unknown head 'logistic'"):
        build_model("logistic", "stack", [3])
    assert check_fusion("vote") == "vote"


# ------------------------------------------------------------------ clear errors

@pytest.mark.parametrize("cls", [VoteClassifier, StackClassifier])
def test_clear_errors(cls):
    X, y = _blocks_data(3)
    with pytest.raises(ValueError, match=r"dims \(5, 4\) sum to 9 columns, but X has 12 features"):
        cls(dims=(5, 4)).fit(X, y)
    with pytest.raises(ValueError, match="positive integers"):
        cls(dims=(12, 0)).fit(X, y)
    with pytest.raises(ConfigError, match="unknown head 'nope'"):
        cls(head="nope").fit(X, y)
    with pytest.raises(ValueError, match="needs at least 2 classes.*only 1 class"):
        cls().fit(X, np.zeros(len(X), dtype=int))
    Xn = X.copy()
    Xn[17, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinity at row 17 \(column 3"):
        cls().fit(Xn, y)
    fitted = cls(dims=DIMS).fit(X, y)
    Xi = X[:5].copy()
    Xi[2, 0] = np.inf
    with pytest.raises(ValueError, match="at row 2"):
        fitted.predict(Xi)
    with pytest.raises(NotFittedError):
        cls().predict(X)


def test_stack_names_classes_with_fewer_samples_than_folds():
    X, y = _blocks_data(3)
    y = y.copy()
    keep = np.concatenate([np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:3]])
    with pytest.raises(ValueError, match=r"class 2 has 3 sample\(s\), fewer than the cv=5 folds"):
        StackClassifier(cv=5).fit(X[keep], y[keep])
    StackClassifier(cv=3).fit(X[keep], y[keep])  # three folds are fine
    with pytest.raises(ValueError, match="cv must be an integer >= 2"):
        StackClassifier(cv=1).fit(X, y)


def test_sklearn_contract_params_clone_set_params():
    st = StackClassifier(head="svm-rbf", dims=DIMS, cv=3, random_state=4, n_jobs=1)
    assert st.get_params() == {"head": "svm-rbf", "dims": DIMS, "final_estimator": None, "cv": 3,
                               "random_state": 4, "tune": False, "n_jobs": 1}
    X, y = _blocks_data(3)
    st.fit(X, y)
    c = clone(st)
    assert not hasattr(c, "estimators_") and c.get_params() == st.get_params()
    c.set_params(head="gaussian-nb").fit(X, y)
    assert all(type(e.named_steps["clf"]).__name__ == "GaussianNB" for e in c.estimators_)
    assert c.stack_methods_ == ["predict_proba"] * 3 and st.stack_methods_ == ["decision_function"] * 3
    # grid search over a fusion parameter works like any estimator
    gs = GridSearchCV(VoteClassifier(dims=DIMS), {"head": ["logreg", "gaussian-nb"]}, cv=3).fit(X, y)
    assert gs.best_params_["head"] in ("logreg", "gaussian-nb")


def test_tuned_stack_tunes_every_base_head():
    X, y = _blocks_data(3, n=120)
    st = StackClassifier("gaussian-nb", DIMS, cv=3, tune=True).fit(X, y)
    assert all(isinstance(e, GridSearchCV) and hasattr(e, "best_params_") for e in st.estimators_)
    assert st.predict_proba(X).shape == (120, 3)


# ------------------------------------------------------------------ scikit-learn estimator checks

def _expected_failures(est) -> dict:
    if isinstance(est, StackClassifier) and est.cv > 3:
        # That check fits 10 rows with labels 0..2 (about 3 per class): they cannot be split
        # into 5 stratified folds. We refuse with a clear error naming the class and counts,
        # while the check only accepts an error about "1 feature". StackClassifier(cv=2)
        # below passes the same check.
        return {"check_fit2d_1feature": "10 rows in 3 classes cannot be split into 5 stratified "
                                        "folds; StackClassifier raises an error naming the class"}
    return {}


@parametrize_with_checks([VoteClassifier(), VoteClassifier(head="svm-rbf"),
                          StackClassifier(), StackClassifier(head="linear-svm", cv=2)],
                         expected_failed_checks=_expected_failures)
def test_fusions_pass_sklearn_estimator_checks(estimator, check):
    check(estimator)
