"""Faster solvers for the built-in heads, as drop-in scikit-learn estimators.

Embeddings are dense and wide (512-2,048 columns, thousands of rows). liblinear, behind
scikit-learn's ``LinearSVC``, copies them into a sparse row format and updates one coordinate
at a time: on a 1,000 x 2,048 fold with 20 classes it took 70x LogisticRegression's time (and
minutes at C=0.01). :class:`LbfgsLinearSVC` minimises exactly liblinear's primal objective
(squared hinge, L2, one-vs-rest, the intercept regularised as a constant feature of value
``intercept_scaling``) with L-BFGS on dense matrix products, all classes at once, with C relative to the rows' norms (see the class). It *is* a
``LinearSVC`` (same parameters, same fitted attributes, same ``decision_function``/``predict``),
so everything that handles a LinearSVC — export, stacking — handles it unchanged.

:class:`RbfSVC` is the svm-rbf head's classifier: libsvm's exact ``SVC`` below
``exact_below`` training rows, above it a Nystroem map of the same RBF kernel followed by an
:class:`LbfgsLinearSVC` (exact SVC time grows as rows^1.7: 32 s per 8,000-row fold at 1,024
columns, where the map and linear fit take 2 s at the same accuracy).

CPU side: no torch here.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.kernel_approximation import Nystroem
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class LbfgsLinearSVC(LinearSVC):
    """``LinearSVC`` (squared hinge, L2, ovr) solved by L-BFGS over dense BLAS products.

    Same objective per class k, with targets t = +1 for class k and -1 otherwise and
    ``s = intercept_scaling``::

        0.5 * (|w_k|^2 + b_k^2 / s^2) + C * sum_i max(0, 1 - t_i (w_k . x_i + b_k))^2

    (liblinear appends s to every row and regularises its weight v = b / s). ``scale_C``
    (default) divides ``C`` by the mean squared row norm of the training rows (SVMlight's
    default C is the inverse of that mean), so one C suits 128- and 2,048-wide features; the
    value used is ``C_effective_``. ``tol`` bounds the gradient of the objective divided by
    ``C_effective_ * n_samples`` (LogisticRegression's convention: mean loss plus penalty);
    ``max_iter`` bounds L-BFGS iterations. Measured on 20-class 2,048-wide synthetic embeddings
    (4,000 training rows, one thread): relative C=1 with tol 1e-3 fits in about
    LogisticRegression's time with a higher held-out accuracy, where liblinear's absolute C=1
    took 10-70x longer and scored 0.1 lower (``benchmarks/bench_heads.py``).
    """

    def __init__(self, *, C: float = 1.0, scale_C: bool = True, tol: float = 1e-3, fit_intercept: bool = True,
                 intercept_scaling: float = 1.0, max_iter: int = 1000, random_state=None):
        super().__init__(C=C, tol=tol, fit_intercept=fit_intercept, intercept_scaling=intercept_scaling,
                         max_iter=max_iter, random_state=random_state)
        self.scale_C = scale_C

    def fit(self, X, y, sample_weight=None):
        if sample_weight is not None:
            raise ValueError("LbfgsLinearSVC does not support sample_weight")
        if self.C <= 0:
            raise ValueError(f"C must be positive, got {self.C}")
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32), order="C", accept_sparse=False)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("This solver needs samples of at least 2 classes in the data, but the data "
                             f"contains only one class: {self.classes_[0]!r}")
        k = 1 if len(self.classes_) == 2 else len(self.classes_)
        T = np.where(y[:, None] == self.classes_[None, -k:], 1.0, -1.0).astype(X.dtype)  # (n, k)
        sq = float(np.einsum("ij,ij->", X, X, dtype=np.float64)) / len(X) if self.scale_C else 1.0
        self.C_effective_ = float(self.C) / max(sq, np.finfo(float).tiny)
        W, b, n_iter = _solve(X, T, self.C_effective_, float(self.intercept_scaling) if self.fit_intercept else 0.0,
                              float(self.tol), int(self.max_iter))
        self.coef_ = W.T.astype(np.float64)
        self.intercept_ = b.astype(np.float64) if self.fit_intercept else np.zeros(k)
        self.n_iter_ = n_iter
        return self


def _solve(X: np.ndarray, T: np.ndarray, C: float, s: float, tol: float, max_iter: int):
    """Minimise the per-class objectives (summed: they are independent) for W (d, k), b (k,).

    Works in float32 when the features are float32 (the products dominate; the optimiser's
    state stays float64)."""
    n, d = X.shape
    k = T.shape[1]
    dt = X.dtype
    with_b = s > 0

    def unpack(theta):
        W = theta[: d * k].reshape(d, k)
        v = theta[d * k:] if with_b else np.zeros(k)
        return W, v

    def fg(theta):
        W, v = unpack(theta)
        Z = X @ W.astype(dt, copy=False)  # (n, k)
        if with_b:
            Z += (s * v).astype(dt)
        margin = 1.0 - T * Z
        active = np.maximum(margin, 0.0)
        f = 0.5 * (theta @ theta) + C * float(np.square(active, dtype=np.float64).sum())
        G = (-2.0 * C) * (T * active)  # dLoss/dZ
        gW = (X.T @ G).astype(np.float64) + W
        grad = [gW.ravel()]
        if with_b:
            grad.append(s * G.sum(0, dtype=np.float64) + v)
        return f, np.concatenate(grad)

    scale = 1.0 / (C * n)  # the mean loss + penalty / (C n): LogisticRegression's convention for tol

    def fg_mean(theta):
        f, g = fg(theta)
        return f * scale, g * scale

    theta0 = np.zeros(d * k + (k if with_b else 0))
    res = minimize(fg_mean, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps, "maxcor": 20})
    W, v = unpack(res.x)
    return W, s * v, int(res.nit)


RBF_EXACT_BELOW = 2_000
"""Training rows from which svm-rbf switches from exact SVC to Nystroem + linear SVM."""
RBF_COMPONENTS = 500
"""Nystroem landmarks (kernel columns) of the approximate svm-rbf."""


class RbfSVC(ClassifierMixin, BaseEstimator):
    """RBF-kernel SVM that finishes at real sizes: exact ``SVC`` on fewer than ``exact_below``
    training rows, else ``Nystroem(rbf, gamma, n_components)`` + :class:`LbfgsLinearSVC`.

    ``gamma="scale"`` is SVC's ``1 / (n_features * X.var())`` of the training rows on both
    paths, so the approximation maps the same kernel. ``C`` is SVC's C on the exact path; on the
    approximate path LbfgsLinearSVC's C relative to the mapped rows' mean squared norm (a
    Nystroem row's squared norm approximates k(x, x) = 1, so it is close to absolute). Both
    paths expose only ``decision_function`` (one-vs-rest shaped; binary: one column) and
    ``predict``, so fusions stack and vote them alike. The fitted path is ``map_`` (None when
    exact) then ``classifier_`` (an SVC or an LbfgsLinearSVC). Measured on 20-class synthetic
    embeddings (``benchmarks/bench_heads.py``'s), one thread, one fold of 8,000 x 1,024 training
    rows: exact SVC 31.8 s at 0.704 held-out accuracy; Nystroem + linear SVM 1.9 s at 0.710
    with 500 landmarks, 5.1 s at 0.709 with 1,000, 12.5 s at 0.709 with 2,000 (so 500).
    """

    def __init__(self, *, C: float = 1.0, gamma="scale", exact_below: int = RBF_EXACT_BELOW,
                 n_components: int = RBF_COMPONENTS, tol: float = 1e-3, max_iter: int = 1000, random_state=None):
        self.C = C
        self.gamma = gamma
        self.exact_below = exact_below
        self.n_components = n_components
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32), order="C")
        check_classification_targets(y)
        if len(X) < self.exact_below:
            self.map_ = None
            self.classifier_ = SVC(C=self.C, kernel="rbf", gamma=self.gamma, random_state=self.random_state)
            self.classifier_.fit(X, y)
            self.gamma_ = float(self.classifier_._gamma)
        else:
            self.gamma_ = _rbf_gamma(self.gamma, X)
            self.map_ = Nystroem(kernel="rbf", gamma=self.gamma_, n_components=min(int(self.n_components), len(X)),
                                 random_state=self.random_state)
            self.classifier_ = LbfgsLinearSVC(C=self.C, tol=self.tol, max_iter=self.max_iter,
                                              random_state=self.random_state)
            self.classifier_.fit(self.map_.fit_transform(X), y)
        self.classes_ = self.classifier_.classes_
        self.n_iter_ = self.classifier_.n_iter_
        return self

    def _mapped(self, X):
        check_is_fitted(self, "classifier_")
        X = validate_data(self, X, dtype=(np.float64, np.float32), order="C", reset=False)
        return X if self.map_ is None else self.map_.transform(X)

    def decision_function(self, X) -> np.ndarray:
        Z = self._mapped(X)
        return self.classifier_.decision_function(Z)

    def predict(self, X) -> np.ndarray:
        Z = self._mapped(X)
        return self.classifier_.predict(Z)


def _rbf_gamma(gamma, X: np.ndarray) -> float:
    """SVC's gamma: "scale" = 1 / (n_features * X.var()) (1 when X is constant), "auto" =
    1 / n_features, else the number."""
    if gamma == "scale":
        var = float(X.var(dtype=np.float64))
        return 1.0 / (X.shape[1] * var) if var != 0 else 1.0
    if gamma == "auto":
        return 1.0 / X.shape[1]
    if float(gamma) <= 0:
        raise ValueError(f"gamma must be positive, 'scale' or 'auto', got {gamma!r}")
    return float(gamma)
