"""Many small ``LogisticRegression`` fits at once: a stack's meta-learners.

A stack grid fits one meta-learner per (subset, head, fold): hundreds of problems of a few
hundred to a few thousand rows and ``|subset| x n_classes`` columns. Each is
scikit-learn's ``LogisticRegression(solver="lbfgs")``, whose L-BFGS-B run costs ~25 function
evaluations of a few tens of microseconds of arithmetic each; through ``est.fit`` a problem
also pays input validation and, per evaluation, scipy's and scikit-learn's dispatch: 2-3x the
arithmetic (measured on the 165 meta-learners of ``benchmarks/bench_grid.py --backbones 4
--dim 128 --train 1000 --classes 10``).

:func:`fit_logistic_regressions` runs the same minimisation — scikit-learn's objective,
starting point and options, scipy's own L-BFGS-B routine (``setulb``) for every step — for
many problems side by side: each problem keeps its own optimiser state, and all problems that
ask for a function value in the same round get it from one batched evaluation. The iterates
are scikit-learn's up to floating-point rounding (the loss is summed in another order), so the
fitted models predict the same (``tests/test_logistic.py`` compares coefficients and
predictions; ``benchmarks/bench_grid.py`` compares every bench score with scikit-learn's
``StackingClassifier`` bit for bit).

Only what is exactly scikit-learn's problem takes this path: the default solver and L2
penalty, an intercept, no class or sample weights, no warm start, finite float features, at
least two classes. Anything else goes to ``est.fit``, as do all problems when scipy's routine
does not have the interface this module was written against.

CPU side: no torch here.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

MAXLS = 50
"""Line-search steps per iteration: scikit-learn passes 50 (scipy's default is 20)."""
MAXCOR = 10
"""Correction pairs kept by L-BFGS-B: scipy's default, which scikit-learn keeps."""
MAXFUN = 15000
"""Function evaluations before L-BFGS-B stops: scipy's default, which scikit-learn keeps."""
FACTR = 64.0
"""scipy's ``factr`` for scikit-learn's ``ftol=64 * eps`` (scipy divides ftol by eps)."""
MAX_BATCH = 32
"""Problems solved side by side at most (a bench fold's stacks: one per backbone subset)."""
MAX_BATCH_BYTES = 256 << 20
"""Memory of a batch's softmax arrays at most (large problems are solved fewer at a time)."""


def fit_logistic_regression(est: LogisticRegression, X, y) -> LogisticRegression:
    """``est.fit(X.astype(float64), y)``, by the same minimisation with less overhead (see the
    module)."""
    return fit_logistic_regressions([(est, X, y)])[0]


def fit_logistic_regressions(problems: Sequence[tuple[LogisticRegression, object, object]],
                             on_fit: Callable[[int], None] | None = None) -> list[LogisticRegression]:
    """Fit each ``(est, X, y)`` as ``est.fit(X.astype(float64), y)`` would; return the fitted
    estimators (the first exception a problem raised, after all are done).

    Problems with the same number of rows and classes are solved side by side.
    ``on_fit(i)`` is called as problem ``i`` finishes."""
    out = fit_logistic_regressions_safe(problems, on_fit)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


def fit_logistic_regressions_safe(problems: Sequence[tuple[LogisticRegression, object, object]],
                                  on_fit: Callable[[int], None] | None = None) -> list:
    """As :func:`fit_logistic_regressions`, but a problem that fails gives its exception in
    its place of the result list instead of stopping the others (a bench cell fails alone)."""
    out: list = [None] * len(problems)
    groups: dict[tuple, list[int]] = {}
    prepared = {}
    for i, (est, X, y) in enumerate(problems):
        prep = _prepare(est, X, y) if _SETULB is not None else None
        if prep is None:
            out[i] = _plain_fit(est, X, y)
            if on_fit is not None:
                on_fit(i)
            continue
        prepared[i] = prep
        groups.setdefault((prep.n, prep.k), []).append(i)
    for (n, k), group in groups.items():
        for ids in _chunks(group, n * k):
            _solve_batch(problems, prepared, ids, k, on_fit, out)
    return out


def _chunks(ids: list[int], cells: int) -> list[list[int]]:
    """Side-by-side batches of at most :data:`MAX_BATCH` problems and :data:`MAX_BATCH_BYTES`
    of softmax arrays (two float64 arrays of ``cells`` = rows x classes per problem)."""
    size = max(1, min(MAX_BATCH, MAX_BATCH_BYTES // (16 * cells)))
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _solve_batch(problems, prepared: dict, ids: list[int], k: int, on_fit, out: list) -> None:
    batch = [prepared[i] for i in ids]
    evaluate = _multinomial_batch(batch) if k > 2 else _binomial_batch(batch)
    on_done = None if on_fit is None else (lambda j: on_fit(ids[j]))
    for j, res in enumerate(_lbfgsb_lockstep([p.theta0 for p in batch], evaluate, batch, on_done=on_done)):
        out[ids[j]] = _finish(problems[ids[j]][0], batch[j], res)


def _plain_fit(est, X, y):
    if isinstance(X, np.ndarray) and X.dtype.kind == "f":
        X = X.astype(np.float64, copy=False)  # float64 whichever path a problem takes
    try:
        return est.fit(X, y)
    except Exception as exc:  # noqa: BLE001 - handed back in the problem's place
        return exc


# --------------------------------------------------------------------------------------------
# Which problems, and their data
# --------------------------------------------------------------------------------------------

class _Problem:
    """One problem's data in the layout its loss wants, and its optimiser settings."""

    def __init__(self, X: np.ndarray, classes: np.ndarray, codes: np.ndarray, C: float, tol: float,
                 max_iter: int):
        self.n, self.p = X.shape
        self.X1 = np.hstack([X, np.ones((self.n, 1))])  # a column of ones: the intercept inside the products
        self.X1T = np.ascontiguousarray(self.X1.T)
        self.classes = classes
        self.k = len(classes)
        self.codes = codes
        self.l2 = 1.0 / (C * self.n)  # scikit-learn: mean loss + |W|^2 / (2 C n)
        self.tol, self.max_iter = tol, max_iter
        width = (self.p + 1) * (self.k if self.k > 2 else 1)
        self.theta0 = np.zeros(width)


def _prepare(est, X, y) -> _Problem | None:
    """The problem in this module's form, or None when ``est.fit`` must do it."""
    if type(est) is not LogisticRegression:
        return None
    params = est.get_params()
    penalty_ok = params.get("penalty", "l2") in ("l2", "deprecated") and params.get("l1_ratio") in (None, 0, 0.0)
    if (params["solver"] != "lbfgs" or not penalty_ok or params["class_weight"] is not None
            or params["warm_start"] or not params["fit_intercept"] or params.get("verbose")
            or params.get("multi_class", "auto") not in ("auto", "deprecated")):
        return None
    try:
        C, tol, max_iter = float(params["C"]), float(params["tol"]), int(params["max_iter"])
    except (TypeError, ValueError):
        return None
    if not (C > 0 and tol >= 0 and max_iter >= 1):
        return None
    if not isinstance(X, np.ndarray) or X.ndim != 2 or X.dtype.kind != "f" or 0 in X.shape:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X) or y.dtype.kind not in "iub" or not np.isfinite(X).all():
        return None
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        return None
    return _Problem(np.ascontiguousarray(X, dtype=np.float64), classes, codes.ravel(), C, tol, max_iter)


def _finish(est: LogisticRegression, prob: _Problem, res: tuple) -> LogisticRegression:
    """Set the fitted attributes ``est.fit`` would set, from the solution."""
    theta, nit, status = res
    if status != 0:
        warnings.warn(f"lbfgs failed to converge after {nit} iteration(s) (status={status}): increase "
                      f"max_iter (max_iter={prob.max_iter}) or scale the data", ConvergenceWarning, stacklevel=3)
    p = prob.p
    if prob.k == 2:
        est.coef_, est.intercept_ = theta[None, :p].copy(), theta[p:].copy()
    else:
        W = theta.reshape(p + 1, prob.k).T  # scikit-learn ravels (k, p+1) in Fortran order
        est.coef_, est.intercept_ = np.ascontiguousarray(W[:, :p]), W[:, p].copy()
    est.classes_ = prob.classes
    est.n_iter_ = np.asarray([nit], dtype=np.int32)
    est.n_features_in_ = p
    if hasattr(est, "feature_names_in_"):
        del est.feature_names_in_
    return est


# --------------------------------------------------------------------------------------------
# The losses, batched: scikit-learn's HalfMultinomialLoss / HalfBinomialLoss objectives
# --------------------------------------------------------------------------------------------

def _multinomial_batch(batch: list[_Problem]):
    """Objective and gradient of several multinomial problems with the same rows count ``n``
    and classes ``k``: one (B, k, n) array for the softmax, classes along rows so the
    reductions run over contiguous memory; the products stay per problem (widths differ)."""
    n, k = batch[0].n, batch[0].k
    at_label = np.stack([p.codes * n + np.arange(n) for p in batch])  # flat index into (k, n)

    def evaluate(ids: list[int], thetas: list[np.ndarray]):
        B = len(ids)
        Z = np.empty((B, k, n))
        for j, (i, theta) in enumerate(zip(ids, thetas)):
            np.matmul(theta.reshape(batch[i].p + 1, k).T, batch[i].X1T, out=Z[j])
        Z -= Z.max(axis=1, keepdims=True)
        E = np.exp(Z)
        s = E.sum(axis=1)  # (B, n)
        lab = at_label[ids]
        fs = np.log(s).sum(axis=1)
        fs -= np.take_along_axis(Z.reshape(B, k * n), lab, axis=1).sum(axis=1)
        fs /= n
        np.multiply(s, n, out=s)
        E /= s[:, None, :]  # softmax / n
        E.reshape(B, k * n)[np.arange(B)[:, None], lab] -= 1.0 / n
        out = []
        for j, (i, theta) in enumerate(zip(ids, thetas)):
            prob = batch[i]
            w = theta[:prob.p * k]  # the coefficients; the last k entries are the intercepts
            g = (E[j] @ prob.X1).T.ravel()
            g[:prob.p * k] += prob.l2 * w
            out.append((float(fs[j]) + 0.5 * prob.l2 * float(w @ w), g))
        return out

    return evaluate


def _binomial_batch(batch: list[_Problem]):
    """Objective and gradient of binomial problems (classes_[1] the positive class), one by
    one: two-class meta-learners are rare and have one column per backbone."""

    def evaluate(ids: list[int], thetas: list[np.ndarray]):
        out = []
        for i, theta in zip(ids, thetas):
            prob = batch[i]
            p, n, t = prob.p, prob.n, prob.codes
            w = theta[:p]
            z = prob.X1 @ theta
            f = (np.logaddexp(0.0, z) - t * z).sum() / n + 0.5 * prob.l2 * float(w @ w)
            e = np.exp(-np.abs(z))
            r = (np.where(z >= 0, 1.0, e) / (1.0 + e) - t) / n
            g = prob.X1T @ r
            g[:p] += prob.l2 * w
            out.append((float(f), g))
        return out

    return evaluate


# --------------------------------------------------------------------------------------------
# scipy's L-BFGS-B, one state per problem, driven side by side
# --------------------------------------------------------------------------------------------

def _find_setulb():
    """scipy's L-BFGS-B step routine with the interface of scipy >= 1.15 (the C port), or None."""
    try:
        from scipy.optimize import _lbfgsb
    except ImportError:
        return None
    fn = getattr(_lbfgsb, "setulb", None)
    if fn is None:
        return None
    try:  # one step of a 1-d problem: the interface this module drives, or None
        st = _State(np.zeros(1), tol=1e-5, max_iter=10, setulb=fn)
        st.step()
        if st.task[0] != _FG:
            return None
    except Exception:  # noqa: BLE001 - another scipy: fall back to est.fit
        return None
    return fn


_FG, _NEW_X, _CONV = 3, 1, 4
"""L-BFGS-B task codes (scipy's C port): evaluate f and g at x; an iteration is done; converged."""


class _State:
    """One problem's L-BFGS-B workspace, laid out as scipy's ``_minimize_lbfgsb`` lays it out."""

    def __init__(self, x0: np.ndarray, *, tol: float, max_iter: int, setulb=None):
        n = x0.size
        m = MAXCOR
        self.setulb = setulb or _SETULB
        self.x = np.array(x0, dtype=np.float64)
        self.f = np.array(0.0, dtype=np.float64)
        self.g = np.zeros(n, dtype=np.float64)
        self.low = np.zeros(n)
        self.up = np.zeros(n)
        self.nbd = np.zeros(n, np.int32)  # unbounded
        self.wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m)
        self.iwa = np.zeros(3 * n, dtype=np.int32)
        self.task = np.zeros(2, dtype=np.int32)
        self.ln_task = np.zeros(2, dtype=np.int32)
        self.lsave = np.zeros(4, dtype=np.int32)
        self.isave = np.zeros(44, dtype=np.int32)
        self.dsave = np.zeros(29)
        self.factr = FACTR
        self.pgtol, self.max_iter = tol, max_iter
        self.nit = self.nfev = 0

    def step(self) -> None:
        self.setulb(MAXCOR, self.x, self.low, self.up, self.nbd, self.f, self.g, self.factr, self.pgtol,
                    self.wa, self.iwa, self.task, self.lsave, self.isave, self.dsave, MAXLS, self.ln_task)

    def advance(self) -> bool:
        """Step until the routine asks for f and g (True) or stops (False), applying the
        iteration and evaluation limits as scipy's driver does."""
        while True:
            self.step()
            if self.task[0] == _FG:
                return True
            if self.task[0] != _NEW_X:
                return False
            self.nit += 1
            if self.nit >= self.max_iter:
                self.task[0], self.task[1] = 5, 504
            elif self.nfev > MAXFUN:
                self.task[0], self.task[1] = 5, 502

    def status(self) -> int:
        """scipy's ``OptimizeResult.status``: 0 converged, 1 a limit reached, 2 anything else."""
        if self.task[0] == _CONV:
            return 0
        return 1 if (self.nfev > MAXFUN or self.nit >= self.max_iter) else 2


def _lbfgsb_lockstep(x0s: list[np.ndarray], evaluate, batch: list[_Problem], on_done=None) -> list[tuple]:
    """Minimise every problem; ``evaluate(ids, xs)`` gives ``[(f, g), ...]`` for the problems
    that ask in one round. Returns ``(x, iterations, status)`` per problem."""
    states = [_State(x0, tol=batch[i].tol, max_iter=batch[i].max_iter) for i, x0 in enumerate(x0s)]
    results: list = [None] * len(states)
    running = []
    for i, st in enumerate(states):
        if st.advance():
            running.append(i)
        else:
            results[i] = _done(st, i, on_done)
    while running:
        for i, (f, g) in zip(running, evaluate(running, [states[i].x for i in running])):
            st = states[i]
            st.f, st.g = f, g
            st.nfev += 1
        still = []
        for i in running:
            if states[i].advance():
                still.append(i)
            else:
                results[i] = _done(states[i], i, on_done)
        running = still
    return results


def _done(st: _State, i: int, on_done) -> tuple:
    if on_done is not None:
        on_done(i)
    return st.x.copy(), st.nit, st.status()


_SETULB = None
_SETULB = _find_setulb()
