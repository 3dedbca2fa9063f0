"""Head registry: a name (as written in YAML and on the command line) → a scikit-learn estimator.

Every head is a ``Pipeline`` that carries its own feature scaling, so a saved head is
self-contained: cached features in, predictions out, nothing else to remember. ``tune=True``
wraps the pipeline in a small log-spaced grid search over its regularisation parameter, chosen by
inner cross-validation on the rows ``fit`` is given, which callers keep to the training split.

This module (and the rest of the CPU side) never imports torch.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.naive_bayes import ComplementNB, GaussianNB, MultinomialNB
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import SVC

from .errors import ConfigError
from .solvers import LbfgsLinearSVC


@dataclass(frozen=True)
class HeadSpec:
    """A registered head: how to build it, and which parameter ``--tune`` searches over."""

    name: str
    build: Callable[[int], Pipeline]
    description: str
    tune_param: str
    tune_grid: tuple = field(default_factory=tuple)


HEADS: dict[str, HeadSpec] = {}


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add a head to the registry (names are unique: they are stored in saved models)."""
    if spec.name in HEADS:
        raise ValueError(f"head {spec.name!r} is already registered")
    HEADS[spec.name] = spec
    return spec


def _logreg(seed: int) -> Pipeline:
    return Pipeline([("scale", StandardScaler()),
                     ("clf", LogisticRegression(C=1.0, max_iter=2000, random_state=seed))])


def _linear_svm(seed: int) -> Pipeline:
    # L-BFGS on dense products instead of liblinear, C relative to the row norms: see solvers.py
    return Pipeline([("scale", StandardScaler()),
                     ("clf", LbfgsLinearSVC(C=1.0, tol=1e-3, max_iter=1000, random_state=seed))])


def _svm_rbf(seed: int) -> Pipeline:
    return Pipeline([("scale", StandardScaler()),
                     ("clf", SVC(C=1.0, kernel="rbf", gamma="scale", random_state=seed))])


def _gaussian_nb(seed: int) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", GaussianNB())])


def _multinomial_nb(seed: int) -> Pipeline:
    # Multinomial NB needs non-negative counts-like inputs: embeddings are signed, so an explicit
    # min-max step (clipped, so unseen values stay in [0, 1]) comes first.
    return Pipeline([("scale", MinMaxScaler(clip=True)), ("clf", MultinomialNB(alpha=1.0))])


def _complement_nb(seed: int) -> Pipeline:
    return Pipeline([("scale", MinMaxScaler(clip=True)), ("clf", ComplementNB(alpha=1.0))])


_C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 6))
register_head(HeadSpec("logreg", _logreg, "multinomial logistic regression (L2)", "clf__C", _C_GRID))
register_head(HeadSpec("linear-svm", _linear_svm, "linear SVM (squared hinge, one-vs-rest, L-BFGS; C relative to the row norms)", "clf__C", _C_GRID))
register_head(HeadSpec("svm-rbf", _svm_rbf, "SVM with RBF kernel (SVC, one-vs-one)", "clf__C",
                       tuple(float(c) for c in np.logspace(-1, 3, 5))))
register_head(HeadSpec("gaussian-nb", _gaussian_nb, "Gaussian naive Bayes", "clf__var_smoothing",
                       tuple(float(v) for v in np.logspace(-11, -3, 5))))
register_head(HeadSpec("multinomial-nb", _multinomial_nb, "multinomial naive Bayes on min-max scaled features",
                       "clf__alpha", tuple(float(a) for a in np.logspace(-3, 1, 5))))
register_head(HeadSpec("complement-nb", _complement_nb, "complement naive Bayes on min-max scaled features",
                       "clf__alpha", tuple(float(a) for a in np.logspace(-3, 1, 5))))


def list_heads() -> list[str]:
    """Registered head names, in registration order."""
    return list(HEADS)


def head_spec(name: str) -> HeadSpec:
    """The spec of a registered head; an unknown name is one error with a suggestion."""
    try:
        return HEADS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), HEADS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown head {name!r}{hint}; known heads: {', '.join(HEADS)}") from None


def create_head(name: str, *, tune: bool = False, random_state: int = 0, tune_cv: int = 3,
                n_jobs: int | None = None) -> BaseEstimator:
    """A fresh, unfitted head by registry name.

    ``tune=True`` returns a ``GridSearchCV`` over the head's regularisation grid with a seeded
    stratified inner split of the rows it is fitted on; its ``best_estimator_`` is the pipeline.
    """
    spec = head_spec(name)
    pipe = spec.build(random_state)
    if not tune:
        return pipe
    return GridSearchCV(pipe, {spec.tune_param: list(spec.tune_grid)},
                        cv=StratifiedKFold(tune_cv, shuffle=True, random_state=random_state),
                        scoring="accuracy", n_jobs=n_jobs, refit=True)


def labels_from_decision(estimator: BaseEstimator, scores: np.ndarray) -> np.ndarray | None:
    """``estimator.predict(X)`` computed from ``scores = estimator.decision_function(X)``, for
    the classifiers whose prediction is a fixed function of those scores; None for the others.

    Saves a second pass over the test rows (for an SVC as long as the first: every kernel value
    again). Linear models: the sign (binary) or the argmax. SVC (ovr shape, no break_ties): the
    one-vs-one votes are the rounded ovr scores (the confidence term is within +-1/3), and
    libsvm predicts the first class with the most votes; binary: class 1 when the score is
    >= 0. The same labels as ``predict`` unless a pairwise decision value is exactly 0.0.
    """
    from sklearn.linear_model._base import LinearClassifierMixin
    from sklearn.svm import SVC

    est = unwrap_head(estimator)
    clf = est.steps[-1][1] if isinstance(est, Pipeline) else est
    classes = getattr(clf, "classes_", None)
    if classes is None:
        return None
    scores = np.asarray(scores)
    if isinstance(clf, LinearClassifierMixin):
        idx = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)
    elif type(clf) is SVC and clf.decision_function_shape == "ovr" and not clf.break_ties:
        idx = (scores >= 0).astype(int) if scores.ndim == 1 else np.rint(scores).argmax(1)
    else:
        return None
    return classes[idx]


def unwrap_head(estimator: BaseEstimator) -> BaseEstimator:
    """The fitted pipeline inside a (possibly tuned) head."""
    return getattr(estimator, "best_estimator_", estimator)
