"""Fusions across backbones: one head on one backbone, on concatenated features, soft vote, stack.

The features of several backbones arrive as one matrix whose columns are the backbones' blocks
side by side (``dims`` gives the block widths, in order). ``vote`` and ``stack`` fit one head per
block; ``stack`` then trains a meta-learner on the heads' out-of-fold scores, exactly as
scikit-learn's ``StackingClassifier`` does with column-selecting pipelines on the same folds, so
its scores can be checked against scikit-learn and reproduced by the bench from cached
out-of-fold predictions.

Both estimators follow the scikit-learn contract (parameters stored verbatim by ``__init__`` and
validated in ``fit``; fitted attributes end in ``_``; ``clone``/``get_params``/``set_params``
work; ``NotFittedError`` before ``fit``), so they can be cross-validated, grid-searched and saved
with skops like any scikit-learn classifier.

This module (and the rest of the CPU side) never imports torch.
"""
from __future__ import annotations

import difflib
import numbers
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .errors import ConfigError
from .logistic import fit_logistic_regression, fit_logistic_regressions_safe
from .heads import HEADS, create_head, head_spec, pin_size_choices, type_name

STACK_METHODS = ("predict_proba", "decision_function")


# --------------------------------------------------------------------------------------------
# Scores of one fitted head on one block
# --------------------------------------------------------------------------------------------

def stack_method(estimator: BaseEstimator) -> str:
    """The method stacking reads from a head: ``predict_proba`` if it has one, else
    ``decision_function`` (the same choice as scikit-learn's ``stack_method="auto"``, which
    would only fall back to ``predict`` for heads that have neither; ours all have one)."""
    for method in STACK_METHODS:
        if hasattr(estimator, method):
            return method
    raise ConfigError(f"{type(estimator).__name__} has neither predict_proba nor decision_function, "
                      "so it cannot be stacked or voted")


def scores_from_prediction(pred: np.ndarray, method: str, n_classes: int) -> np.ndarray:
    """Meta-features from a head's raw ``predict_proba``/``decision_function`` output.

    Binary problems give ONE column (the positive-class probability, or the decision value)
    because the two probability columns are collinear; this is how scikit-learn's stacking
    builds its meta-features, so the meta-learner sees the same matrix (in the same dtype: a
    float32 input gives float32 scores, exactly as there). Array-likes with ``ndim`` (a torch
    tensor of an exported head) keep their type.
    """
    if not hasattr(pred, "ndim"):
        pred = np.asarray(pred)
    if pred.ndim == 1:
        return pred.reshape(-1, 1)
    if method == "predict_proba" and n_classes == 2:
        return pred[:, 1:]
    return pred


def block_scores(est: BaseEstimator, X: np.ndarray) -> np.ndarray:
    """(n, k) float scores of a fitted head: ``predict_proba`` if it has it, else
    ``decision_function``; binary → one column (P(class 1) or the decision value)."""
    method = stack_method(est)
    return scores_from_prediction(getattr(est, method)(X), method, len(est.classes_))


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large decision values."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def proba_from_prediction(pred: np.ndarray, method: str) -> np.ndarray:
    """(n, n_classes) probabilities from a head's raw output: probabilities as they are, decision
    values through a softmax (binary decision d → softmax([0, d]), i.e. the sigmoid of d)."""
    pred = np.asarray(pred, dtype=np.float64)
    if method == "predict_proba":
        return pred
    if pred.ndim == 1:
        pred = np.column_stack([np.zeros_like(pred), pred])
    return softmax(pred)


def block_proba(est: BaseEstimator, X: np.ndarray) -> np.ndarray:
    """(n, n_classes) class probabilities of a fitted head: ``predict_proba``, else the softmax
    of ``decision_function``, so heads without probabilities can still take part in a vote."""
    method = stack_method(est)
    return proba_from_prediction(getattr(est, method)(X), method)


# --------------------------------------------------------------------------------------------
# The rules of vote and stack, shared by the estimators below and by the bench (which applies
# them to cached out-of-fold outputs instead of refitting)
# --------------------------------------------------------------------------------------------

def vote_proba(probas: Sequence[np.ndarray]) -> np.ndarray:
    """The soft vote: the mean of the blocks' (n, n_classes) probabilities."""
    return np.mean(probas, axis=0)


def stack_features(preds: Sequence[np.ndarray], methods: Sequence[str], n_classes: int) -> np.ndarray:
    """Meta-features of a stack: each block's raw outputs as scores, blocks side by side, in
    float64 whatever the heads gave (the meta-learner's fit is float64: see
    :mod:`featstack.logistic`)."""
    return np.hstack([scores_from_prediction(p, m, n_classes) for p, m in zip(preds, methods)]).astype(
        np.float64, copy=False)


def stack_splitter(cv: int, random_state: int | None) -> StratifiedKFold:
    """The seeded folds of the out-of-fold scores a stack's meta-learner is trained on."""
    return StratifiedKFold(cv, shuffle=True, random_state=random_state)


def out_of_fold(head: BaseEstimator, X: np.ndarray, y: np.ndarray, cv: int, random_state: int | None,
                n_jobs: int | None = None) -> np.ndarray:
    """Raw out-of-fold outputs (``stack_method``) of clones of ``head`` on ``cv`` seeded folds,
    each the same kind of model as ``head`` fitted on all of X (:func:`pin_size_choices`).

    What ``cross_val_predict`` computes, fold by fold; :class:`StackClassifier` uses it, and the
    bench computes the same scores on the same folds and pins for several heads at once (their
    shared scaler fitted once: :mod:`featstack.head_groups`; ``tests/test_bench.py`` compares
    its stacks with this estimator's)."""
    proto = pin_size_choices(clone(head), len(X))
    method = stack_method(head)
    classes = np.unique(y)
    folds = list(stack_splitter(cv, random_state).split(X, y))
    parts = Parallel(n_jobs=n_jobs)(delayed(_fold_scores)(proto, method, X, y, tr, te, classes)
                                    for tr, te in folds)
    oof = np.empty((len(y),) + parts[0].shape[1:], dtype=parts[0].dtype)
    for (_, te), scores in zip(folds, parts):
        oof[te] = scores
    return oof


def _fold_scores(proto, method: str, X, y, tr, te, classes) -> np.ndarray:
    est = clone(proto).fit(X[tr], y[tr])
    return aligned_scores(est, method, X[te], classes)


def aligned_scores(est, method: str, X: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``est``'s ``method`` outputs on X with one column per class of ``classes`` (a class
    missing from the rows ``est`` was fitted on gets zero probability, as in
    ``cross_val_predict``; decision scores cannot be aligned, which is an error)."""
    scores = getattr(est, method)(X)
    seen = getattr(est, "classes_", classes)
    if len(seen) != len(classes):  # a class missing from this inner training fold
        if method != "predict_proba":
            raise ValueError(f"an inner stacking fold holds {len(seen)} of the {len(classes)} classes; "
                             "decision scores cannot be aligned: use fewer folds (cv) or more rows per class")
        full = np.zeros((len(X), len(classes)), dtype=scores.dtype)
        full[:, np.searchsorted(classes, seen)] = scores
        scores = full
    return scores


def default_meta_learner(random_state: int | None = None) -> BaseEstimator:
    """The meta-learner of a stack unless another one is given."""
    return LogisticRegression(max_iter=1000, random_state=random_state)


def fit_meta_learner(final: BaseEstimator | None, random_state: int | None, meta: np.ndarray,
                     y: np.ndarray) -> BaseEstimator:
    """A fresh copy of ``final`` (None: the default meta-learner) fitted on the meta-features."""
    est = default_meta_learner(random_state) if final is None else clone(final)
    if isinstance(est, LogisticRegression):  # the same minimisation, without per-fit dispatch
        return fit_logistic_regression(est, meta, y)
    return est.fit(meta, y)


# --------------------------------------------------------------------------------------------
# Shared validation
# --------------------------------------------------------------------------------------------

def block_slices(dims: Sequence[int] | None, n_features: int) -> list[slice]:
    """Column slices of the blocks; ``dims=None`` is one block of every column."""
    if dims is None:
        return [slice(0, n_features)]
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
        raise ValueError(f"dims must be a sequence of block widths, got {dims!r}")
    dims = list(dims)
    if not dims:
        raise ValueError("dims is empty: give at least one block width")
    for d in dims:
        if not isinstance(d, numbers.Integral) or isinstance(d, bool) or d < 1:
            raise ValueError(f"dims must be positive integers, got {d!r} in {tuple(dims)}")
    if sum(dims) != n_features:
        raise ValueError(f"dims {tuple(int(d) for d in dims)} sum to {sum(dims)} columns, "
                         f"but X has {n_features} features")
    out, start = [], 0
    for d in dims:
        out.append(slice(start, start + int(d)))
        start += int(d)
    return out


def first_non_finite(X: np.ndarray) -> tuple[int, int, int] | None:
    """(row, column, number of rows affected) of the first NaN or infinity in X, else None."""
    X = np.asarray(X)
    if X.dtype.kind not in "fc":
        return None
    finite = np.isfinite(X)
    if finite.all():
        return None
    row, col = np.argwhere(~finite)[0]
    return int(row), int(col), int((~finite.all(axis=1)).sum())


def check_finite_rows(X: np.ndarray, what: str = "X") -> None:
    """Raise ValueError naming the first row (and column) holding NaN or infinity."""
    bad = first_non_finite(X)
    if bad is not None:
        row, col, n = bad
        raise ValueError(f"Input {what} contains NaN or infinity at row {row} (column {col}, value "
                         f"{np.asarray(X)[row, col]}); {n} row(s) are not finite")


def _label(v) -> str:
    return repr(v.item() if isinstance(v, np.generic) else v)


def check_class_counts(y: np.ndarray, need: int = 0, why: str = "", *, names: Sequence | None = None,
                       subject: str = "y", owner: str = "a classifier", unit: str = "sample(s)",
                       hint: str = "lower cv or add samples", error: type = ValueError) -> None:
    """The class-count rule of every fit: at least two classes, and at least ``need`` rows of
    each (``why`` says what needs them, e.g. "the cv=5 folds"). ``y`` holds class labels, or
    indices into ``names`` (the class names to report); ``error`` is raised naming the classes
    short of rows, ``subject`` (what y is) and ``owner`` (what is being fitted)."""
    present, counts = np.unique(np.asarray(y), return_counts=True)
    labels = [names[int(c)] if names is not None else c for c in present]
    if len(present) < 2:
        only = f"({_label(labels[0])}, {int(counts[0])} rows)" if len(present) else "(no rows)"
        raise error(f"{subject} has only one class {only}; {owner} needs at least 2 classes to train, "
                    "and only 1 class is present")
    few = [(lab, int(c)) for lab, c in zip(labels, counts) if c < need]
    if few:
        detail = ", ".join(f"class {_label(lab)} has {c}" for lab, c in few[:5])
        raise error(f"{subject}: {detail} {unit}, fewer than {why}; every class needs at least "
                    f"one per fold ({hint})")


class _BlockClassifier(ClassifierMixin, BaseEstimator):
    """What VoteClassifier and StackClassifier share: validation, blocks, label encoding."""

    def _validate_fit(self, X, y):
        head_spec(self.head)  # unknown head → ConfigError, before any work
        X, y = validate_data(self, X, y, ensure_all_finite=False)
        check_finite_rows(X)
        check_classification_targets(y)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        return X, y_enc.astype(np.int64), block_slices(self.dims, X.shape[1])

    def _validate_predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, ensure_all_finite=False)
        check_finite_rows(X)
        return X

    def _blocks(self, X):
        # contiguous copies, as the column-selecting pipelines (ColumnTransformer) we are
        # checked against produce; the heads then never work on strided views
        return [np.ascontiguousarray(X[:, s]) for s in block_slices(self.dims, X.shape[1])]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


class VoteClassifier(_BlockClassifier):
    """Soft vote: one head per backbone block, class probabilities averaged.

    Heads without ``predict_proba`` vote with the softmax of their decision values. Late fusion
    like this keeps each backbone's head small and is robust when one backbone is weak.

    Parameters
    ----------
    head : registry name of the head fitted on every block (see ``featstack.heads``).
    dims : block widths, columns of X in order; None = one block.
    tune : search each head's regularisation by inner CV on the rows ``fit`` is given.
    random_state : seed of the heads (and of the tuning folds).
    """

    def __init__(self, head: str = "logreg", dims: Sequence[int] | None = None, tune: bool = False,
                 random_state: int | None = 0):
        self.head = head
        self.dims = dims
        self.tune = tune
        self.random_state = random_state

    def fit(self, X, y) -> "VoteClassifier":
        """Fit one head per block on all rows."""
        X, y_enc, _ = self._validate_fit(X, y)
        check_class_counts(y, owner=type(self).__name__)
        proto = create_head(self.head, tune=bool(self.tune), random_state=self.random_state)
        self.estimators_ = [clone(proto).fit(Xb, y_enc) for Xb in self._blocks(X)]
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Mean over blocks of each head's probabilities (or softmaxed decision values)."""
        X = self._validate_predict(X)
        return vote_proba([block_proba(est, Xb) for est, Xb in zip(self.estimators_, self._blocks(X))])

    def predict(self, X) -> np.ndarray:
        """The class with the highest averaged probability (ties → the lowest class index)."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


def _final_has(method: str):
    def check(self) -> bool:
        if hasattr(self, "final_estimator_"):
            return hasattr(self.final_estimator_, method)
        final = self.final_estimator if self.final_estimator is not None else default_meta_learner()
        return hasattr(final, method)
    return check


def _fit_one(est, X, y):
    return est.fit(X, y)


def _check_cv(cv) -> int:
    if not isinstance(cv, numbers.Integral) or isinstance(cv, bool) or cv < 2:
        raise ValueError(f"cv must be an integer >= 2 (number of stratified folds), got {cv!r}")
    return int(cv)


class StackClassifier(TransformerMixin, _BlockClassifier):
    """Stacking across backbones: the same base head on every block, out-of-fold scores
    concatenated, then a meta-learner.

    Out-of-fold predictions come from :func:`out_of_fold` (what ``cross_val_predict`` computes) with
    ``StratifiedKFold(cv, shuffle=True, random_state=random_state)`` (``predict_proba`` if the
    head has it, else ``decision_function``; binary → one column per block); the base heads are
    then refit on all rows and used at prediction time. This reproduces scikit-learn's
    ``StackingClassifier`` over column-selecting pipelines on the same folds, score for score.

    Parameters
    ----------
    head : registry name of the base head (one clone per block).
    dims : block widths, columns of X in order; None = one block.
    final_estimator : the meta-learner; None → ``LogisticRegression(max_iter=1000,
        random_state=random_state)``.
    cv : number of stratified folds for the out-of-fold scores (every class needs >= cv rows).
    random_state : seed of the folds and of the heads.
    tune : search each base head's regularisation by inner CV (inside each outer fold).
    n_jobs : joblib workers over blocks and folds.
    """

    def __init__(self, head: str = "logreg", dims: Sequence[int] | None = None,
                 final_estimator: BaseEstimator | None = None, cv: int = 5,
                 random_state: int | None = 0, tune: bool = False, n_jobs: int | None = None):
        self.head = head
        self.dims = dims
        self.final_estimator = final_estimator
        self.cv = cv
        self.random_state = random_state
        self.tune = tune
        self.n_jobs = n_jobs

    def fit(self, X, y) -> "StackClassifier":
        """Out-of-fold scores per block → meta-learner; then refit the base heads on all rows."""
        cv = _check_cv(self.cv)
        X, y_enc, _ = self._validate_fit(X, y)
        check_class_counts(y, cv, f"the cv={cv} folds", owner=type(self).__name__)
        blocks = self._blocks(X)
        proto = create_head(self.head, tune=bool(self.tune), random_state=self.random_state)
        method = stack_method(proto)
        parallel = Parallel(n_jobs=self.n_jobs)
        oof = parallel(delayed(out_of_fold)(proto, Xb, y_enc, cv, self.random_state, self.n_jobs)
                       for Xb in blocks)
        self.estimators_ = parallel(delayed(_fit_one)(clone(proto), Xb, y_enc) for Xb in blocks)
        self.stack_methods_ = [method] * len(blocks)
        meta = stack_features(oof, self.stack_methods_, len(self.classes_))
        self.final_estimator_ = fit_meta_learner(self.final_estimator, self.random_state, meta, y_enc)
        return self

    def transform(self, X) -> np.ndarray:
        """Meta-features of X: the refit base heads' scores, blocks side by side."""
        X = self._validate_predict(X)
        raw = [getattr(est, m)(Xb) for est, m, Xb in zip(self.estimators_, self.stack_methods_, self._blocks(X))]
        return stack_features(raw, self.stack_methods_, len(self.classes_))

    def predict(self, X) -> np.ndarray:
        """Class predicted by the meta-learner."""
        meta = self.transform(X)
        return self.classes_[np.asarray(self.final_estimator_.predict(meta), dtype=int)]

    @available_if(_final_has("predict_proba"))
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities of the meta-learner."""
        meta = self.transform(X)
        return self.final_estimator_.predict_proba(meta)

    @available_if(_final_has("decision_function"))
    def decision_function(self, X) -> np.ndarray:
        """Decision values of the meta-learner."""
        meta = self.transform(X)
        return self.final_estimator_.decision_function(meta)


# --------------------------------------------------------------------------------------------
# The fusion registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusionSpec:
    """A registered fusion: everything training, the bench, persistence and export need.

    ``build(head, dims, *, cv, random_state, tune, n_jobs)`` returns the unfitted estimator over
    blocks of widths ``dims``. ``min_backbones``/``max_backbones`` bound the backbone subsets the
    bench evaluates it on (training refuses more than ``max_backbones``). ``bench_combine`` is
    how the bench scores it from the per-block head outputs it shares across subsets:
    ``combine(parts, y_train, n_classes, random_state) -> (predicted class indices, number of
    meta-learner fits)``, where each part is one block's fitted head on an outer fold (``method``,
    ``raw`` and ``pred``: its outputs on the outer-test rows; ``oof``: its inner out-of-fold
    outputs on the outer-train rows, computed when ``needs_oof``). ``bench_combine=None``: the
    bench fits ``build``'s estimator on the subset's columns per fold (always correct, never
    shared). ``bench_combine_many(cells, y_train, n_classes, random_state, on_done)``, optional:
    the same for several subsets' cells of one fold at once (a list of parts lists), giving per
    cell its ``(prediction, n_fits)`` or the exception that cell raised, and calling
    ``on_done(i)`` as cell ``i`` is done (a stack fits all of a fold's meta-learners side by
    side). ``needs_oof`` also means training needs ``cv`` rows of every class. ``allowed_types``:
    type names a saved estimator of this fusion holds besides its heads (skops allowlist).
    ``converter``: a name in :data:`featstack.convert.FUSION_CONVERTERS`, a callable
    ``convert(estimator, dims, dtype, convert_head) -> HeadModule``, or None (export refuses).
    ``cost``: how complex the fusion is, as a rank (0 single, 1 concat: one head, 2 vote: one head
    per backbone, 3 stack: heads + inner folds + a meta-learner); the bench's tie rule prefers
    the lower one among configurations tied within noise. Registered fusions default to 3.
    """

    name: str
    build: Callable[..., BaseEstimator]
    min_backbones: int = 2
    max_backbones: int | None = None
    bench_combine: Callable | None = None
    bench_combine_many: Callable | None = None
    needs_oof: bool = False
    allowed_types: tuple[str, ...] = ()
    converter: str | Callable | None = None
    description: str = ""
    cost: int = 3

    def takes(self, n: int) -> bool:
        """Whether the fusion combines ``n`` backbones: the one rule the bench plans subsets with
        and training checks against."""
        return self.min_backbones <= n and (self.max_backbones is None or n <= self.max_backbones)


FUSION_SPECS: dict[str, FusionSpec] = {}


def register_fusion(name: str | FusionSpec, build: Callable[..., BaseEstimator] | None = None,
                    **spec_fields) -> FusionSpec:
    """Add a fusion to the registry (names are unique: they are stored in saved models); the
    bench, training, loading and export pick it up from here."""
    spec = name if isinstance(name, FusionSpec) else FusionSpec(name=name, build=build, **spec_fields)
    if spec.name in FUSION_SPECS:
        raise ValueError(f"fusion {spec.name!r} is already registered")
    if spec.min_backbones < 1 or (spec.max_backbones is not None and spec.max_backbones < spec.min_backbones):
        raise ValueError(f"fusion {spec.name!r}: backbone bounds {spec.min_backbones}..{spec.max_backbones}")
    if isinstance(spec.cost, bool) or not isinstance(spec.cost, int) or spec.cost < 0:
        raise ValueError(f"fusion {spec.name!r}: cost must be an integer rank >= 0, got {spec.cost!r}")
    FUSION_SPECS[spec.name] = replace(spec, allowed_types=tuple(spec.allowed_types))
    return FUSION_SPECS[spec.name]


def list_fusions() -> list[str]:
    """Registered fusion names, in registration order."""
    return list(FUSION_SPECS)


def fusion_spec(name: str) -> FusionSpec:
    """The spec of a registered fusion; an unknown name is one ConfigError with a suggestion."""
    try:
        return FUSION_SPECS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), FUSION_SPECS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown fusion {name!r}{hint}; known fusions: {', '.join(FUSION_SPECS)}") from None


def check_fusion(name: str) -> str:
    """``name`` if it is a known fusion; otherwise one ConfigError with a suggestion."""
    return fusion_spec(name).name


def check_backbone_count(fusion: str, n: int, keys: Sequence[str] = ()) -> None:
    """Refuse fewer or more backbones than a fusion takes (``single``: exactly one; ``stack``:
    2+), by the rule the bench plans with (the spec's bounds) and in its words."""
    spec = fusion_spec(fusion)
    if n < spec.min_backbones:
        named = f" ({', '.join(keys)})" if keys else ""
        fits = ", ".join(f for f, s in FUSION_SPECS.items() if s.takes(n))
        raise ConfigError(f"fusion {fusion!r} needs {backbone_sizes(spec)}, got {n}{named}"
                          f"{'; use ' + fits if fits else ''}")
    if spec.max_backbones is not None and n > spec.max_backbones:
        took = "exactly one backbone" if spec.max_backbones == 1 else f"at most {spec.max_backbones} backbones"
        named = f" ({', '.join(keys)})" if keys else ""
        others = ", ".join(f for f, s in FUSION_SPECS.items() if s.max_backbones is None or s.max_backbones >= n)
        raise ConfigError(f"fusion {fusion!r} takes {took}, got {n}{named}; use {others} to combine them")


def _built(spec: FusionSpec) -> BaseEstimator:
    """An unfitted estimator of a fusion, over its smallest number of one-column blocks."""
    return spec.build(next(iter(HEADS)), (1,) * spec.min_backbones, cv=2, random_state=0, tune=False,
                      n_jobs=None)


def fusion_root_types() -> dict[str, FusionSpec]:
    """Type name of each fusion's estimator → the first fusion building it (a plain head's
    type maps to ``single``)."""
    out: dict[str, FusionSpec] = {}
    for spec in FUSION_SPECS.values():
        out.setdefault(type_name(_built(spec)), spec)
    return out


def fusion_of_estimator(estimator) -> FusionSpec | None:
    """The fusion whose estimator type ``estimator`` has (a plain head: ``single``), else None."""
    return fusion_root_types().get(type_name(estimator))


def backbone_sizes(s: FusionSpec) -> str:
    """How many backbones a fusion takes, in words ("size 1", "2+ backbones")."""
    if s.max_backbones == s.min_backbones:
        return f"size {s.min_backbones}"
    return f"{s.min_backbones}+ backbones" if s.max_backbones is None else \
        f"{s.min_backbones}..{s.max_backbones} backbones"


def bench_sizes_hint() -> str:
    """Which subset sizes each fusion is benched on, for "nothing to evaluate" errors."""
    return "; ".join(f"{n!r} needs {backbone_sizes(s)}" for n, s in FUSION_SPECS.items())


def build_model(head: str, fusion: str, dims: Sequence[int], *, cv: int = 5, random_state: int = 0,
                tune: bool = False, n_jobs: int | None = None) -> BaseEstimator:
    """A fresh, unfitted estimator for a head × fusion over blocks of widths ``dims``.

    ``single``/``concat`` are the plain head on all columns (``single`` insists on one block);
    ``vote`` and ``stack`` fit one head per block.
    """
    spec = fusion_spec(fusion)
    head_spec(head)
    dims = tuple(int(d) for d in dims)
    check_backbone_count(fusion, len(dims))
    return spec.build(head, dims, cv=cv, random_state=random_state, tune=tune, n_jobs=n_jobs)


def _plain_head(head, dims, *, cv, random_state, tune, n_jobs):
    return create_head(head, tune=tune, random_state=random_state, n_jobs=n_jobs)


def _vote(head, dims, *, cv, random_state, tune, n_jobs):
    return VoteClassifier(head=head, dims=dims, tune=tune, random_state=random_state)


def _stack(head, dims, *, cv, random_state, tune, n_jobs):
    return StackClassifier(head=head, dims=dims, cv=cv, random_state=random_state, tune=tune, n_jobs=n_jobs)


def _empty_pred(parts) -> np.ndarray:
    return np.empty(0, dtype=np.int64)


def bench_single(parts, y_train, n_classes, random_state):
    """The one block's head predictions."""
    return parts[0]["pred"], 0


def bench_vote(parts, y_train, n_classes, random_state):
    """Argmax of :func:`vote_proba` over the blocks' probabilities (ties → lowest class)."""
    if parts[0]["raw"] is None:
        return _empty_pred(parts), 0
    proba = vote_proba([proba_from_prediction(p["raw"], p["method"]) for p in parts])
    return np.argmax(proba, axis=1), 0


def bench_stack(parts, y_train, n_classes, random_state):
    """The default meta-learner on the blocks' inner out-of-fold scores, applied to their
    scores on the outer-test rows: exactly what :class:`StackClassifier` fits on that fold."""
    got = bench_stack_many([parts], y_train, n_classes, random_state)[0]
    if isinstance(got, BaseException):
        raise got
    return got


def bench_stack_many(cells, y_train, n_classes, random_state, on_done=None) -> list:
    """:func:`bench_stack` for several subsets' cells of one fold, their meta-learners fitted
    side by side (:func:`featstack.logistic.fit_logistic_regressions`: the same fits, one
    batched loss evaluation per round). Per cell ``(prediction, 1)`` or its exception."""
    out: list = [None] * len(cells)
    problems, where = [], []
    for i, parts in enumerate(cells):
        try:
            meta = stack_features([p["oof"] for p in parts], [p["method"] for p in parts], n_classes)
        except Exception as exc:  # noqa: BLE001 - this cell fails alone
            out[i] = exc
            continue
        problems.append((default_meta_learner(random_state), meta, y_train))
        where.append(i)
    finals = fit_logistic_regressions_safe(problems, on_fit=None if on_done is None else lambda j: on_done(where[j]))
    for i, final in zip(where, finals):
        if isinstance(final, BaseException):
            out[i] = final
            continue
        parts = cells[i]
        if parts[0]["raw"] is None:
            out[i] = (_empty_pred(parts), 1)
            continue
        try:
            meta = stack_features([p["raw"] for p in parts], [p["method"] for p in parts], n_classes)
            out[i] = (np.asarray(final.predict(meta), dtype=np.int64), 1)
        except Exception as exc:  # noqa: BLE001
            out[i] = exc
    return out


_META_TYPES = (type_name(LogisticRegression),)
register_fusion("single", _plain_head, min_backbones=1, max_backbones=1, bench_combine=bench_single,
                converter="head", description="one head on one backbone", cost=0)
register_fusion("concat", _plain_head, min_backbones=2, converter="head",
                description="one head on the backbones' features side by side (early fusion)", cost=1)
register_fusion("vote", _vote, min_backbones=2, bench_combine=bench_vote,
                allowed_types=(type_name(VoteClassifier),), converter="vote",
                description="one head per backbone, class probabilities averaged (late fusion)", cost=2)
register_fusion("stack", _stack, min_backbones=2, bench_combine=bench_stack, bench_combine_many=bench_stack_many,
                needs_oof=True,
                allowed_types=(type_name(StackClassifier),) + _META_TYPES, converter="stack",
                description="one head per backbone, out-of-fold scores → a meta-learner", cost=3)

FUSIONS = tuple(FUSION_SPECS)  # the built-in fusions (list_fusions() also has registered ones)
