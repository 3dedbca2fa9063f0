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
from typing import Sequence

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .errors import ConfigError
from .heads import create_head, head_spec

FUSIONS = ("single", "concat", "vote", "stack")
STACK_METHODS = ("predict_proba", "decision_function")


def check_fusion(name: str) -> str:
    """``name`` if it is a known fusion; otherwise one ConfigError with a suggestion."""
    if name in FUSIONS:
        return name
    close = difflib.get_close_matches(str(name), FUSIONS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown fusion {name!r}{hint}; known fusions: {', '.join(FUSIONS)}")


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
    float32 input gives float32 scores, exactly as there).
    """
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


def check_finite_rows(X: np.ndarray, what: str = "X") -> None:
    """Raise ValueError naming the first row (and column) holding NaN or infinity."""
    X = np.asarray(X)
    if X.dtype.kind not in "fc":
        return
    finite = np.isfinite(X)
    if finite.all():
        return
    row, col = np.argwhere(~finite)[0]
    bad = int((~finite.all(axis=1)).sum())
    raise ValueError(f"Input {what} contains NaN or infinity at row {row} (column {col}, value "
                     f"{X[row, col]}); {bad} row(s) are not finite")


def _label(v) -> str:
    return repr(v.item() if isinstance(v, np.generic) else v)


def check_class_counts(y_encoded: np.ndarray, classes: np.ndarray, cv: int | None, owner: str) -> None:
    """At least two classes, and (for out-of-fold predictions) at least ``cv`` rows per class."""
    if len(classes) < 2:
        raise ValueError(f"{owner} needs at least 2 classes to train; y has only 1 class "
                         f"({_label(classes[0])})")
    if cv is not None:
        counts = np.bincount(y_encoded, minlength=len(classes))
        few = np.flatnonzero(counts < cv)
        if len(few):
            detail = ", ".join(f"class {_label(classes[i])} has {counts[i]}" for i in few[:5])
            raise ValueError(f"{owner}: {detail} sample(s), fewer than the cv={cv} folds; every "
                             "class needs at least one sample per fold (lower cv or add samples)")


def _check_cv(cv) -> int:
    if not isinstance(cv, numbers.Integral) or isinstance(cv, bool) or cv < 2:
        raise ValueError(f"cv must be an integer >= 2 (number of stratified folds), got {cv!r}")
    return int(cv)


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
        check_class_counts(y_enc, self.classes_, None, type(self).__name__)
        proto = create_head(self.head, tune=bool(self.tune), random_state=self.random_state)
        self.estimators_ = [clone(proto).fit(Xb, y_enc) for Xb in self._blocks(X)]
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Mean over blocks of each head's probabilities (or softmaxed decision values)."""
        X = self._validate_predict(X)
        probas = [block_proba(est, Xb) for est, Xb in zip(self.estimators_, self._blocks(X))]
        return np.mean(probas, axis=0)

    def predict(self, X) -> np.ndarray:
        """The class with the highest averaged probability (ties → the lowest class index)."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


def _final_has(method: str):
    def check(self) -> bool:
        if hasattr(self, "final_estimator_"):
            return hasattr(self.final_estimator_, method)
        final = self.final_estimator if self.final_estimator is not None else LogisticRegression()
        return hasattr(final, method)
    return check


def _fit_one(est, X, y):
    return est.fit(X, y)


class StackClassifier(TransformerMixin, _BlockClassifier):
    """Stacking across backbones: the same base head on every block, out-of-fold scores
    concatenated, then a meta-learner.

    Out-of-fold predictions come from ``cross_val_predict`` with
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

    def _make_final(self) -> BaseEstimator:
        if self.final_estimator is None:
            return LogisticRegression(max_iter=1000, random_state=self.random_state)
        return clone(self.final_estimator)

    def fit(self, X, y) -> "StackClassifier":
        """Out-of-fold scores per block → meta-learner; then refit the base heads on all rows."""
        cv = _check_cv(self.cv)
        X, y_enc, _ = self._validate_fit(X, y)
        check_class_counts(y_enc, self.classes_, cv, type(self).__name__)
        blocks = self._blocks(X)
        proto = create_head(self.head, tune=bool(self.tune), random_state=self.random_state)
        method = stack_method(proto)
        splitter = StratifiedKFold(cv, shuffle=True, random_state=self.random_state)
        parallel = Parallel(n_jobs=self.n_jobs)
        oof = parallel(
            delayed(cross_val_predict)(clone(proto), Xb, y_enc, cv=splitter, method=method,
                                       n_jobs=self.n_jobs)
            for Xb in blocks)
        self.estimators_ = parallel(delayed(_fit_one)(clone(proto), Xb, y_enc) for Xb in blocks)
        self.stack_methods_ = [method] * len(blocks)
        meta = np.hstack([scores_from_prediction(p, method, len(self.classes_)) for p in oof])
        self.final_estimator_ = self._make_final().fit(meta, y_enc)
        return self

    def transform(self, X) -> np.ndarray:
        """Meta-features of X: the refit base heads' scores, blocks side by side."""
        X = self._validate_predict(X)
        return np.hstack([
            scores_from_prediction(getattr(est, m)(Xb), m, len(self.classes_))
            for est, m, Xb in zip(self.estimators_, self.stack_methods_, self._blocks(X))])

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


def build_model(head: str, fusion: str, dims: Sequence[int], *, cv: int = 5, random_state: int = 0,
                tune: bool = False, n_jobs: int | None = None) -> BaseEstimator:
    """A fresh, unfitted estimator for a head × fusion over blocks of widths ``dims``.

    ``single``/``concat`` are the plain head on all columns (``single`` insists on one block);
    ``vote`` and ``stack`` fit one head per block.
    """
    check_fusion(fusion)
    head_spec(head)
    dims = tuple(int(d) for d in dims)
    if fusion == "single":
        if len(dims) != 1:
            raise ConfigError(f"fusion 'single' takes exactly one backbone, got {len(dims)}; "
                              "use concat, vote or stack to combine several")
        return create_head(head, tune=tune, random_state=random_state, n_jobs=n_jobs)
    if fusion == "concat":
        return create_head(head, tune=tune, random_state=random_state, n_jobs=n_jobs)
    if fusion == "vote":
        return VoteClassifier(head=head, dims=dims, tune=tune, random_state=random_state)
    return StackClassifier(head=head, dims=dims, cv=cv, random_state=random_state, tune=tune,
                           n_jobs=n_jobs)
