"""featstack.logistic: scikit-learn's LogisticRegression fits, many at once, checked against
scikit-learn's own fits."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.linear_model._linear_loss import LinearModelLoss
from sklearn._loss.loss import HalfBinomialLoss, HalfMultinomialLoss

from featstack import logistic
from featstack.logistic import fit_logistic_regression, fit_logistic_regressions, fit_logistic_regressions_safe


def _problem(n: int, p: int, k: int, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % k)
    X = rng.normal(size=(n, p)) + 0.8 * np.eye(k, p)[y] * scale
    return X, y


def _objective(est: LogisticRegression, X, y) -> float:
    """scikit-learn's lbfgs objective at a fitted model's coefficients."""
    k = len(est.classes_)
    codes = np.searchsorted(est.classes_, y).astype(np.float64)
    loss = LinearModelLoss(base_loss=HalfBinomialLoss() if k == 2 else HalfMultinomialLoss(n_classes=k),
                           fit_intercept=True)
    if k == 2:
        coef = np.concatenate([est.coef_[0], est.intercept_])
    else:
        coef = np.hstack([est.coef_, est.intercept_[:, None]]).ravel(order="F")
    return loss.loss(coef, X, codes, l2_reg_strength=1.0 / (est.C * len(X)))


def test_scipy_has_the_routine_the_fast_path_drives():
    """With scipy's L-BFGS-B interface changed, every fit would quietly take est.fit: fail here."""
    assert logistic._SETULB is not None


@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("C", [0.05, 1.0, 30.0])
def test_fit_is_sklearns_fit(k, C):
    X, y = _problem(240, 7, k, seed=k)
    ref = LogisticRegression(C=C, max_iter=1000).fit(X, y)
    ours = fit_logistic_regression(LogisticRegression(C=C, max_iter=1000), X, y)
    assert type(ours) is LogisticRegression
    assert ours.coef_.shape == ref.coef_.shape and ours.intercept_.shape == ref.intercept_.shape
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    assert ours.n_iter_.tolist() == ref.n_iter_.tolist() and ours.n_features_in_ == 7
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))


def test_string_labels_and_iteration_limit_behave_as_sklearn():
    X, y = _problem(200, 5, 3, seed=2, scale=3.0)
    labels = np.array(["ant", "bee", "cat"])[y]
    ref = LogisticRegression().fit(X, labels)  # labels that are not integers: est.fit itself
    ours = fit_logistic_regression(LogisticRegression(), X, labels)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    with pytest.warns(ConvergenceWarning):
        LogisticRegression(max_iter=2).fit(X, y)
    with pytest.warns(ConvergenceWarning, match="after 2 iteration"):
        short = fit_logistic_regression(LogisticRegression(max_iter=2), X, y)
    assert short.n_iter_.tolist() == [2]


@pytest.mark.parametrize("max_batch", [32, 2])
def test_many_side_by_side_equal_one_by_one(max_batch, monkeypatch):
    """Problems of one batch (same rows and classes, different widths), of other batches and of
    batches cut by the size limit give the fits each gives alone."""
    monkeypatch.setattr(logistic, "MAX_BATCH", max_batch)
    problems = [_problem(150, p, 4, seed=p) for p in (3, 9, 5)] + [_problem(90, 4, 3, seed=9), _problem(150, 2, 2, 1)]
    alone = [fit_logistic_regression(LogisticRegression(), X, y) for X, y in problems]
    done = []
    together = fit_logistic_regressions([(LogisticRegression(), X, y) for X, y in problems], on_fit=done.append)
    assert sorted(done) == list(range(len(problems)))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-12)
        assert a.n_iter_.tolist() == b.n_iter_.tolist()
    assert logistic._chunks(list(range(5)), 150 * 4) == [list(range(i, min(i + max_batch, 5)))
                                                        for i in range(0, 5, max_batch)]


def test_problems_it_does_not_solve_go_to_sklearn_and_fail_alone():
    X, y = _problem(120, 4, 3, seed=5)
    bad = X.copy()
    bad[3, 1] = np.nan
    weighted = LogisticRegression(class_weight="balanced")
    got = fit_logistic_regressions_safe([(LogisticRegression(), X, y), (LogisticRegression(), bad, y),
                                         (weighted, X, y), (LogisticRegression(), X, np.zeros(120, int))])
    ok, nan, balanced, one_class = got
    assert isinstance(ok, LogisticRegression)
    assert isinstance(nan, ValueError) and "NaN" in str(nan)
    np.testing.assert_allclose(balanced.coef_, LogisticRegression(class_weight="balanced").fit(X, y).coef_,
                               rtol=0, atol=0)
    assert isinstance(one_class, ValueError) and "class" in str(one_class)
    with pytest.raises(ValueError, match="NaN"):
        fit_logistic_regressions([(LogisticRegression(), X, y), (LogisticRegression(), bad, y)])


def test_float32_features_are_fitted_in_float64():
    X, y = _problem(160, 6, 3, seed=3)
    ours = fit_logistic_regression(LogisticRegression(), X.astype(np.float32), y)
    ref = LogisticRegression().fit(X.astype(np.float32).astype(np.float64), y)
    assert ours.coef_.dtype == np.float64
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=0, atol=1e-8)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(12, 160), p=st.integers(1, 9), k=st.integers(2, 5), seed=st.integers(0, 10_000),
       log_c=st.floats(-3, 3), scale=st.floats(0.1, 20))
def test_reaches_sklearns_optimum(n, p, k, seed, log_c, scale):
    """Whatever the problem: the same objective value as scikit-learn's fit reaches (the iterates
    agree to rounding; on ill-conditioned problems rounding can move where L-BFGS stops, within
    its tolerance, so the check is on the objective)."""
    X, y = _problem(n, p, k, seed, scale)
    X *= scale
    C = 10.0 ** log_c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = LogisticRegression(C=C, max_iter=300).fit(X, y)
        ours = fit_logistic_regression(LogisticRegression(C=C, max_iter=300), X, y)
    f_ref, f_ours = _objective(ref, X, y), _objective(ours, X, y)
    assert abs(f_ours - f_ref) <= 1e-5 * max(1.0, abs(f_ref))
