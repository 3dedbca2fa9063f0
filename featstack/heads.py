"""Head registry: a name (as written in YAML and on the command line) → a scikit-learn estimator.

Every head is a ``Pipeline`` that carries its own feature scaling, so a saved head is
self-contained: cached features in, predictions out, nothing else to remember. ``tune=True``
wraps the pipeline in a small log-spaced grid search over its regularisation parameter, chosen by
inner cross-validation on the rows ``fit`` is given, which callers keep to the training split.

This module (and the rest of the CPU side) never imports torch.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.naive_bayes import ComplementNB, GaussianNB, MultinomialNB
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import SVC

from .errors import ConfigError
from .solvers import RBF_EXACT_BELOW, LbfgsLinearSVC, RbfSVC


@dataclass(frozen=True)
class HeadSpec:
    """A registered head: everything training, persistence and export need to know about it.

    ``build(seed)`` returns a fresh, unfitted scikit-learn classifier (usually a Pipeline that
    carries its own scaling). ``tune_param``/``tune_grid`` are what ``--tune`` searches (no grid:
    the head cannot be tuned). ``allowed_types`` are the fully qualified type names a fitted,
    saved head may contain (the skops load allowlist is the union over the registries); the
    types of the unfitted estimator and its parameters are added at registration, so most heads
    need to name only types that appear when fitting (e.g. a tree's ``sklearn.tree._tree.Tree``).
    ``converter`` turns the fitted head into a torch module for export: the name of a converter
    in :data:`featstack.convert.HEAD_CONVERTERS` (``"sklearn"``: scalers → a linear, kernel or
    naive Bayes classifier), a callable ``convert(fitted_estimator, torch_dtype) -> HeadModule``,
    or None (export refuses the head, naming it, before writing anything).
    ``cost``: how expensive the head is to fit and run, as a rank (1 naive Bayes, 2 linear,
    3 kernel); the bench's tie rule prefers the lower one among configurations tied within
    noise. Plain data, not a measured time, so the pick is the same on every machine;
    registered heads default to 3.
    """

    name: str
    build: Callable[[int], BaseEstimator]
    description: str = ""
    tune_param: str | None = None
    tune_grid: tuple = field(default_factory=tuple)
    allowed_types: tuple[str, ...] = ()
    converter: str | Callable | None = None
    cost: int = 3


HEADS: dict[str, HeadSpec] = {}


def type_name(obj_or_type) -> str:
    """``module.Class`` of an object or type, as skops records it in a saved file."""
    t = obj_or_type if isinstance(obj_or_type, type) else type(obj_or_type)
    return f"{t.__module__}.{t.__name__}"


def estimator_types(estimator) -> set[str]:
    """Type names of an (unfitted) estimator and of every estimator among its parameters,
    steps and transformers, recursively: what a saved copy of it is at least made of."""
    out: set[str] = set()
    todo = [estimator]
    while todo:
        obj = todo.pop()
        if isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif hasattr(obj, "get_params") and not isinstance(obj, type):
            out.add(type_name(obj))
            todo.extend(obj.get_params(deep=False).values())
    return out


def register_head(name: str | HeadSpec, build: Callable[[int], BaseEstimator] | None = None,
                  **spec_fields) -> HeadSpec:
    """Add a head to the registry: ``register_head("ridge", lambda seed: make_pipeline(...),
    tune_param="clf__alpha", tune_grid=(0.1, 1, 10))``, or ``register_head(HeadSpec(...))``.

    Names are unique (they are stored in saved models): register a head once per process, and
    again in any process that loads a model made with it, as with timm models.
    """
    spec = name if isinstance(name, HeadSpec) else HeadSpec(name=name, build=build, **spec_fields)
    if not isinstance(spec.name, str) or not spec.name:
        raise ValueError(f"a head name must be a non-empty string, got {spec.name!r}")
    if spec.name in HEADS:
        raise ValueError(f"head {spec.name!r} is already registered")
    if not callable(spec.build):
        raise ValueError(f"head {spec.name!r}: build must be a callable build(seed) -> estimator")
    if isinstance(spec.cost, bool) or not isinstance(spec.cost, int) or spec.cost < 0:
        raise ValueError(f"head {spec.name!r}: cost must be an integer rank >= 0, got {spec.cost!r}")
    proto = spec.build(0)
    if not hasattr(proto, "fit") or not hasattr(proto, "predict"):
        raise ValueError(f"head {spec.name!r}: build(seed) returned {type(proto).__name__}, "
                         "not a scikit-learn classifier")
    if spec.tune_grid and spec.tune_param not in proto.get_params():
        raise ValueError(f"head {spec.name!r}: tune_param {spec.tune_param!r} is not a parameter "
                         "of the estimator build(seed) returns")
    types = tuple(sorted(set(spec.allowed_types) | estimator_types(proto)))
    spec = replace(spec, tune_grid=tuple(spec.tune_grid), allowed_types=types)
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
    # exact SVC below RBF_EXACT_BELOW training rows, Nystroem + linear SVM above: see solvers.py
    return Pipeline([("scale", StandardScaler()),
                     ("clf", RbfSVC(C=1.0, gamma="scale", exact_below=RBF_EXACT_BELOW, random_state=seed))])


def _svm_rbf_exact(seed: int) -> Pipeline:
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
_NB_GRID = tuple(float(a) for a in np.logspace(-3, 1, 5))
register_head("logreg", _logreg, description="multinomial logistic regression (L2)",
              tune_param="clf__C", tune_grid=_C_GRID, converter="sklearn", cost=2)
register_head("linear-svm", _linear_svm, description="linear SVM (squared hinge, one-vs-rest, L-BFGS; C relative to the row norms)",
              tune_param="clf__C", tune_grid=_C_GRID, converter="sklearn", cost=2)
_RBF_C_GRID = tuple(float(c) for c in np.logspace(-1, 3, 5))
register_head("svm-rbf", _svm_rbf, description=f"SVM with RBF kernel (exact SVC below {RBF_EXACT_BELOW:,} "
              "training rows, Nystroem map + linear SVM from there)",
              tune_param="clf__C", tune_grid=_RBF_C_GRID, converter="sklearn",
              allowed_types=tuple(type_name(t) for t in (SVC, LbfgsLinearSVC, Nystroem)), cost=3)
register_head("gaussian-nb", _gaussian_nb, description="Gaussian naive Bayes",
              tune_param="clf__var_smoothing", tune_grid=tuple(float(v) for v in np.logspace(-11, -3, 5)),
              converter="sklearn", cost=1)
register_head("multinomial-nb", _multinomial_nb, description="multinomial naive Bayes on min-max scaled features",
              tune_param="clf__alpha", tune_grid=_NB_GRID, converter="sklearn", cost=1)
register_head("complement-nb", _complement_nb, description="complement naive Bayes on min-max scaled features",
              tune_param="clf__alpha", tune_grid=_NB_GRID, converter="sklearn", cost=1)
register_head("svm-rbf-exact", _svm_rbf_exact, description="SVM with RBF kernel (exact SVC, one-vs-one, at any size)",
              tune_param="clf__C", tune_grid=_RBF_C_GRID, converter="sklearn", cost=3)


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


TUNE_CV = 3  # inner stratified folds of --tune
# What a fitted ``--tune`` head holds besides the head itself: the search, its seeded split and
# the accuracy scorer (part of the skops load allowlist).
TUNE_TYPES = ("sklearn.model_selection._search.GridSearchCV",
              "sklearn.model_selection._split.StratifiedKFold",
              "sklearn.metrics._scorer._Scorer",
              "sklearn.metrics._scorer._PassthroughScorer",
              "sklearn.metrics._classification.accuracy_score")


def create_head(name: str, *, tune: bool = False, random_state: int = 0, tune_cv: int = TUNE_CV,
                n_jobs: int | None = None) -> BaseEstimator:
    """A fresh, unfitted head by registry name.

    ``tune=True`` returns a ``GridSearchCV`` over the head's regularisation grid with a seeded
    stratified inner split of the rows it is fitted on; its ``best_estimator_`` is the pipeline.
    """
    spec = head_spec(name)
    pipe = spec.build(random_state)
    if not tune:
        return pipe
    if not spec.tune_grid:
        raise ConfigError(f"head {name!r} has no tuning grid (register it with tune_param and "
                          "tune_grid); drop --tune")
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
    :class:`~featstack.solvers.RbfSVC`: the rule of the classifier it fitted.
    """
    from sklearn.linear_model._base import LinearClassifierMixin
    from sklearn.svm import SVC

    est = unwrap_head(estimator)
    clf = est.steps[-1][1] if isinstance(est, Pipeline) else est
    if isinstance(clf, RbfSVC):  # the fitted path decides: exact SVC or the linear SVM
        clf = getattr(clf, "classifier_", clf)
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


def pin_size_choices(estimator: BaseEstimator, n_rows: int) -> BaseEstimator:
    """``estimator`` with its size-dependent choices fixed to those of a fit on ``n_rows``
    rows: every :class:`~featstack.solvers.RbfSVC` in it (svm-rbf) takes the exact or the
    Nystroem path a fit on ``n_rows`` would, whatever rows it is then fitted on.

    Out-of-fold scores are computed on fewer rows (cv-1 of cv folds) than the refit that a
    stack's meta-learner is then applied to; near svm-rbf's switch the two would otherwise be
    different models, with decision values on different scales (one-vs-one votes against
    margins). Modifies and returns ``estimator``: pass a clone."""
    pinned = size_pins(estimator, n_rows)
    return estimator.set_params(**pinned) if pinned else estimator


def size_pins(estimator: BaseEstimator, n_rows: int) -> dict:
    """The parameters :func:`pin_size_choices` sets for ``n_rows`` rows ({} when the estimator
    makes no size-dependent choice)."""
    return {name: (0 if n_rows >= value else n_rows + 1)
            for name, value in estimator.get_params(deep=True).items()
            if name.rpartition("__")[2] == "exact_below" and isinstance(value, (int, np.integer))}


def unwrap_head(estimator: BaseEstimator) -> BaseEstimator:
    """The fitted pipeline inside a (possibly tuned) head."""
    return getattr(estimator, "best_estimator_", estimator)
