"""featstack.solvers.LbfgsLinearSVC minimises liblinear's LinearSVC objective (checked against
liblinear itself on problems it solves quickly) and behaves as a LinearSVC everywhere else."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.base import clone
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from featstack.solvers import LbfgsLinearSVC, RbfSVC


def _problem(seed: int, n: int, d: int, k: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (k, d))
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    return centres[y] + rng.normal(0, 1.5, (n, d)), y


def _objective(coef, icpt, X, y, classes, C, s=1.0):
    """liblinear's primal: 0.5 (|w|^2 + (b/s)^2) + C sum max(0, 1 - t (w.x + b))^2, summed over classes."""
    coef, icpt = np.atleast_2d(coef), np.atleast_1d(icpt)
    pos = classes[-coef.shape[0]:]
    T = np.where(y[:, None] == pos[None, :], 1.0, -1.0)
    Z = X @ coef.T + icpt
    return float(0.5 * ((coef ** 2).sum() + ((icpt / s) ** 2).sum()) + C * (np.maximum(0, 1 - T * Z) ** 2).sum())


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([2, 3, 5]), C=st.sampled_from([0.01, 0.1, 1.0]))
def test_same_optimum_as_liblinear(seed, k, C):
    X, y = _problem(seed, 120, 6, k)
    ours = LbfgsLinearSVC(C=C, scale_C=False, tol=1e-10, max_iter=5000).fit(X, y)
    ref = LinearSVC(C=C, dual=False, tol=1e-10, max_iter=100_000).fit(X, y)
    classes = ours.classes_
    f_ours = _objective(ours.coef_, ours.intercept_, X, y, classes, C)
    f_ref = _objective(ref.coef_, ref.intercept_, X, y, classes, C)
    assert f_ours <= f_ref * (1 + 1e-7) + 1e-9, (f_ours, f_ref)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-3, atol=1e-4 * np.abs(ref.coef_).max())
    assert (ours.predict(X) == ref.predict(X)).mean() >= 0.99


def test_scaled_C_and_linearsvc_interface():
    X, y = _problem(0, 200, 40, 4)
    est = LbfgsLinearSVC(C=2.0).fit(X, y)
    assert est.C_effective_ == pytest.approx(2.0 / np.mean((X ** 2).sum(1)))
    assert isinstance(est, LinearSVC) and est.coef_.shape == (4, 40) and est.intercept_.shape == (4,)
    dec = est.decision_function(X)
    np.testing.assert_array_equal(est.predict(X), est.classes_[dec.argmax(1)])
    again = clone(est).fit(X.astype(np.float32), y)  # float32 input: products in float32
    assert again.get_params()["scale_C"] is True and again.coef_.dtype == np.float64
    assert (again.predict(X) == est.predict(X)).mean() > 0.97
    with pytest.raises(ValueError, match="at least 2 classes"):
        LbfgsLinearSVC().fit(X, np.zeros(len(X), dtype=int))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([2, 3, 4, 7]),
       head=st.sampled_from(["linear-svm", "svm-rbf", "svm-rbf-exact", "svm-rbf@nystroem"]))
def test_labels_from_decision_equal_predict(seed, k, head):
    """bench takes the labels from decision_function's scores instead of a second predict pass."""
    from featstack.heads import create_head, labels_from_decision

    X, y = _problem(seed, 90, 5, k)
    Xte = np.random.default_rng(seed + 1).normal(0, 2.0, (300, 5))  # many near-ties between votes
    est = create_head(head.split("@")[0])
    if head.endswith("@nystroem"):
        est.set_params(clf__exact_below=0, clf__n_components=40)
    est.fit(X, y)
    labels = labels_from_decision(est, est.decision_function(Xte))
    np.testing.assert_array_equal(labels, est.predict(Xte))


def test_labels_from_decision_declines_other_heads():
    from featstack.heads import create_head, labels_from_decision

    X, y = _problem(0, 60, 4, 3)
    nb = create_head("gaussian-nb").fit(X, y)
    assert labels_from_decision(nb, np.zeros((5, 3))) is None


def test_rbf_svc_is_exact_svc_below_the_threshold():
    """Below exact_below training rows svm-rbf is libsvm's SVC: the same numbers as before."""
    from sklearn.svm import SVC

    X, y = _problem(3, 150, 8, 4)
    ours = RbfSVC(exact_below=151, random_state=0).fit(X, y)
    ref = SVC(kernel="rbf", gamma="scale", random_state=0).fit(X, y)
    assert ours.map_ is None and type(ours.classifier_) is SVC and ours.gamma_ == ref._gamma
    np.testing.assert_array_equal(ours.decision_function(X), ref.decision_function(X))
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    assert not hasattr(ours, "predict_proba")  # both paths: decision_function only


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([2, 5]))
def test_rbf_svc_nystroem_maps_the_same_kernel(seed, k):
    """From exact_below rows on: a Nystroem map of the same RBF kernel (gamma "scale" computed
    like SVC's) + LbfgsLinearSVC; held-out accuracy close to the exact SVC's, decision shapes
    the same."""
    from sklearn.kernel_approximation import Nystroem
    from sklearn.svm import SVC

    X, y = _problem(seed, 900, 10, k)
    Xtr, ytr, Xte, yte = X[:600], y[:600], X[600:], y[600:]
    approx = RbfSVC(exact_below=600, n_components=300, random_state=0).fit(Xtr, ytr)
    exact = SVC(kernel="rbf", gamma="scale").fit(Xtr, ytr)
    assert isinstance(approx.map_, Nystroem) and isinstance(approx.classifier_, LbfgsLinearSVC)
    assert approx.map_.gamma == approx.gamma_ == pytest.approx(exact._gamma)
    assert approx.map_.components_.shape == (300, 10)
    assert approx.decision_function(Xte).shape == exact.decision_function(Xte).shape
    assert approx.score(Xte, yte) >= exact.score(Xte, yte) - 0.05
    small = RbfSVC(exact_below=10, n_components=5000).fit(Xtr[:50], ytr[:50])
    assert small.map_.components_.shape[0] == 50  # never more landmarks than rows


@parametrize_with_checks([RbfSVC(exact_below=0, n_components=20, random_state=0)])
def test_nystroem_path_passes_sklearn_estimator_checks(estimator, check):
    """The approximate path (every fit goes through Nystroem) is a well-behaved estimator too;
    the exact path is checked with the head pipelines in test_heads.py."""
    check(estimator)


def test_out_of_fold_scores_come_from_the_refit_s_kind_of_model():
    """A stack's meta-learner is fitted on out-of-fold scores (fits on cv-1 of cv folds) and
    applied to the refit's: near svm-rbf's switch both are pinned to the path of the refit."""
    from sklearn.model_selection import cross_val_predict

    from featstack.fusion import StackClassifier, out_of_fold, stack_splitter
    from featstack.heads import create_head, pin_size_choices

    X, y = _problem(5, 130, 6, 3)
    head = create_head("svm-rbf").set_params(clf__exact_below=120, clf__n_components=30)
    nystroem = create_head("svm-rbf").set_params(clf__exact_below=0, clf__n_components=30)
    oof = out_of_fold(head, X, y, cv=5, random_state=0)  # folds of 104 rows: exact unless pinned
    want = cross_val_predict(nystroem, X, y, cv=stack_splitter(5, 0), method="decision_function")
    np.testing.assert_array_equal(oof, want)
    assert head.get_params()["clf__exact_below"] == 120  # the head itself is left alone
    small = out_of_fold(head, X[:110], y[:110], cv=5, random_state=0)  # the refit is exact: so are the folds
    exact = cross_val_predict(create_head("svm-rbf"), X[:110], y[:110], cv=stack_splitter(5, 0),
                              method="decision_function")
    np.testing.assert_array_equal(small, exact)
    tuned = pin_size_choices(create_head("svm-rbf", tune=True), 5000)
    assert tuned.get_params()["estimator__clf__exact_below"] == 0
    logreg = create_head("logreg")
    assert pin_size_choices(logreg, 10) is logreg and repr(logreg) == repr(create_head("logreg"))
    stack = StackClassifier("svm-rbf", dims=(3, 3), cv=5).fit(X, y)
    assert all(e.named_steps["clf"].map_ is None for e in stack.estimators_)  # 130 rows < 2,000: exact
