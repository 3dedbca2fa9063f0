"""scikit-learn → torch: fitted heads and fusions converted to :mod:`featstack.torch_heads`
modules, exactly (see there for the tolerances).

Which converter a saved model uses comes from the registries: a head's spec names one of
:data:`HEAD_CONVERTERS` (or gives a callable, or None: export refuses it), a fusion's spec one of
:data:`FUSION_CONVERTERS`. The "sklearn" head converter handles a Pipeline of scalers and a
LogisticRegression / LinearSVC / SVC / featstack's RbfSVC (exact: an SVC; Nystroem: a kernel layer
over the landmarks, then the linear layer) / GaussianNB / MultinomialNB / ComplementNB. Scalers:
``StandardScaler`` (and ``MinMaxScaler`` without clipping) are folded into the first linear map of
linear heads; ``MinMaxScaler(clip=True)`` keeps an affine + clamp layer in front (a clamp cannot
be folded); kernel and Gaussian heads keep the affine layer in front too.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .torch_heads import (SVC_KERNELS, ExportError, GaussianNBHead, HeadModule, LinearHead, NystroemHead,
                          StackHead, SVCHead, VoteHead, _resolve_dtype)


def _unwrap(est):
    inner = getattr(est, "best_estimator_", None)
    if inner is not None:
        return _unwrap(inner)
    if hasattr(est, "param_grid") or hasattr(est, "param_distributions"):
        raise ExportError(f"{type(est).__name__} was fitted with refit=False: it has no best_estimator_ to export")
    return est


def _affine_specs(steps, n_features: int) -> list:
    """Scaler steps → [(shift, weight, bias, clip)] in float64, consecutive unclipped ones merged."""
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    specs = []
    for step in steps:
        if isinstance(step, StandardScaler):
            mean = np.zeros(n_features) if getattr(step, "mean_", None) is None else np.asarray(step.mean_, np.float64)
            scale = np.ones(n_features) if getattr(step, "scale_", None) is None else np.asarray(step.scale_, np.float64)
            specs.append((mean, 1.0 / scale, np.zeros(n_features), None))
        elif isinstance(step, MinMaxScaler):
            clip = tuple(float(v) for v in step.feature_range) if step.clip else None
            specs.append((np.zeros(n_features), np.asarray(step.scale_, np.float64),
                          np.asarray(step.min_, np.float64), clip))
        else:
            raise ExportError(f"pipeline step {type(step).__name__} cannot be exported "
                              "(supported scalers: StandardScaler, MinMaxScaler)")
    merged = []
    for spec in specs:
        if merged and merged[-1][3] is None and spec[3] is None and not merged[-1][0].any():
            # y = (x*w1 + b1 - s2) * w2 + b2  → one affine with shift 0
            _, w1, b1, _ = merged[-1]
            s2, w2, b2, _ = spec
            merged[-1] = (np.zeros(n_features), w1 * w2, (b1 - s2) * w2 + b2, None)
        else:
            merged.append(spec)
    return merged


def _affine_as_linear(spec) -> tuple[np.ndarray, np.ndarray]:
    shift, w, b, _ = spec
    return w, b - shift * w  # (x - s) * w + b = x * w + (b - s * w)


def _make_pre(specs, dtype) -> tuple[list, list]:
    cfgs, values = [], []
    for spec in specs:
        clip = spec[3]
        cfgs.append({"dim": len(spec[1]), "clip": list(clip) if clip is not None else None})
        values.append(_affine_as_linear(spec))
    return cfgs, values


def _fill_pre(pre: nn.ModuleList, values, dtype) -> None:
    with torch.no_grad():
        for layer, (w, b) in zip(pre, values):
            layer.weight.copy_(torch.from_numpy(np.asarray(w, np.float64)).to(dtype))
            layer.bias.copy_(torch.from_numpy(np.asarray(b, np.float64)).to(dtype))


def _set(param: nn.Parameter, values) -> None:
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.array(values, dtype=np.float64)).to(param.dtype).reshape(param.shape))


def _export_classifier(clf, scalers: list, n_features: int, dtype: torch.dtype) -> HeadModule:
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import ComplementNB, GaussianNB, MultinomialNB
    from sklearn.svm import SVC, LinearSVC, NuSVC

    from .solvers import RbfSVC

    if not hasattr(clf, "classes_"):
        raise ExportError(f"{type(clf).__name__} is not fitted: train it before exporting")
    if isinstance(clf, RbfSVC):
        if clf.map_ is None:  # the exact path: an SVC
            return _export_classifier(clf.classifier_, scalers, n_features, dtype)
        return _export_nystroem(clf, scalers, n_features, dtype)
    classes = clf.classes_
    specs = _affine_specs(scalers, n_features)

    if isinstance(clf, (LogisticRegression, LinearSVC, MultinomialNB, ComplementNB)):
        if isinstance(clf, LogisticRegression):
            kind, W, b = "logreg", clf.coef_, clf.intercept_
        elif isinstance(clf, LinearSVC):
            kind, W, b = "linear-svm", clf.coef_, clf.intercept_
        elif isinstance(clf, MultinomialNB):
            kind, W, b = "multinomial-nb", clf.feature_log_prob_, clf.class_log_prior_
        else:
            kind, W = "complement-nb", clf.feature_log_prob_
            b = clf.class_log_prior_ if len(classes) == 1 else np.zeros(len(classes))
        W = np.atleast_2d(np.asarray(W, dtype=np.float64))
        b = np.broadcast_to(np.asarray(b, dtype=np.float64), (W.shape[0],)).copy()
        binary = W.shape[0] == 1 and len(classes) == 2
        # fold the trailing unclipped affine into the linear map: W (x*w + c) + b
        if specs and specs[-1][3] is None:
            w, c = _affine_as_linear(specs.pop())
            b = b + W @ c
            W = W * w[None, :]
        cfgs, values = _make_pre(specs, dtype)
        head = LinearHead(n_features, classes, kind, binary, cfgs, dtype=dtype)
        _fill_pre(head.pre, values, dtype)
        _set(head.weight, W)
        _set(head.bias, b)
        return head

    if isinstance(clf, GaussianNB):
        cfgs, values = _make_pre(specs, dtype)
        head = GaussianNBHead(n_features, classes, cfgs, dtype=dtype)
        _fill_pre(head.pre, values, dtype)
        var = np.asarray(clf.var_, dtype=np.float64)
        _set(head.theta_z, np.asarray(clf.theta_, dtype=np.float64) / np.sqrt(var))
        _set(head.log_var, np.log(var))
        _set(head.class_log_prior, np.log(np.asarray(clf.class_prior_, dtype=np.float64)))
        return head

    if isinstance(clf, (SVC, NuSVC)):
        if clf.probability is True:
            raise ExportError("SVC(probability=True) cannot be exported: its Platt-scaled, "
                              "pairwise-coupled probabilities are not reproduced; refit with probability=False")
        kernel = clf.kernel
        if callable(kernel) or kernel not in SVC_KERNELS:
            raise ExportError(f"SVC kernel {kernel!r} cannot be exported (supported: {', '.join(SVC_KERNELS)})")
        if getattr(clf, "_sparse", False):
            raise ExportError("an SVC fitted on sparse input cannot be exported")
        cfgs, values = _make_pre(specs, dtype)
        head = SVCHead(n_features, classes, clf.n_support_, kernel, clf.degree, clf.decision_function_shape,
                       clf.break_ties, cfgs, dtype=dtype)
        _fill_pre(head.pre, values, dtype)
        dual = np.asarray(clf.dual_coef_, dtype=np.float64)
        icpt = np.asarray(clf.intercept_, dtype=np.float64)
        if len(classes) == 2:  # scikit-learn flipped the binary signs; store libsvm's
            dual, icpt = -dual, -icpt
        _set(head.support_vectors, clf.support_vectors_)
        _set(head.dual_coef, dual)
        _set(head.intercept, icpt)
        if kernel != "linear":
            _set(head.log_gamma, math.log(float(clf._gamma)))
        if kernel in ("poly", "sigmoid"):
            _set(head.coef0, float(clf.coef0))
        return head

    raise ExportError(f"{type(clf).__name__} cannot be exported (supported: LogisticRegression, LinearSVC, "
                      "SVC, featstack's RbfSVC, GaussianNB, MultinomialNB, ComplementNB, and featstack's vote/stack fusions)")


def _export_nystroem(clf, scalers: list, n_features: int, dtype: torch.dtype) -> NystroemHead:
    """RbfSVC's approximate path: scalers (kept in front) → RBF kernel over the Nystroem
    landmarks → the linear SVM, with Nystroem's normalization folded into its weights."""
    nys, svm = clf.map_, clf.classifier_
    cfgs, values = _make_pre(_affine_specs(scalers, n_features), dtype)
    coef = np.atleast_2d(np.asarray(svm.coef_, dtype=np.float64))
    binary = coef.shape[0] == 1 and len(svm.classes_) == 2
    head = NystroemHead(n_features, svm.classes_, nys.components_.shape[0], binary, cfgs, dtype=dtype)
    _fill_pre(head.pre, values, dtype)
    _set(head.landmarks, np.asarray(nys.components_, dtype=np.float64))
    _set(head.log_gamma, math.log(float(nys.gamma)))
    _set(head.weight, coef @ np.asarray(nys.normalization_, dtype=np.float64))
    _set(head.bias, np.broadcast_to(np.asarray(svm.intercept_, dtype=np.float64), (coef.shape[0],)))
    return head


def _block_dims(est, dims, n_features: int | None) -> list:
    own = getattr(est, "dims", None)
    if own is None:
        own = [n_features] if n_features is not None else None
    if dims is not None:
        dims = [int(d) for d in dims]
        if own is not None and list(map(int, own)) != dims:
            raise ExportError(f"dims {tuple(dims)} differ from the fusion's own block widths {tuple(own)}")
        return dims
    if own is None:
        raise ExportError("cannot tell the block widths: pass dims")
    return [int(d) for d in own]


def sklearn_head(estimator, dtype: torch.dtype) -> HeadModule:
    """The "sklearn" head converter: a fitted Pipeline (scalers → LogisticRegression / LinearSVC
    / SVC / RbfSVC / GaussianNB / MultinomialNB / ComplementNB), one of those bare, or a
    GridSearchCV around any of them."""
    from sklearn.pipeline import Pipeline

    est = _unwrap(estimator)
    n_in = getattr(est, "n_features_in_", None)
    if isinstance(est, Pipeline):
        steps = [s for _, s in est.steps if s is not None and s != "passthrough"]
        if not steps:
            raise ExportError("empty pipeline")
        scalers, clf = steps[:-1], _unwrap(steps[-1])
    else:
        scalers, clf = [], est
    n_features = n_in if n_in is not None else getattr(clf, "n_features_in_", None)
    if n_features is None:
        raise ExportError(f"{type(est).__name__} is not fitted: train it before exporting")
    return _export_classifier(clf, scalers, int(n_features), dtype)


def _fitted_blocks(est, dims) -> list:
    if not hasattr(est, "estimators_"):
        raise ExportError(f"{type(est).__name__} is not fitted: train it before exporting")
    return _block_dims(est, dims, getattr(est, "n_features_in_", None))


def convert_plain(est, dims, dtype: torch.dtype, convert_head) -> HeadModule:
    """The "head" fusion converter (single, concat): the head over all the columns."""
    module = convert_head(_unwrap(est), dtype)
    if dims is not None and sum(int(d) for d in dims) != module.n_features:
        raise ExportError(f"dims {tuple(int(d) for d in dims)} sum to {sum(int(d) for d in dims)}, "
                          f"the head takes {module.n_features} features")
    return module


def convert_vote(est, dims, dtype: torch.dtype, convert_head) -> HeadModule:
    """The "vote" fusion converter: each block's head, probabilities averaged."""
    bdims = _fitted_blocks(est, dims)
    blocks = [convert_plain(b, [d], dtype, convert_head) for b, d in zip(est.estimators_, bdims)]
    return VoteHead(blocks, bdims, est.classes_)


def convert_stack(est, dims, dtype: torch.dtype, convert_head) -> HeadModule:
    """The "stack" fusion converter: each block's head, their scores side by side, the
    meta-learner (a scikit-learn classifier, converted by the "sklearn" converter)."""
    bdims = _fitted_blocks(est, dims)
    blocks = [convert_plain(b, [d], dtype, convert_head) for b, d in zip(est.estimators_, bdims)]
    width = sum(b.scores(torch.zeros((0, d), dtype=dtype)).shape[1] for b, d in zip(blocks, bdims))
    final = convert_plain(est.final_estimator_, [width], dtype, sklearn_head)
    return StackHead(blocks, final, bdims, est.classes_)


# The converters head and fusion specs name (featstack.heads.HeadSpec.converter,
# featstack.fusion.FusionSpec.converter); a spec may also give a callable of the same form.
HEAD_CONVERTERS = {"sklearn": sklearn_head}
FUSION_CONVERTERS = {"head": convert_plain, "vote": convert_vote, "stack": convert_stack}


def _converter(name_or_fn, table: dict, what: str):
    if name_or_fn is None:
        return None
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in table:
        raise ExportError(f"{what} names converter {name_or_fn!r}; known: {', '.join(table)}")
    return table[name_or_fn]


def model_converter(head: str, fusion: str):
    """``convert(estimator, dims, dtype)`` for a saved model of ``head`` × ``fusion``, from their
    specs; an ExportError naming the head (or fusion) whose spec names no torch converter, so
    export refuses before writing anything."""
    from .fusion import fusion_spec
    from .heads import head_spec

    hconv = _converter(head_spec(head).converter, HEAD_CONVERTERS, f"head {head!r}")
    if hconv is None:
        raise ExportError(f"head {head!r} cannot be exported to torch: its spec names no converter "
                          "(register it with converter=... to export it)")
    fconv = _converter(fusion_spec(fusion).converter, FUSION_CONVERTERS, f"fusion {fusion!r}")
    if fconv is None:
        raise ExportError(f"fusion {fusion!r} cannot be exported to torch: its spec names no converter")
    return lambda est, dims, dtype: fconv(est, dims, _resolve_dtype(dtype), hconv)


def export_head(estimator, dims: Sequence[int] | None = None, dtype: torch.dtype | str = torch.float64) -> HeadModule:
    """A fitted head or fusion → a trainable torch module reproducing it on cached features.

    ``estimator``: a Pipeline (scalers → LogisticRegression / LinearSVC / SVC / RbfSVC /
    GaussianNB / MultinomialNB / ComplementNB), one of those bare, a GridSearchCV around any of them, or the
    estimator of a registered fusion (VoteClassifier / StackClassifier), whose blocks are
    converted with the "sklearn" converter. ``dims`` (block widths of the feature columns)
    is checked against the fusion's own; plain heads take all columns. ``dtype`` float64 gives
    scikit-learn's numbers to ~1e-12; float32 to ~1e-6.
    """
    from .fusion import fusion_of_estimator

    dtype = _resolve_dtype(dtype)
    est = _unwrap(estimator)
    spec = fusion_of_estimator(est)
    convert = _converter(spec.converter, FUSION_CONVERTERS, f"fusion {spec.name!r}") if spec else None
    if convert is None:
        convert = convert_plain
    return convert(est, dims, dtype, sklearn_head)
