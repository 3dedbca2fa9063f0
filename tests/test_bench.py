"""The backbone-combination bench: scores equal plain scikit-learn cross-validation of each model,
the base fits are shared (proven by counting real fits), outputs, CLI and errors."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import Pipeline

from conftest import REPO, write_image_folder
from featstack import plots
from featstack.bench import CSV_COLUMNS, bench_rows, run_bench
from featstack.cache import SampleTable, open_cache, write_arrays_cache
from featstack.cli import main as cli_main
from featstack.errors import CacheError, ConfigError, DataError
from featstack.fusion import StackClassifier, VoteClassifier, build_model
from featstack.heads import create_head
from featstack.solvers import LbfgsLinearSVC

CV = 3


# ------------------------------------------------------------------ caches

@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    """A cache made by the extractor: two random-init timm backbones over photo-like images in
    train/ and test/, with one corrupt training image (in the cache's error table)."""
    from featstack.extract import extract

    tmp = tmp_path_factory.mktemp("bench_real")
    root = write_image_folder(tmp / "photos", per_class={"train": 9, "test": 3}, seed=3)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    cache = tmp / "real.h5"
    extract(str(root), ["test_resnet", "test_vit"], cache, weights="none", workers=0, batch_size=16,
            progress=False)
    return cache


def make_cache(path: Path, *, dims=(6, 5, 4, 3), n_train=60, n_test=15, n_classes=3, seed=0,
               labels=None, nan_row=None) -> Path:
    """Synthetic cache: each backbone a noisy view of the class, differently informative."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = np.arange(n) % n_classes if labels is None else np.asarray(labels)
    feats = {}
    for i, d in enumerate(dims):
        X = rng.normal(size=(n, d)) * (1.0 + 0.4 * i) + np.eye(n_classes)[y] @ rng.normal(size=(n_classes, d))
        if nan_row is not None and i == 1:
            X[nan_row, 0] = np.nan
        feats[f"bb{i}"] = X
    samples = SampleTable(ids=[f"s{i:03d}" for i in range(n)], labels=y,
                          splits=["train"] * n_train + ["test"] * n_test,
                          classes=[f"class{c}" for c in range(n_classes)])
    write_arrays_cache(path, samples, feats)
    return path


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("bench_syn") / "syn.h5")


def _reference(cache, backbones, head, fusion, cv, seed=0):
    """Per-fold accuracy/macro-F1 and test accuracy of one model fitted the plain way."""
    c = open_cache(cache)
    train, test, _ = bench_rows(c)
    keys = backbones.split("+")
    X, Xt = c.features(keys, rows=train), c.features(keys, rows=test)
    y, yt = c.labels[train], c.labels[test]
    dims = [c.dim(k) for k in keys]
    if fusion == "stack":
        est = StackClassifier(head, dims, cv=cv, random_state=seed)
    elif fusion == "vote":
        est = VoteClassifier(head, dims, random_state=seed)
    else:
        est = create_head(head, random_state=seed)
    res = cross_validate(est, X, y, cv=StratifiedKFold(cv, shuffle=True, random_state=seed),
                         scoring=["accuracy", "f1_macro"])
    built = build_model(head, fusion, dims, cv=cv, random_state=seed).fit(X, y)
    return list(res["test_accuracy"]), list(res["test_f1_macro"]), built.score(Xt, yt)


def assert_ranked_by_the_tie_rule(csv_rows: list[dict], doc: dict) -> None:
    """results.csv follows the README's rule, re-derived here from bench.json's fold scores: the
    rows tied with the best by CV accuracy (paired fold differences within 2 standard errors)
    come first, cheapest first (backbones, head cost, fusion cost), then the rest by accuracy."""
    from featstack.fusion import fusion_spec
    from featstack.heads import head_spec

    folds = {(f["backbones"], f["head"], f["fusion"]): np.array(f["accuracy"]) for f in doc["folds"]}
    name = lambda r: (r["backbones"], r["head"], r["fusion"])  # noqa: E731
    ok = [r for r in csv_rows if r["status"] == "ok"]
    top = max(float(r["cv_accuracy_mean"]) for r in ok)
    best = [r for r in ok if float(r["cv_accuracy_mean"]) == top]
    for r in ok:
        d = folds[name(best[0])] - folds[name(r)]
        se = d.std(ddof=1) / np.sqrt(len(d))
        assert (r["tied_with_best"] == "true") == bool(d.mean() <= 1e-12 or d.mean() <= 2 * se), r
        assert float(r["cv_accuracy_se"]) == pytest.approx(folds[name(r)].std(ddof=1) / np.sqrt(len(d)), abs=1e-6)
    flags = [r["tied_with_best"] == "true" for r in csv_rows]
    n_tied = sum(flags)
    assert flags == [True] * n_tied + [False] * (len(flags) - n_tied) and all(r in csv_rows[:n_tied] for r in best)
    cost = [(int(r["size"]), head_spec(r["head"]).cost, fusion_spec(r["fusion"]).cost) for r in csv_rows[:n_tied]]
    assert cost == sorted(cost)
    rest = [float(r["cv_accuracy_mean"]) for r in csv_rows[n_tied:] if r["status"] == "ok"]
    assert rest == sorted(rest, reverse=True)
    assert [r["status"] for r in csv_rows] == sorted((r["status"] for r in csv_rows), key=lambda s: s != "ok")


# ------------------------------------------------------------------ end to end on a real cache

def test_cli_end_to_end_on_extracted_cache(real_cache, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["bench", str(real_cache), "--heads", "logreg,linear-svm", "--fusions",
                     "single,concat,vote,stack", "--cv", str(CV), "--n-jobs", "2", "--out", str(out),
                     "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    c = open_cache(real_cache)
    train, test, excluded = bench_rows(c)
    assert excluded == 1 and len(train) == 27 and len(test) == 9  # 28 train images, one broken

    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == CSV_COLUMNS
    # 2 backbones x 2 heads single + 1 pair x 2 heads x (concat, vote, stack)
    assert len(rows) == 4 + 6
    assert {(r["backbones"], r["fusion"]) for r in rows} == {
        ("test_resnet", "single"), ("test_vit", "single"), ("test_resnet+test_vit", "concat"),
        ("test_resnet+test_vit", "vote"), ("test_resnet+test_vit", "stack")}
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, 11)]
    assert all(r["status"] == "ok" and r["error"] == "" for r in rows)
    assert all(r["n_train"] == "27" and r["n_test"] == "9" and r["test_accuracy"] != "" for r in rows)
    assert all(float(r["fit_seconds"]) > 0 for r in rows)

    doc = json.loads((out / "bench.json").read_text())
    assert_ranked_by_the_tie_rule(rows, doc)
    assert doc["cache_fingerprint"] == c.dataset_fingerprint and doc["n_excluded"] == 1
    assert doc["settings"]["cv"] == CV and len(doc["rows"]) == 10
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 1 + 10 and "1 excluded" in md
    for name in ("heatmap.png", "best_by_size.png"):
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
    assert "test_resnet+test_vit" in printed and "27 training rows, 1 excluded" in printed

    # every row equals the model fitted and cross-validated the plain scikit-learn way
    for r in rows:
        folds = doc["folds"][[(f["backbones"], f["head"], f["fusion"]) for f in doc["folds"]].index(
            (r["backbones"], r["head"], r["fusion"]))]
        acc, f1, test_acc = _reference(real_cache, r["backbones"], r["head"], r["fusion"], CV)
        assert folds["accuracy"] == acc and folds["f1_macro"] == f1, r
        assert float(r["test_accuracy"]) == pytest.approx(test_acc, abs=1e-6), r


# ------------------------------------------------------------------ exactness and reuse

@pytest.mark.parametrize("n_classes", [2, 3])
def test_stack_and_vote_equal_plain_estimators(tmp_path, n_classes):
    """Binary (one score column per block) and multiclass; heads with predict_proba and with
    decision_function only; subsets of 2 and 3 blocks."""
    cache = make_cache(tmp_path / "x.h5", dims=(5, 4, 3), n_classes=n_classes, seed=n_classes)
    res = run_bench(cache, heads=["gaussian-nb", "linear-svm", "svm-rbf"], fusions=["vote", "stack"],
                    max_size=3, cv=CV, progress=False)
    assert len(res.rows) == 4 * 3 * 2
    scores = {round(r["cv_accuracy_mean"], 6) for r in res.rows}
    assert len(scores) > 3  # the models really differ, so equality below means something
    for (b, h, f), got in res.folds.items():
        acc, f1, test_acc = _reference(cache, b, h, f, CV)
        assert got["accuracy"] == acc and got["f1_macro"] == f1, (b, h, f)
        row = next(r for r in res.rows if (r["backbones"], r["head"], r["fusion"]) == (b, h, f))
        assert row["test_accuracy"] == test_acc


def _count_head_fits(monkeypatch) -> list:
    """Count every fit of the classifiers at the end of the logreg, gaussian-nb and linear-svm
    heads (whether through ``Pipeline.fit`` or after a first step shared between heads; the
    stack meta-learners take :mod:`featstack.logistic`'s path, not ``LogisticRegression.fit``)."""
    calls = []
    for cls in (LogisticRegression, GaussianNB, LbfgsLinearSVC):
        def fit(self, X, y=None, _original=cls.fit, **kw):
            calls.append(X.shape)
            return _original(self, X, y, **kw)

        monkeypatch.setattr(cls, "fit", fit)
    return calls


def test_base_fits_grow_with_backbones_not_subsets(tmp_path, monkeypatch):
    cache = make_cache(tmp_path / "x.h5", dims=(4, 3, 3, 2), n_train=45, n_test=9)
    calls = _count_head_fits(monkeypatch)
    heads = ["logreg", "gaussian-nb"]
    k, h = 4, len(heads)
    expected = k * h * CV * (CV + 1) + k * h * (CV + 1)  # outer folds + the test-split refit

    small = run_bench(cache, heads=heads, fusions=["single", "vote", "stack"], max_size=2, cv=CV,
                      n_jobs=1, progress=False)
    n_small = len(calls)
    calls.clear()
    big = run_bench(cache, heads=heads, fusions=["single", "vote", "stack"], max_size=4, cv=CV,
                    n_jobs=1, progress=False)
    assert len(small.rows) == (4 + 2 * 6) * h and len(big.rows) == (4 + 2 * 11) * h
    assert n_small == len(calls) == small.n_base_fits == big.n_base_fits == expected
    # the meta-learners, one per (stack subset, head, fold + refit), are the per-subset cost
    assert big.n_meta_fits == 11 * h * (CV + 1) and small.n_meta_fits == 6 * h * (CV + 1)

    # concat cannot share: one fit per (subset, head, fold + refit), counted separately
    calls.clear()
    cat = run_bench(cache, heads=heads, fusions=["concat"], max_size=3, cv=CV, progress=False)
    assert cat.n_base_fits == 0 and cat.n_concat_fits == len(calls) == 10 * h * (CV + 1)


def test_no_test_split_and_excluded_rows(tmp_path):
    n = 30
    samples = SampleTable(ids=[f"r{i}" for i in range(n)], labels=np.arange(n) % 2, splits=["train"] * n,
                          classes=["no", "yes"])
    rng = np.random.default_rng(1)
    c = write_arrays_cache(tmp_path / "x.h5", samples, {"a": rng.normal(size=(n, 3)), "b": rng.normal(size=(n, 2))})
    res = run_bench(c, heads="logreg", fusions="single,stack", cv=CV, out=tmp_path / "o", progress=False)
    assert res.n_test == 0 and all(r["test_accuracy"] is None for r in res.rows)
    assert res.n_base_fits == 2 * CV * (CV + 1)  # no refit without a test split
    with (tmp_path / "o" / "results.csv").open() as fh:
        assert all(r["test_accuracy"] == "" for r in csv.DictReader(fh))
    assert json.loads((tmp_path / "o" / "bench.json").read_text())["rows"][0]["test_accuracy"] is None


def test_best_and_backbone_order(syn):
    res = run_bench(syn, heads=["logreg"], fusions=["single", "concat"], backbones="bb2,bb0",
                    max_size=2, cv=CV, progress=False)
    assert {r["backbones"] for r in res.rows} == {"bb2", "bb0", "bb2+bb0"}
    best = res.best()
    assert best == res.rows[0] and best["rank"] == 1 and best["tied_with_best"]
    for metric in ("test_accuracy", "fit_seconds", "nope"):  # never select on the test split or a cost
        with pytest.raises(ConfigError, match=f"'{metric}' is not a cross-validated bench column"):
            res.best(metric)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(heads="logregg"), ConfigError, r"unknown head 'logregg' \(did you mean 'logreg'\?\)"),
    (dict(fusions="single,stak"), ConfigError, r"unknown fusion 'stak' \(did you mean 'stack'\?\)"),
    (dict(backbones="bb0,resnet50"), CacheError,
     r"backbone 'resnet50' is not in this cache \(it has: bb0, bb1, bb2, bb3\)"),
    (dict(max_size=0), ConfigError, r"max_size must be an integer >= 1, got 0"),
    (dict(cv=1), ConfigError, r"cv must be an integer >= 2"),
    (dict(heads="logreg,logreg"), ConfigError, r"head 'logreg' is listed twice"),
    (dict(fusions="concat", backbones="bb0"), ConfigError, r"nothing to evaluate"),
])
def test_config_errors(syn, kwargs, exc, pattern):
    args = dict(heads="logreg", fusions="single,stack", cv=CV, progress=False) | kwargs
    with pytest.raises(exc, match=pattern):
        run_bench(syn, **args)


def test_single_class(tmp_path):
    cache = make_cache(tmp_path / "x.h5", labels=[1] * 60 + [0] * 15)
    with pytest.raises(DataError, match=r"only one class \('class1', 60 rows\)"):
        run_bench(cache, heads="logreg", fusions="single", cv=CV, progress=False)


def test_class_smaller_than_folds(tmp_path):
    labels = [0] * 30 + [1] * 28 + [2] * 2 + [0] * 15
    cache = make_cache(tmp_path / "x.h5", labels=labels)
    with pytest.raises(DataError, match=r"class 'class2' has 2 row\(s\), fewer than the cv=3 folds"):
        run_bench(cache, heads="logreg", fusions="single", cv=CV, progress=False)
    # stacking also needs cv rows of each class in every outer-training fold
    labels = [0] * 30 + [1] * 26 + [2] * 4 + [0] * 15
    cache = make_cache(tmp_path / "y.h5", labels=labels)
    run_bench(cache, heads="gaussian-nb", fusions="single", cv=CV, progress=False)
    with pytest.raises(DataError, match=r"class 'class2' has 4 rows, so an outer training fold keeps only 2"):
        run_bench(cache, heads="gaussian-nb", fusions="single,stack", cv=CV, progress=False)


def test_nan_row_outside_error_table(tmp_path):
    cache = make_cache(tmp_path / "x.h5", nan_row=7)
    with pytest.raises(DataError, match=r"sample 's007' \(row 7\) has non-finite features for backbone 'bb1'"):
        run_bench(cache, heads="logreg", fusions="single", cv=CV, progress=False)
    # a backbone without NaNs benches fine
    run_bench(cache, heads="logreg", fusions="single", backbones="bb0", cv=CV, progress=False)


def test_dask_missing_is_a_config_error(syn, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed → ImportError
    with pytest.raises(ConfigError, match=r"install featstack\[dask\]"):
        run_bench(syn, heads="logreg", fusions="single", cv=CV, backend="dask", progress=False)


def test_cli_errors_are_one_line(syn, tmp_path, capsys):
    code = cli_main(["bench", str(syn), "--heads", "svm-rbff", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("featstack bench: error: unknown head 'svm-rbff' (did you mean 'svm-rbf'?)")
    assert not (tmp_path / "o").exists()


def test_cli_default_out_and_no_torch(syn, tmp_path):
    """`featstack bench` runs without importing torch and writes to runs/<cache stem>."""
    code = ("import sys; from featstack.cli import main; "
            f"rc = main(['bench', {str(syn)!r}, '--heads', 'gaussian-nb', '--fusions', 'single,vote', "
            "'--cv', '3', '--n-jobs', '1', '--no-progress']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'; print('OK')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("OK")
    run = tmp_path / "runs" / "syn"
    assert (run / "results.csv").exists() and (run / "heatmap.png").exists()
    assert "bb0+bb1+bb2" in (run / "results.md").read_text()


# ------------------------------------------------------------------ plots

def test_prediction_plots_are_pngs(tmp_path):
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    yhat = np.array([0, 1, 1, 1, 2, 0, 2])
    classes = ["ant", "bee", "cow"]
    for fn, name in ((plots.confusion, "cm.png"), (plots.per_class_f1, "f1.png")):
        path = fn(y, yhat, classes, tmp_path / name)
        with Image.open(path) as im:
            im.verify()
        assert path.stat().st_size > 2000


# ------------------------------------------------------------------ scores

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 6), min_size=n, max_size=n),
                                                      st.lists(st.integers(0, 6), min_size=n, max_size=n))))
def test_fold_scores_equal_sklearn_exactly(labels):
    from sklearn.metrics import accuracy_score, f1_score

    from featstack.bench import accuracy_and_macro_f1

    y_true, y_pred = (np.array(v) for v in labels)
    assert accuracy_and_macro_f1(y_true, y_pred) == (
        accuracy_score(y_true, y_pred), f1_score(y_true, y_pred, average="macro", zero_division=0))


# ------------------------------------------------------------------ shared inner folds (below the floor)

def _shared_reference(cache, backbones, head, cv, seed=0):
    """Per-fold scores of scikit-learn's StackingClassifier whose inner folds, on each outer
    training fold, are the other outer folds (``PredefinedSplit``), and its test accuracy when
    refit on all training rows with the outer folds as inner folds."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import PredefinedSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    c = open_cache(cache)
    train, test, _ = bench_rows(c)
    keys = backbones.split("+")
    X, Xt = c.features(keys, rows=train, dtype=np.float32), c.features(keys, rows=test, dtype=np.float32)
    y, yt = c.labels[train], c.labels[test]
    bounds = np.cumsum([0] + [c.dim(k) for k in keys])
    outer = list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(X, y))
    fold_of = np.empty(len(y), dtype=int)
    for f, (_, te) in enumerate(outer):
        fold_of[te] = f

    def stack(inner):
        blocks = [(k, make_pipeline(ColumnTransformer([(k, "passthrough", slice(int(bounds[i]), int(bounds[i + 1])))]),
                                    create_head(head, random_state=seed))) for i, k in enumerate(keys)]
        final = make_pipeline(FunctionTransformer(_float64), LogisticRegression(max_iter=1000, random_state=seed))
        return StackingClassifier(blocks, final_estimator=final, cv=inner)

    acc, f1 = [], []
    for tr, te in outer:
        pred = stack(PredefinedSplit(fold_of[tr])).fit(X[tr], y[tr]).predict(X[te])
        acc.append(float(accuracy_score(y[te], pred)))
        f1.append(float(f1_score(y[te], pred, average="macro")))
    return acc, f1, float(stack(PredefinedSplit(fold_of)).fit(X, y).score(Xt, yt))


def _float64(a):
    return np.asarray(a, dtype=np.float64)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_shared_stack_folds_are_the_other_outer_folds(tmp_path, n_classes, monkeypatch):
    """stack_folds="shared": every stack score is scikit-learn's stacking with the other outer
    folds as inner folds; single and vote (outer models only) are unchanged; the test-split stack
    is exactly the model `featstack train --fusion stack` fits; about half the base fits."""
    cache = make_cache(tmp_path / "x.h5", dims=(5, 4, 3), n_classes=n_classes, seed=n_classes, n_train=75)
    cv, heads = 5, ["gaussian-nb", "linear-svm", "logreg"]
    calls = _count_head_fits(monkeypatch)
    nested = run_bench(cache, heads=heads, fusions=["single", "vote", "stack"], max_size=3, cv=cv, progress=False)
    n_nested = len(calls)
    calls.clear()
    shared = run_bench(cache, heads=heads, fusions=["single", "vote", "stack"], max_size=3, cv=cv, progress=False,
                       stack_folds="shared")
    # per (backbone, head): C(cv, 2) pair fits + cv outer fits + the test-split refit (its inner
    # models are the outer ones) against cv (cv + 1) + (cv + 1)
    assert shared.n_base_fits == len(calls) == 3 * 3 * (cv * (cv - 1) // 2 + cv + 1)
    assert nested.n_base_fits == n_nested == 3 * 3 * (cv + 1) * (cv + 1)
    assert shared.settings["stack_folds"] == "shared"
    rows = {(r["backbones"], r["head"], r["fusion"]): r for r in shared.rows}
    differ = 0
    for (b, h, f), got in shared.folds.items():
        if f != "stack":  # outer models only: the same models, the same scores
            assert got == nested.folds[(b, h, f)]
            continue
        acc, f1, test_acc = _shared_reference(cache, b, h, cv)
        assert got["accuracy"] == acc and got["f1_macro"] == f1, (b, h)
        assert rows[(b, h, f)]["test_accuracy"] == test_acc
        differ += got != nested.folds[(b, h, f)]
        # the test-split stack is the one training fits: its inner folds are the outer folds
        c = open_cache(cache)
        train, test, _ = bench_rows(c)
        keys = b.split("+")
        model = StackClassifier(h, [c.dim(k) for k in keys], cv=cv, random_state=0).fit(
            c.features(keys, rows=train, dtype=np.float32), c.labels[train])
        assert model.score(c.features(keys, rows=test, dtype=np.float32), c.labels[test]) == test_acc
    assert differ  # the inner folds differ from nested ones, so the checks above mean something


def test_shared_stack_folds_pin_size_choices_per_training_size():
    """Near svm-rbf's exact/Nystroem switch, the test-split refit's inner models are not the
    outer models (those are pinned to the refit's size), and pair fits are pinned to their outer
    fold's training size."""
    from featstack.bench import REFIT, _shared_fits, _shared_models
    from featstack.solvers import RbfSVC

    y = np.arange(110) % 2
    outer = list(StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(110), y))
    folds = {f: (tr, te) for f, (tr, te) in enumerate(outer)}
    folds[REFIT] = (np.arange(110), 110 + np.arange(10))
    plain = _shared_models(_shared_fits(folds, create_head("logreg"), 110), folds)
    assert len(plain) == 10 + 5 + 1  # pairs, outer models (also the refit's inner models), refit
    assert plain[((2,), ())] == {2: folds[2][1]} and set(plain[((1, 3), ())]) == {1, 3}
    svm = Pipeline([("clf", RbfSVC(exact_below=100))])  # outer folds: 88 rows (exact), refit: 110
    pinned = _shared_models(_shared_fits(folds, svm, 110), folds)
    assert len(pinned) == 10 + 5 + 5 + 1
    assert pinned[((1, 3), (("clf__exact_below", 89),))].keys() == {1, 3}
    assert pinned[((3,), (("clf__exact_below", 0),))] == {3: folds[3][1]}


def test_shared_stack_folds_needs_three_folds(syn, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"stack_folds shared needs cv >= 3"):
        run_bench(syn, heads="logreg", fusions="stack", cv=2, stack_folds="shared", progress=False)
    code = cli_main(["bench", str(syn), "--heads", "logreg", "--fusions", "single,stack", "--stack-folds", "shared",
                     "--cv", "3", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 0
    assert json.loads((tmp_path / "o" / "bench.json").read_text())["settings"]["stack_folds"] == "shared"
    assert "the inner folds were the other outer folds (--stack-folds shared: a 2-fold inner CV" in \
        (tmp_path / "o" / "results.md").read_text()
    assert "--stack-folds shared" in (tmp_path / "o" / "report.html").read_text()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", str(syn), "--stack-folds", "half", "--no-progress"])
    assert exit_.value.code == 2 and "invalid choice: 'half'" in capsys.readouterr().err
