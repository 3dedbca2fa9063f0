"""Export: a fitted scikit-learn head → a trainable torch module; FeatstackNet = preprocessing +
backbones + that head, saved as safetensors + JSON (never a pickle).

Converters made for inference (hummingbird, sklearn-onnx) freeze the numbers and reduce an SVC
to its labels. Here every exported number is an ``nn.Parameter`` (integer index tables aside),
so the network can be fine-tuned, and each module reproduces scikit-learn's own outputs on the
cached features: ≤ 1e-6 relative in float64 (measured ~1e-14), ≤ 1e-4 in float32 (measured
≤ 5e-5), and identical predictions (in float32, except rows within float32 rounding of a
decision boundary, e.g. a soft vote of saturated naive Bayes blocks tied at 0.5/0.5).

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

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .atomic import atomic_paths
from .errors import BackboneError, ConfigError, FeatstackError, read_format_json

NETWORK_FORMAT = "featstack-network"
NETWORK_FORMAT_VERSION = 1
NETWORK_JSON = "network.json"
NETWORK_TENSORS = "network.safetensors"
NETWORK_ONNX = "network.onnx"
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
        """(N, k) stacking meta-features: binary → one column (P(class 1) or the decision)."""
        out = self.sklearn_outputs(x)
        if out.ndim == 1:
            return out.reshape(-1, 1)
        if self.sklearn_method == "predict_proba" and self.n_classes == 2:
            return out[:, 1:]
        return out

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
        """(N, n_SV) kernel values; RBF distances from direct differences, as libsvm does (the
        ‖x‖² + ‖y‖² − 2xy expansion loses precision)."""
        x = _apply_pre(self.pre, self._input(x))
        sv = self.support_vectors
        if self.kernel == "rbf":
            d2 = torch.cdist(x, sv, p=2.0, compute_mode="donot_use_mm_for_euclid_dist") ** 2
            return torch.exp(-self.gamma * d2)
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


# ============================================================================================
# scikit-learn → modules
# ============================================================================================

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

    if not hasattr(clf, "classes_"):
        raise ExportError(f"{type(clf).__name__} is not fitted: train it before exporting")
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
                      "SVC, GaussianNB, MultinomialNB, ComplementNB, and featstack's vote/stack fusions)")


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


def export_head(estimator, dims: Sequence[int] | None = None, dtype: torch.dtype | str = torch.float64) -> HeadModule:
    """A fitted head or fusion → a trainable torch module reproducing it on cached features.

    ``estimator``: a Pipeline (scalers → LogisticRegression / LinearSVC / SVC / GaussianNB /
    MultinomialNB / ComplementNB), one of those bare, a GridSearchCV around any of them, or a
    featstack VoteClassifier / StackClassifier. ``dims`` (block widths of the feature columns)
    is checked against the fusion's own; plain heads take all columns. ``dtype`` float64 gives
    scikit-learn's numbers to ~1e-12; float32 to ~1e-6.
    """
    from sklearn.pipeline import Pipeline
    from .fusion import StackClassifier, VoteClassifier

    dtype = _resolve_dtype(dtype)
    est = _unwrap(estimator)
    n_in = getattr(est, "n_features_in_", None)
    if isinstance(est, (VoteClassifier, StackClassifier)):
        if not hasattr(est, "estimators_"):
            raise ExportError(f"{type(est).__name__} is not fitted: train it before exporting")
        bdims = _block_dims(est, dims, n_in)
        blocks = [export_head(b, [d], dtype) for b, d in zip(est.estimators_, bdims)]
        if isinstance(est, VoteClassifier):
            return VoteHead(blocks, bdims, est.classes_)
        width = sum(b.scores(torch.zeros((0, d), dtype=dtype)).shape[1] for b, d in zip(blocks, bdims))
        final = export_head(est.final_estimator_, [width], dtype)
        return StackHead(blocks, final, bdims, est.classes_)
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
    if dims is not None and sum(int(d) for d in dims) != n_features:
        raise ExportError(f"dims {tuple(int(d) for d in dims)} sum to {sum(int(d) for d in dims)}, "
                          f"the head takes {n_features} features")
    return _export_classifier(clf, scalers, int(n_features), dtype)


# ============================================================================================
# FeatstackNet
# ============================================================================================

def decode_to_square(images: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 3, H, W) images → (N, 3, side, side) float in [0, 255], as extraction decodes them.

    uint8 input is taken as pixels; floating input as [0, 1] (torchvision's convention) and
    scaled by 255. The centre square (same offsets as :func:`featstack.preprocess.center_square`)
    is resized antialiased bicubic and rounded to whole pixel values, as the uint8 squares of
    extraction are; images already ``side`` x ``side`` pass through untouched, so feeding the
    squares extraction decodes reproduces the cached features exactly.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"images must be (N, 3, H, W); got {tuple(images.shape)}")
    is_uint8 = images.dtype == torch.uint8
    if not is_uint8 and not images.is_floating_point():
        raise ConfigError(f"images must be uint8 or floating point; got {images.dtype}")
    h, w = images.shape[-2:]
    if (h, w) == (side, side):
        return images.float() if is_uint8 else images.float() * 255.0
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    sq = images[..., top:top + s, left:left + s]
    if is_uint8 and sq.device.type == "cpu":
        # torchvision's uint8 antialiased bicubic follows Pillow's (what extraction uses) closely
        import torchvision.transforms.v2.functional as TF
        out = TF.resize(sq.contiguous(), [side, side], interpolation=TF.InterpolationMode.BICUBIC,
                        antialias=True)
        return out.float()
    x = sq.float() if is_uint8 else sq.float() * 255.0
    x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0.0, 255.0).round()


def decode_squares(source, rows: Sequence[int], side: int) -> torch.Tensor:
    """(N, 3, side, side) uint8 squares of ``rows`` of a data source, decoded exactly as
    extraction decodes them (image files straight to their square; arrays via centre_square)."""
    from .data import FileSource
    from .preprocess import center_square

    try:
        from .preprocess import decode_square
    except ImportError:  # pragma: no cover - older preprocess without the file fast path
        decode_square = None
    out = []
    for r in rows:
        r = int(r)
        if isinstance(source, FileSource) and decode_square is not None:
            sq = decode_square(source.paths[r], side)
        else:
            sq = center_square(source.load(r), side)
        out.append(torch.from_numpy(np.ascontiguousarray(sq.transpose(2, 0, 1))))
    if not out:
        return torch.zeros((0, 3, side, side), dtype=torch.uint8)
    return torch.stack(out)


class _Preprocess:
    """One backbone's extraction preprocessing (featstack.preprocess.DevicePreprocessor), built
    per device on first use: it holds its mean/std on that device."""

    def __init__(self, data_config: dict):
        self.data_config = data_config
        self._by_device: dict = {}

    def __call__(self, squares: torch.Tensor) -> torch.Tensor:
        from .preprocess import DevicePreprocessor

        key = str(squares.device)
        prep = self._by_device.get(key)
        if prep is None:
            prep = self._by_device[key] = DevicePreprocessor(self.data_config, squares.device)
        return prep(squares)


class FeatstackNet(nn.Module):
    """Images → logits: per-backbone preprocessing (as in extraction) + the backbones + the
    exported head.

    ``forward(images)`` takes (N, 3, H, W) uint8 pixels or floats in [0, 1]; images are
    centre-squared to ``input_side`` (the decode resolution of extraction), then each backbone
    crops/resizes/normalises per its data config. Predictions (:meth:`predict`) follow the
    scikit-learn head's rule; ``classes`` names the output columns.
    """

    def __init__(self, backbones: Sequence[nn.Module], backbone_info: Sequence[dict], head: HeadModule,
                 classes: Sequence[str], meta: dict | None = None):
        super().__init__()
        from .preprocess import decode_resolution

        if len(backbones) != len(backbone_info) or not backbones:
            raise ExportError("one info entry per backbone needed")
        self.backbones = nn.ModuleList(backbones)
        self.backbone_info = [dict(b) for b in backbone_info]
        self.dims = [int(b["dim"]) for b in self.backbone_info]
        self.keys = [str(b["key"]) for b in self.backbone_info]
        if head.n_features != sum(self.dims):
            raise ExportError(f"the head takes {head.n_features} features, the backbones give "
                              f"{sum(self.dims)} ({', '.join(f'{k}: {d}' for k, d in zip(self.keys, self.dims))})")
        self.head = head
        self.classes = [str(c) for c in classes]
        if len(self.classes) != head.n_classes:
            raise ExportError(f"{len(self.classes)} class names for a head with {head.n_classes} outputs")
        self.input_side = int(decode_resolution([b["data_config"] for b in self.backbone_info]))
        self._prep = [_Preprocess(b["data_config"]) for b in self.backbone_info]
        self.meta = dict(meta or {})
        #: further JSON sections carried through save/load (e.g. "finetune")
        self.extra: dict = {}

    def squares(self, images: torch.Tensor) -> torch.Tensor:
        """Images → float (N, 3, R, R) pixel squares on the network's device."""
        p = next(self.backbones.parameters(), None)
        if p is not None and images.device != p.device:
            images = images.to(p.device, non_blocking=True)
        return decode_to_square(images, self.input_side)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, Σ dims) backbone embeddings, blocks in backbone order (what the cache holds)."""
        sq = self.squares(images)
        feats = [model(prep(sq)) for model, prep in zip(self.backbones, self._prep)]
        return torch.cat([f.float() for f in feats], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class indices (into :attr:`classes`) by the scikit-learn head's own rule."""
        return self.head.predict_index(self.features(images))

    def predict_names(self, images: torch.Tensor) -> list:
        return [self.classes[i] for i in self.predict(images).tolist()]

    def sklearn_outputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the saved scikit-learn model's predict_proba / decision_function would return."""
        return self.head.sklearn_outputs(self.features(images))

    def config(self) -> dict:
        """JSON-able description from which :func:`load_network` rebuilds the module."""
        return {
            "format": NETWORK_FORMAT,
            "format_version": NETWORK_FORMAT_VERSION,
            "featstack_version": __version__,
            "torch_version": torch.__version__,
            "timm_version": _timm_version(),
            "classes": self.classes,
            "dims": self.dims,
            "input_side": self.input_side,
            "backbones": self.backbone_info,
            "head_dtype": _dtype_name(self.head.dtype),
            "head": self.head.config(),
            "meta": self.meta,
        }


def _timm_version() -> str:
    import timm
    return timm.__version__


# --------------------------------------------------------------------------------------------
# Building, saving and loading networks
# --------------------------------------------------------------------------------------------

_INFO_FIELDS = ("key", "timm_name", "weights_source", "weights_sha256", "data_config", "preprocess",
                "dtype", "dim", "fingerprint", "spec")


def _spec_from_info(info: dict):
    from .backbones import BackboneSpec

    spec = info.get("spec")
    if not isinstance(spec, dict) or "timm_name" not in spec:
        raise BackboneError(
            f"backbone {info.get('key')!r}: the cache records no timm model spec (features imported "
            f"from arrays, weights {info.get('weights_source')!r}); a network cannot be rebuilt from it")
    return BackboneSpec.from_dict(spec)


def rebuild_backbone(info: dict, device: str | torch.device = "cpu") -> nn.Module:
    """The backbone with the weights the cache fingerprint names, VERIFIED: its state-dict
    sha256 must equal the cached ``weights_sha256`` (seeded random init is re-created with the
    same seed; a weights file or the hub is loaded), else a BackboneError names the backbone."""
    from .backbones import build_backbone

    spec = _spec_from_info(info)
    try:
        lb = build_backbone(spec, device)
    except FeatstackError:
        raise
    except Exception as e:  # noqa: BLE001 - timm/torch errors come in many types
        raise BackboneError(f"backbone {info.get('key')!r}: cannot rebuild {spec.timm_name!r} "
                            f"({type(e).__name__}: {str(e)[:200]})") from e
    want = info.get("weights_sha256")
    if lb.weights_sha256 != want:
        raise BackboneError(
            f"backbone {info.get('key')!r}: rebuilt weights (source {spec.weights_source}) have sha256 "
            f"{lb.weights_sha256[:12]}, the cache's features were computed with {str(want)[:12]}; "
            "the weights file or hub checkpoint changed since extraction (re-extract, or restore it)")
    if info.get("dim") is not None and int(info["dim"]) != lb.dim:
        raise BackboneError(f"backbone {info.get('key')!r}: rebuilt model gives {lb.dim} features, the cache {info['dim']}")
    return lb.model


def build_network(saved, cache, *, head_dtype: torch.dtype | str = torch.float64,
                  device: str | torch.device = "cpu") -> FeatstackNet:
    """A FeatstackNet from a saved model (featstack.models.SavedModel) and the cache it was
    trained on (where the backbones' timm specs, weights hashes and data configs live)."""
    from .cache import Cache, open_cache

    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if hasattr(saved, "check_cache"):
        saved.check_cache(cache)
    infos = []
    for key in saved.backbones:
        info = cache.backbone_info(key)
        infos.append({k: info.get(k) for k in _INFO_FIELDS})
        if info.get("preprocess") not in (None, "fast"):
            warnings.warn(f"backbone {key!r} was extracted with --preprocess {info.get('preprocess')}; "
                          "the network preprocesses with the fast path, so its features differ slightly "
                          "from the cached ones", stacklevel=2)
    head = export_head(saved.estimator, saved.dims, head_dtype)
    models = [rebuild_backbone(info) for info in infos]
    for info, m in zip(infos, models):
        info["source_weights_sha256"] = info["weights_sha256"]
    meta = {
        "model_path": str(getattr(saved, "path", "") or ""),
        "head": saved.head,
        "fusion": saved.fusion,
        "model_fingerprints": dict(saved.fingerprints),
        "cache_path": str(cache.path),
        "cache_fingerprint": cache.dataset_fingerprint,
        "sklearn_version": (saved.meta or {}).get("sklearn_version"),
        "train_accuracy": (saved.meta or {}).get("train_accuracy"),
        "test_accuracy": (saved.meta or {}).get("test_accuracy"),
    }
    # names of the estimator's output columns (a class without training rows has none)
    classes = list(getattr(saved, "output_classes", None) or saved.classes)
    net = FeatstackNet(models, infos, head, classes, meta=meta)
    return net.to(device)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_network(net: FeatstackNet, out_dir: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``out_dir/network.safetensors`` (every tensor: backbones and head) and
    ``out_dir/network.json`` (the config that rebuilds the module). No pickle anywhere. Both
    files are written to temporary names and renamed; the JSON records the tensors' sha256."""
    from safetensors.torch import save_file
    from .backbones import state_dict_sha256

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; a network is saved as a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / NETWORK_JSON).exists():
        raise ConfigError(f"{out}: folder is not empty and holds no {NETWORK_JSON}; pick a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    seen: set = set()
    for k, v in list(state.items()):  # safetensors refuses shared storage: copy the duplicates
        ptr = v.untyped_storage().data_ptr()
        if v.numel() and ptr in seen:
            state[k] = v.clone()
        seen.add(ptr)
    cfg = net.config()
    for info, model in zip(cfg["backbones"], net.backbones):
        info["weights_sha256"] = state_dict_sha256(model)
    cfg.update(getattr(net, "extra", {}) or {})
    cfg.update(extra or {})
    with atomic_paths(out / NETWORK_TENSORS, out / NETWORK_JSON) as (tmp_t, tmp_j):
        save_file(state, str(tmp_t), metadata={"format": NETWORK_FORMAT})
        cfg["tensors_sha256"] = _sha256_file(tmp_t)
        tmp_j.write_text(json.dumps(cfg, indent=1, default=str) + "\n")
    net.meta = dict(cfg.get("meta", net.meta))
    return out


def read_network_config(path: str | os.PathLike) -> tuple[Path, dict]:
    """(folder, parsed network.json) of a network folder, with the format checked."""
    path = Path(path)
    if path.is_file() and path.name in (NETWORK_JSON, NETWORK_TENSORS):
        path = path.parent
    jfile = path / NETWORK_JSON
    if not path.is_dir():
        raise ExportError(f"{path}: no such network folder")
    cfg = read_format_json(jfile, fmt=NETWORK_FORMAT, version=NETWORK_FORMAT_VERSION,
                           required=("backbones", "head", "classes", "head_dtype"), error=ExportError,
                           what="network", hint="; make one with `featstack export`")
    return path, cfg


def _create_backbone(info: dict) -> nn.Module:
    """The model of a backbone with seeded random weights (its tensors are loaded next)."""
    from dataclasses import replace

    from .backbones import build_backbone

    spec = replace(_spec_from_info(info), weights="none", weights_file=None)
    try:
        return build_backbone(spec, hash_weights=False).model
    except FeatstackError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BackboneError(f"backbone {info.get('key')!r}: cannot create model {spec.timm_name!r} "
                            f"({type(e).__name__}: {str(e)[:200]})") from e


def load_network(path: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True) -> FeatstackNet:
    """Rebuild a FeatstackNet from a network folder (network.json + network.safetensors).

    The backbones are created by timm (pretrained=False, num_classes=0), the head from its
    config, then every tensor is loaded strictly from the safetensors file. With ``verify`` the
    file's sha256 and each backbone's weights hash are checked against the JSON.
    """
    from safetensors.torch import load_file
    from .backbones import state_dict_sha256

    folder, cfg = read_network_config(path)
    tfile = folder / NETWORK_TENSORS
    if not tfile.exists():
        raise ExportError(f"{folder}: network folder lacks {NETWORK_TENSORS}")
    if verify and cfg.get("tensors_sha256") and _sha256_file(tfile) != cfg["tensors_sha256"]:
        raise ExportError(f"{tfile}: sha256 differs from the one {NETWORK_JSON} records; the two files "
                          "come from different saves")
    models = [_create_backbone(info) for info in cfg["backbones"]]
    head = head_from_config(cfg["head"], cfg["head_dtype"])
    net = FeatstackNet(models, cfg["backbones"], head, cfg["classes"], meta=cfg.get("meta"))
    try:
        state = load_file(str(tfile))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{tfile}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{tfile} does not fit the network {NETWORK_JSON} describes: {str(e)[:400]}") from e
    if verify:
        for info, model in zip(cfg["backbones"], net.backbones):
            got = state_dict_sha256(model)
            if info.get("weights_sha256") and got != info["weights_sha256"]:
                raise ExportError(f"{folder}: backbone {info.get('key')!r} weights hash {got[:12]} differs "
                                  f"from {NETWORK_JSON} ({str(info['weights_sha256'])[:12]})")
    standard = set(net.config()) | {"tensors_sha256"}
    net.extra = {k: v for k, v in cfg.items() if k not in standard}
    return net.to(device).eval()


def export_onnx(net: FeatstackNet, path: str | os.PathLike, *, batch: int = 2) -> Path:
    """Write the network as ONNX (uint8 images of side ``input_side`` in, logits out, dynamic
    batch) with torch's dynamo exporter. Needs the optional ``onnx`` and ``onnxscript`` packages
    (``pip install 'featstack[onnx]'``); the antialiased resize of the preprocessing has no
    mapping in the older TorchScript exporter."""
    missing = []
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ConfigError(f"--onnx needs the {' and '.join(missing)} package(s): pip install 'featstack[onnx]'")
    path = Path(path)
    example = torch.zeros((batch, 3, net.input_side, net.input_side), dtype=torch.uint8)
    net = net.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net, (example,), dynamo=True, input_names=["images"],
                                        output_names=["logits"],
                                        dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
            program.save(str(path))
    except Exception as e:  # noqa: BLE001 - exporter errors come in many types
        raise ExportError(f"ONNX export failed ({type(e).__name__}: {str(e)[:300]}); the safetensors "
                          "network is unaffected") from e
    return path


def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, cache: str | os.PathLike | None = None,
                 *, head_dtype: torch.dtype | str = "float64", onnx: bool = False) -> Path:
    """Saved model folder → network folder (safetensors + JSON; with ``onnx`` also network.onnx).

    The backbones' timm specs and weights hashes come from the cache the model was trained on:
    ``cache`` if given, else the ``cache_path`` the model records.
    """
    from .models import load_model

    saved = load_model(model_dir)
    cache_path = cache or saved.meta.get("cache_path")
    if not cache_path:
        raise ConfigError(f"{model_dir}: the model records no cache path; pass --cache PATH (the cache it "
                          "was trained on, which holds the backbones' specs and weights hashes)")
    if not Path(cache_path).exists():
        raise ConfigError(f"cache {cache_path} (recorded by {model_dir}) not found; pass --cache PATH")
    net = build_network(saved, cache_path, head_dtype=head_dtype)
    out = save_network(net, out_dir)
    if onnx:
        export_onnx(net, out / NETWORK_ONNX)
    return out
