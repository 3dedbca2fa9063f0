"""Torch head modules: a scikit-learn head or fusion as trainable layers (the export's output).

Every exported number is an ``nn.Parameter`` (integer index tables aside), so the network can be
fine-tuned, and each module reproduces scikit-learn's own outputs on the cached features: ≤ 1e-6
relative in float64 (measured ~1e-14), ≤ 1e-4 in float32 (measured ≤ 5e-5), and identical
predictions (in float32, except rows within float32 rounding of a decision boundary, e.g. a soft
vote of saturated naive Bayes blocks tied at 0.5/0.5). :mod:`featstack.convert` fills them from
fitted estimators; :mod:`featstack.network` puts one behind the backbones.
Head modules (all subclasses of :class:`HeadModule`) share one API:

``forward(x)``          (N, D) features → (N, C) logits, the training signal. Softmax(logits)
                        is ``predict_proba`` for heads that have it (LogisticRegression binary
                        gives [0, z]; naive Bayes gives the joint log-likelihood); for heads
                        without probabilities the logits are the decision values (binary: [0, d];
                        multiclass SVC: the ovr-shaped decision function).
``sklearn_outputs(x)``  what scikit-learn's ``predict_proba`` returns if the head has it, else
                        its ``decision_function`` (same shapes: a binary decision is (N,)).
``predict_index(x)``    index into ``classes`` of scikit-learn's ``predict`` (SVC: one-vs-one
                        votes with libsvm's tie rule, not the argmax of the logits).
``scores(x)`` / ``proba(x)``  what stacking reads / what a soft vote averages
                        (:func:`featstack.fusion.block_scores` / ``block_proba``).

Scalers: ``StandardScaler`` (and ``MinMaxScaler`` without clipping) are folded into the first
linear map of linear heads; ``MinMaxScaler(clip=True)`` keeps an affine + clamp layer in front
(a clamp cannot be folded); kernel and Gaussian heads keep the affine layer in front too.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, FeatstackError

DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Elements of the (rows, classes, features) difference tensor per chunk in GaussianNBHead.
_CHUNK_ELEMS = 1 << 23


class ExportError(FeatstackError):
    """A head, fusion or network folder that cannot be exported or rebuilt."""


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ConfigError(f"head dtype {dtype}: use torch.float64 or torch.float32")


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"head dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    _dtype_name(dtype)
    return dtype


def _zeros(shape, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=dtype))


def _json_classes(classes) -> list:
    out = []
    for c in np.asarray(classes).tolist():
        out.append(c if isinstance(c, (int, float, str, bool)) else str(c))
    return out


# ============================================================================================
# Layers and head modules
# ============================================================================================

class Affine(nn.Module):
    """``x * weight + bias``, optionally clamped: a scaler in front of a head.

    StandardScaler is ``weight = 1/scale_, bias = -mean_/scale_``; MinMaxScaler is
    ``weight = scale_, bias = min_`` (its exact operation order), with ``clip`` = its
    feature_range when clip=True. The bias is in scaled units, so an optimizer step moves it
    relative to the features' spread (a shift in raw units would move by ``lr`` raw units,
    which is many standard deviations for features with a small spread).
    """

    def __init__(self, dim: int, clip: Sequence[float] | None = None, *, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.dim = int(dim)
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.weight = nn.Parameter(torch.ones(self.dim, dtype=dtype))
        self.bias = _zeros(self.dim, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.weight + self.bias
        return y.clamp(self.clip[0], self.clip[1]) if self.clip is not None else y

    def config(self) -> dict:
        return {"dim": self.dim, "clip": list(self.clip) if self.clip is not None else None}


class HeadModule(nn.Module):
    """Base class of exported heads: see the module docstring for the API."""

    type_name = "head"
    #: "predict_proba" or "decision_function": what sklearn_outputs reproduces
    sklearn_method = "decision_function"

    def __init__(self, n_features: int, classes: Sequence):
        super().__init__()
        self.n_features = int(n_features)
        self.classes = _json_classes(classes)
        self.n_classes = len(self.classes)

    # -- inputs --------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float64

    def _input(self, x) -> torch.Tensor:
        x = torch.as_tensor(x)
        p = next(self.parameters(), None)
        device = p.device if p is not None else x.device
        x = x.to(device=device, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ConfigError(f"{type(self).__name__}: expected features of shape (N, {self.n_features}), "
                              f"got {tuple(x.shape)}")
        return x

    # -- the API -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sklearn_outputs(self, x) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_index(self, x) -> torch.Tensor:
        """Index (into ``classes``) of scikit-learn's prediction: argmax, ties → lowest."""
        return torch.argmax(self.forward(x), dim=1)

    def proba(self, x) -> torch.Tensor:
        """(N, C) what a soft vote averages: predict_proba, else softmax of decision values."""
        if self.sklearn_method == "predict_proba":
            return self.sklearn_outputs(x)
        return torch.softmax(self.forward(x), dim=1)

    def log_proba(self, x) -> torch.Tensor:
        """log of :meth:`proba`, computed stably from the logits."""
        return torch.log_softmax(self.forward(x), dim=1)

    def scores(self, x) -> torch.Tensor:
        """(N, k) stacking meta-features, by the rule stacking uses on scikit-learn's outputs
        (:func:`featstack.fusion.scores_from_prediction`: binary → one column)."""
        from .fusion import scores_from_prediction

        return scores_from_prediction(self.sklearn_outputs(x), self.sklearn_method, self.n_classes)

    def config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def sklearn_log_proba(jll: torch.Tensor) -> torch.Tensor:
    """``jll - logsumexp(jll)`` computed the way scikit-learn's naive Bayes does (its
    ``_logsumexp``, after scipy's): the maxima are taken out of the sum and ``log1p`` keeps the
    rest exact, so a confident class gets 1 - 1e-12 rather than a rounded 1. Near-ties in a soft
    vote of such probabilities then break the same way as in scikit-learn."""
    amax = jll.max(dim=1, keepdim=True).values
    is_max = jll == amax
    m = is_max.sum(dim=1, keepdim=True).to(jll.dtype)
    shift = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
    rest = torch.where(is_max, torch.full_like(jll, -math.inf), jll)
    s = torch.exp(rest - shift).sum(dim=1, keepdim=True)
    s = torch.where(s == 0, s, s / m)
    return jll - (torch.log1p(s) + torch.log(m) + amax)


def _pre_config(pre: nn.ModuleList) -> list:
    return [a.config() for a in pre]


def _build_pre(cfgs: Sequence[dict], dtype: torch.dtype) -> nn.ModuleList:
    return nn.ModuleList(Affine(c["dim"], c.get("clip"), dtype=dtype) for c in cfgs)


def _apply_pre(pre: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in pre:
        x = layer(x)
    return x


LINEAR_KINDS = {
    # kind: (sklearn method, output description)
    "logreg": "predict_proba",
    "linear-svm": "decision_function",
    "multinomial-nb": "predict_proba",
    "complement-nb": "predict_proba",
}


class LinearHead(HeadModule):
    """One linear map (scalers folded in): LogisticRegression, LinearSVC, Multinomial/Complement NB.

    ``binary`` heads have a single decision row z (scikit-learn's coef_ of shape (1, D)); their
    logits are [0, z], so softmax = LogisticRegression.predict_proba and argmax = predict.
    Naive Bayes rows are the joint log-likelihood of each class.
    """

    type_name = "linear"

    def __init__(self, n_features: int, classes: Sequence, kind: str, binary: bool,
                 pre: Sequence[dict] = (), *, dtype: torch.dtype = torch.float64):
        super().__init__(n_features, classes)
        if kind not in LINEAR_KINDS:
            raise ExportError(f"unknown linear head kind {kind!r}")
        self.kind = kind
        self.sklearn_method = LINEAR_KINDS[kind]
        self.binary = bool(binary)
        self.pre = _build_pre(pre, dtype)
        k = 1 if self.binary else self.n_classes
        self.weight = _zeros((k, self.n_features), dtype)
        self.bias = _zeros((k,), dtype)

    def decision(self, x) -> torch.Tensor:
        """(N, K) raw linear outputs (K = 1 for binary): decision_function / joint log-likelihood."""
        x = _apply_pre(self.pre, self._input(x))
        return x @ self.weight.T + self.bias

    def forward(self, x) -> torch.Tensor:
        z = self.decision(x)
        if self.binary:
            return torch.cat([torch.zeros_like(z), z], dim=1)
        return z

    def decision_function(self, x) -> torch.Tensor:
        """scikit-learn's decision_function (binary → (N,)), or the NB joint log-likelihood."""
        z = self.decision(x)
        return z[:, 0] if self.binary else z

    def sklearn_outputs(self, x) -> torch.Tensor:
        """logreg / NB: predict_proba; linear-svm: decision_function."""
        z = self.decision(x)
        if self.kind == "linear-svm":
            return z[:, 0] if self.binary else z
        if self.kind == "logreg":
            if self.binary:  # exactly LogisticRegression._predict_proba_lr: [1 - expit, expit]
                p = torch.sigmoid(z[:, 0])
                return torch.stack([1 - p, p], dim=1)
            return torch.softmax(z, dim=1)
        return torch.exp(sklearn_log_proba(z))  # NB: exp(jll - logsumexp(jll))

    def predict_index(self, x) -> torch.Tensor:
        z = self.decision(x)
        if self.binary:  # LinearClassifierMixin.predict: scores > 0 → class 1
            return (z[:, 0] > 0).long()
        return torch.argmax(z, dim=1)

    def config(self) -> dict:
        return {"type": self.type_name, "n_features": self.n_features, "classes": self.classes,
                "kind": self.kind, "binary": self.binary, "pre": _pre_config(self.pre)}


class NystroemHead(HeadModule):
    """svm-rbf above its size threshold (:class:`featstack.solvers.RbfSVC`): an RBF kernel
    layer over the Nystroem landmarks, then the linear SVM's layer.

    scikit-learn computes ``K(x, landmarks) @ normalization_.T`` then the linear SVM's
    ``@ coef_.T + intercept_``; here ``weight = coef_ @ normalization_`` (one (K, M) map), so the
    kernel values feed the decision directly. Outputs as a linear-svm :class:`LinearHead`
    (decision_function; binary logits [0, d]), whose methods it shares; not a LinearHead, so
    nothing takes its weights for a map of the features. ``gamma`` is stored as its log, like
    SVCHead's.
    """

    type_name = "nystroem"
    kind = "linear-svm"
    sklearn_method = LINEAR_KINDS["linear-svm"]

    def __init__(self, n_features: int, classes: Sequence, n_components: int, binary: bool,
                 pre: Sequence[dict] = (), *, dtype: torch.dtype = torch.float64):
        super().__init__(n_features, classes)
        self.binary = bool(binary)
        self.n_components = int(n_components)
        self.pre = _build_pre(pre, dtype)
        self.landmarks = _zeros((self.n_components, self.n_features), dtype)
        self.log_gamma = nn.Parameter(torch.zeros((), dtype=dtype))
        k = 1 if self.binary else self.n_classes
        self.weight = _zeros((k, self.n_components), dtype)
        self.bias = _zeros((k,), dtype)

    def decision(self, x) -> torch.Tensor:
        """(N, K) decision values (K = 1 for binary)."""
        x = _apply_pre(self.pre, self._input(x))
        return rbf_kernel(x, self.landmarks, torch.exp(self.log_gamma)) @ self.weight.T + self.bias

    forward = LinearHead.forward
    decision_function = LinearHead.decision_function
    sklearn_outputs = LinearHead.sklearn_outputs
    predict_index = LinearHead.predict_index

    def config(self) -> dict:
        return {"type": self.type_name, "n_features": self.n_features, "classes": self.classes,
                "n_components": self.n_components, "binary": self.binary, "pre": _pre_config(self.pre)}


class GaussianNBHead(HeadModule):
    """GaussianNB as a quadratic layer: the joint log-likelihood

    ``log prior_c - ½ Σ log(2π var_c) - ½ Σ (x - θ_c)² / var_c``

    with the variance stored as its log (training keeps it positive) and the means in units of
    the class standard deviations, ``theta_z = θ / σ`` (an optimizer step then moves a mean by a
    fraction of its own spread; a feature with a tiny within-class variance would otherwise swing
    the likelihood by orders of magnitude per step). scikit-learn's var_ already includes the
    var_smoothing epsilon. Logits = joint log-likelihood, so log_softmax(logits) =
    predict_log_proba.
    """

    type_name = "gaussian-nb"
    sklearn_method = "predict_proba"

    def __init__(self, n_features: int, classes: Sequence, pre: Sequence[dict] = (), *,
                 dtype: torch.dtype = torch.float64):
        super().__init__(n_features, classes)
        self.pre = _build_pre(pre, dtype)
        self.theta_z = _zeros((self.n_classes, self.n_features), dtype)
        self.log_var = _zeros((self.n_classes, self.n_features), dtype)
        self.class_log_prior = _zeros((self.n_classes,), dtype)

    def forward(self, x) -> torch.Tensor:
        x = _apply_pre(self.pre, self._input(x))
        var = torch.exp(self.log_var)
        inv_sd = torch.exp(-0.5 * self.log_var)
        norm = -0.5 * torch.sum(torch.log(2.0 * math.pi * var), dim=1)
        n, d = x.shape
        step = max(1, _CHUNK_ELEMS // max(1, n * d))
        quad = torch.cat([
            ((x[:, None, :] * inv_sd[None, c:c + step] - self.theta_z[None, c:c + step]) ** 2).sum(-1)
            for c in range(0, self.n_classes, step)], dim=1) if n else x.new_zeros((0, self.n_classes))
        return self.class_log_prior + (norm - 0.5 * quad)  # scikit-learn's order of additions

    def sklearn_outputs(self, x) -> torch.Tensor:
        """predict_proba = exp(jll - logsumexp(jll))."""
        return torch.exp(sklearn_log_proba(self.forward(x)))

    def predict_log_proba(self, x) -> torch.Tensor:
        return sklearn_log_proba(self.forward(x))

    def config(self) -> dict:
        return {"type": self.type_name, "n_features": self.n_features, "classes": self.classes,
                "pre": _pre_config(self.pre)}


SVC_KERNELS = ("rbf", "linear", "poly", "sigmoid")


def rbf_kernel(x: torch.Tensor, centres: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """(N, M) ``exp(-gamma |x - c|^2)``, distances from direct differences as libsvm computes
    them (the |x|^2 + |c|^2 - 2xc expansion loses precision)."""
    d2 = torch.cdist(x, centres, p=2.0, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    return torch.exp(-gamma * d2)


class SVCHead(HeadModule):
    """SVC (libsvm C-SVC/nu-SVC): kernel layer over the support vectors, one-vs-one pair scores,
    ovr-shaped decision function and libsvm's voting.

    Layout as libsvm: support vectors grouped by class (``n_support``); for the pair (i, j),
    i < j, in the order (0,1), (0,2), ..., (1,2), ..., the decision is
    ``Σ_{s ∈ SV_i} dual_coef[j-1, s] K(x, s) + Σ_{s ∈ SV_j} dual_coef[i, s] K(x, s) + intercept[p]``,
    positive → vote for i. All pairs are one (pairs × support vectors) matrix product. Stored
    with libsvm's signs (scikit-learn flips dual_coef_/intercept_ of binary models; the flip is
    undone here and redone in :meth:`decision_function`).

    * :meth:`ovo_decision` — (N, pairs), libsvm's sign (= decision_function_shape="ovo").
    * :meth:`decision_function` — scikit-learn's: binary (N,); multiclass "ovr" shape =
      votes + S / (3(|S| + 1)) exactly as ``_ovr_decision_function``.
    * :meth:`predict_index` — libsvm's votes (d > 0 → i, else j), argmax with ties to the lowest
      class index; with ``break_ties=True`` the argmax of the ovr decision function.
    * ``forward`` — logits: binary [0, d]; multiclass the ovr decision function (whatever the
      fitted decision_function_shape), so cross-entropy trains on the decision values.
    """

    type_name = "svc"
    sklearn_method = "decision_function"

    def __init__(self, n_features: int, classes: Sequence, n_support: Sequence[int], kernel: str = "rbf",
                 degree: int = 3, decision_function_shape: str = "ovr", break_ties: bool = False,
                 pre: Sequence[dict] = (), *, dtype: torch.dtype = torch.float64):
        super().__init__(n_features, classes)
        if kernel not in SVC_KERNELS:
            raise ExportError(f"SVC kernel {kernel!r} cannot be exported (supported: {', '.join(SVC_KERNELS)})")
        self.kernel = kernel
        self.degree = int(degree)
        self.decision_function_shape = str(decision_function_shape)
        self.break_ties = bool(break_ties)
        self.n_support = [int(n) for n in n_support]
        if len(self.n_support) != self.n_classes:
            raise ExportError(f"SVC: n_support has {len(self.n_support)} entries for {self.n_classes} classes")
        self.pre = _build_pre(pre, dtype)
        n_sv = sum(self.n_support)
        c = self.n_classes
        self.support_vectors = _zeros((n_sv, self.n_features), dtype)
        self.dual_coef = _zeros((c - 1, n_sv), dtype)
        self.intercept = _zeros((c * (c - 1) // 2,), dtype)
        # kernel parameters, only those the kernel uses (so every parameter gets a gradient);
        # gamma as its log: an optimizer step then changes it relatively, whatever its scale
        if kernel != "linear":
            self.log_gamma = nn.Parameter(torch.zeros((), dtype=dtype))
        if kernel in ("poly", "sigmoid"):
            self.coef0 = nn.Parameter(torch.zeros((), dtype=dtype))
        # Index tables (derived from n_support, not saved): which dual_coef entry each
        # (pair, support vector) uses, and which class each pair votes for.
        start = np.concatenate([[0], np.cumsum(self.n_support)])
        pairs = [(i, j) for i in range(c) for j in range(i + 1, c)]
        row = np.zeros((len(pairs), n_sv), dtype=np.int64)
        mask = np.zeros((len(pairs), n_sv), dtype=bool)
        for p, (i, j) in enumerate(pairs):
            row[p, start[i]:start[i + 1]] = j - 1
            row[p, start[j]:start[j + 1]] = i
            mask[p, start[i]:start[i + 1]] = True
            mask[p, start[j]:start[j + 1]] = True
        inc_i = np.zeros((len(pairs), c))
        inc_j = np.zeros((len(pairs), c))
        for p, (i, j) in enumerate(pairs):
            inc_i[p, i] = 1.0
            inc_j[p, j] = 1.0
        self.register_buffer("_coef_row", torch.from_numpy(row), persistent=False)
        self.register_buffer("_coef_col", torch.arange(n_sv).expand(len(pairs), n_sv).clone(), persistent=False)
        self.register_buffer("_coef_mask", torch.from_numpy(mask), persistent=False)
        self.register_buffer("_inc_i", torch.from_numpy(inc_i).to(dtype), persistent=False)
        self.register_buffer("_inc_j", torch.from_numpy(inc_j).to(dtype), persistent=False)

    @property
    def gamma(self) -> torch.Tensor:
        return torch.exp(self.log_gamma)

    def kernel_matrix(self, x) -> torch.Tensor:
        """(N, n_SV) kernel values (RBF: :func:`rbf_kernel`)."""
        x = _apply_pre(self.pre, self._input(x))
        sv = self.support_vectors
        if self.kernel == "rbf":
            return rbf_kernel(x, sv, self.gamma)
        dot = x @ sv.T
        if self.kernel == "linear":
            return dot
        if self.kernel == "poly":
            return (self.gamma * dot + self.coef0) ** self.degree
        return torch.tanh(self.gamma * dot + self.coef0)

    def pair_coefficients(self) -> torch.Tensor:
        """(pairs, n_SV) coefficient matrix of the one-vs-one decisions (zeros off the pair)."""
        coef = self.dual_coef[self._coef_row, self._coef_col]
        return torch.where(self._coef_mask, coef, torch.zeros_like(coef))

    def ovo_decision(self, x) -> torch.Tensor:
        """(N, pairs) one-vs-one decision values with libsvm's sign (> 0 → the first class)."""
        return self.kernel_matrix(x) @ self.pair_coefficients().T + self.intercept

    def _ovr(self, dec: torch.Tensor) -> torch.Tensor:
        # sklearn.utils.multiclass._ovr_decision_function(dec < 0, -dec, n_classes)
        first = (dec >= 0).to(dec.dtype)
        votes = first @ self._inc_i + (1 - first) @ self._inc_j
        conf = dec @ (self._inc_i - self._inc_j)
        return votes + conf / (3 * (torch.abs(conf) + 1))

    def decision_function(self, x) -> torch.Tensor:
        """scikit-learn's SVC.decision_function for the fitted decision_function_shape."""
        dec = self.ovo_decision(x)
        if self.n_classes == 2:
            return -dec[:, 0]
        if self.decision_function_shape == "ovr":
            return self._ovr(dec)
        return dec

    def forward(self, x) -> torch.Tensor:
        dec = self.ovo_decision(x)
        if self.n_classes == 2:
            d = -dec[:, :1]
            return torch.cat([torch.zeros_like(d), d], dim=1)
        return self._ovr(dec)

    def sklearn_outputs(self, x) -> torch.Tensor:
        """decision_function (binary (N,), else (N, C) ovr or (N, pairs) ovo)."""
        return self.decision_function(x)

    def predict_index(self, x) -> torch.Tensor:
        dec = self.ovo_decision(x)
        if self.break_ties and self.decision_function_shape == "ovr" and self.n_classes > 2:
            return torch.argmax(self._ovr(dec), dim=1)
        first = (dec > 0).to(dec.dtype)  # libsvm: dec > 0 → class i, else class j
        votes = first @ self._inc_i + (1 - first) @ self._inc_j
        return torch.argmax(votes, dim=1)  # first maximum = lowest class index, like libsvm

    def config(self) -> dict:
        return {"type": self.type_name, "n_features": self.n_features, "classes": self.classes,
                "n_support": self.n_support, "kernel": self.kernel, "degree": self.degree,
                "decision_function_shape": self.decision_function_shape,
                "break_ties": self.break_ties, "pre": _pre_config(self.pre)}


def _split(x: torch.Tensor, dims: Sequence[int]) -> list:
    return list(torch.split(x, list(dims), dim=1))


class VoteHead(HeadModule):
    """featstack's VoteClassifier: one head per backbone block, class probabilities averaged.

    Logits = log of the mean probability (log-mean-exp of the blocks' log-probabilities), so
    softmax(logits) = VoteClassifier.predict_proba and cross-entropy is the vote's NLL.
    """

    type_name = "vote"
    sklearn_method = "predict_proba"

    def __init__(self, blocks: Sequence[HeadModule], dims: Sequence[int], classes: Sequence):
        super().__init__(int(sum(dims)), classes)
        self.dims = [int(d) for d in dims]
        self.blocks = nn.ModuleList(blocks)
        for b, d in zip(self.blocks, self.dims):
            if b.n_features != d or b.n_classes != self.n_classes:
                raise ExportError("vote block shapes do not match dims/classes")
            if isinstance(b, SVCHead) and b.n_classes > 2 and b.decision_function_shape != "ovr":
                raise ExportError("an SVC with decision_function_shape='ovo' cannot take part in a vote")

    def forward(self, x) -> torch.Tensor:
        parts = _split(self._input(x), self.dims)
        logp = torch.stack([b.log_proba(p) for b, p in zip(self.blocks, parts)])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.blocks))

    def sklearn_outputs(self, x) -> torch.Tensor:
        """VoteClassifier.predict_proba: the mean of the blocks' probabilities."""
        parts = _split(self._input(x), self.dims)
        return torch.stack([b.proba(p) for b, p in zip(self.blocks, parts)]).mean(dim=0)

    def predict_index(self, x) -> torch.Tensor:
        return torch.argmax(self.sklearn_outputs(x), dim=1)

    def config(self) -> dict:
        return {"type": self.type_name, "dims": self.dims, "classes": self.classes,
                "blocks": [b.config() for b in self.blocks]}


class StackHead(HeadModule):
    """featstack's StackClassifier: base head per block → their stacking scores side by side
    (binary: one column per block) → the meta-learner."""

    type_name = "stack"

    def __init__(self, blocks: Sequence[HeadModule], final: HeadModule, dims: Sequence[int], classes: Sequence):
        super().__init__(int(sum(dims)), classes)
        self.dims = [int(d) for d in dims]
        self.blocks = nn.ModuleList(blocks)
        self.final = final
        self.sklearn_method = final.sklearn_method
        width = sum(1 if b.n_classes == 2 else b.scores(torch.zeros((0, b.n_features), dtype=b.dtype)).shape[1]
                    for b in self.blocks)
        if final.n_features != width or final.n_classes != self.n_classes:
            raise ExportError(f"stack: meta-learner takes {final.n_features} features, the blocks give {width}")

    def meta_features(self, x) -> torch.Tensor:
        """StackClassifier.transform: the blocks' scores side by side."""
        parts = _split(self._input(x), self.dims)
        return torch.cat([b.scores(p) for b, p in zip(self.blocks, parts)], dim=1)

    def forward(self, x) -> torch.Tensor:
        return self.final(self.meta_features(x))

    def sklearn_outputs(self, x) -> torch.Tensor:
        """The meta-learner's predict_proba (or decision_function) on the meta-features."""
        return self.final.sklearn_outputs(self.meta_features(x))

    def predict_index(self, x) -> torch.Tensor:
        return self.final.predict_index(self.meta_features(x))

    def proba(self, x) -> torch.Tensor:
        return self.final.proba(self.meta_features(x))

    def config(self) -> dict:
        return {"type": self.type_name, "dims": self.dims, "classes": self.classes,
                "blocks": [b.config() for b in self.blocks], "final": self.final.config()}


def head_from_config(cfg: dict, dtype: torch.dtype | str = torch.float64) -> HeadModule:
    """An exported head with zero-filled parameters of the shapes ``cfg`` describes (as written
    by ``config()``); load the tensors with ``load_state_dict``."""
    dtype = _resolve_dtype(dtype)
    kind = cfg.get("type")
    try:
        if kind == "linear":
            return LinearHead(cfg["n_features"], cfg["classes"], cfg["kind"], cfg["binary"], cfg.get("pre", ()),
                              dtype=dtype)
        if kind == "nystroem":
            return NystroemHead(cfg["n_features"], cfg["classes"], cfg["n_components"], cfg["binary"],
                                cfg.get("pre", ()), dtype=dtype)
        if kind == "gaussian-nb":
            return GaussianNBHead(cfg["n_features"], cfg["classes"], cfg.get("pre", ()), dtype=dtype)
        if kind == "svc":
            return SVCHead(cfg["n_features"], cfg["classes"], cfg["n_support"], cfg["kernel"], cfg["degree"],
                           cfg["decision_function_shape"], cfg["break_ties"], cfg.get("pre", ()), dtype=dtype)
        if kind == "vote":
            return VoteHead([head_from_config(b, dtype) for b in cfg["blocks"]], cfg["dims"], cfg["classes"])
        if kind == "stack":
            return StackHead([head_from_config(b, dtype) for b in cfg["blocks"]],
                             head_from_config(cfg["final"], dtype), cfg["dims"], cfg["classes"])
    except KeyError as e:
        raise ExportError(f"head config of type {kind!r} lacks field {e}") from None
    raise ExportError(f"unknown head type {kind!r} in the network config")
