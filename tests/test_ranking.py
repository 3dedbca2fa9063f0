"""Honest ranking: the standard error beside the spread, ties within noise of the best, the pick
being the cheapest tied configuration (a rule that removing unrelated rows cannot change),
`train.metric` limited to cross-validated columns, and failed cells recorded instead of
crashing the bench."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from conftest import REPO
from featstack.bench import rank_rows, run_bench, within_noise
from featstack.cache import SampleTable, write_arrays_cache
from featstack.config import RANK_METRICS
from featstack.errors import ConfigError
from featstack.fusion import fusion_spec
from featstack.heads import HEADS, head_spec, register_head
from featstack.pipeline import load_pipeline
from test_bench import assert_ranked_by_the_tie_rule
from test_pipeline import SMALL_DEMO

CV = 3


def _cache(path: Path, views: dict, n_train=60, n_test=15, n_classes=3, seed=0) -> Path:
    """A cache whose backbones are named views of one class signal: ("signal", d) a noisy view,
    ("noise", d) pure noise, ("const", d) constant columns, ("copy", key) another's features."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = np.arange(n) % n_classes
    feats = {}
    for key, (kind, arg) in views.items():
        if kind == "signal":
            feats[key] = rng.normal(size=(n, arg)) + 2.5 * np.eye(n_classes)[y] @ rng.normal(size=(n_classes, arg))
        elif kind == "noise":
            feats[key] = rng.normal(size=(n, arg))
        elif kind == "const":
            feats[key] = np.ones((n, arg))
        else:
            feats[key] = feats[arg].copy()
    samples = SampleTable(ids=[f"s{i:03d}" for i in range(n)], labels=y, splits=["train"] * n_train + ["test"] * n_test,
                          classes=[f"c{c}" for c in range(n_classes)])
    write_arrays_cache(path, samples, feats)
    return path


def _pick(rows, metric="cv_accuracy_mean"):
    r = rank_rows(rows, metric)[0]
    return r["backbones"], r["head"], r["fusion"]


# ------------------------------------------------------------------ the rule on generated rows

_HEADS = ["logreg", "linear-svm", "svm-rbf", "gaussian-nb", "multinomial-nb", "complement-nb"]  # the built-ins


@st.composite
def bench_rows(draw):
    """Distinct configurations with fold scores on a coarse grid (so exact and near ties occur)."""
    k = draw(st.integers(2, 6))
    cells = [(s, h, f) for s in ("a", "b", "c", "a+b", "a+c", "a+b+c") for h in _HEADS
             for f in (("single",) if "+" not in s else ("concat", "vote", "stack"))]
    chosen = draw(st.lists(st.sampled_from(cells), min_size=2, max_size=14, unique=True))
    rows = []
    for s, h, f in chosen:
        acc = [draw(st.integers(5, 10)) / 10 for _ in range(k)]
        f1 = [draw(st.integers(5, 10)) / 10 for _ in range(k)]
        rows.append({"backbones": s, "head": h, "fusion": f, "size": s.count("+") + 1,
                     "cv_accuracy_mean": float(np.mean(acc)), "cv_accuracy_folds": acc,
                     "cv_f1_macro_mean": float(np.mean(f1)), "cv_f1_macro_folds": f1})
    return rows


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=bench_rows(), metric=st.sampled_from(RANK_METRICS), data=st.data())
def test_removing_rows_that_are_neither_pick_nor_best_never_changes_the_pick(rows, metric, data):
    ranked = rank_rows(rows, metric)
    pick = ranked[0]
    best = max(rows, key=lambda r: (r[metric], r["cv_f1_macro_mean" if metric == "cv_accuracy_mean"
                                                    else "cv_accuracy_mean"]))
    # the pick is tied with the best and no tied row is cheaper
    assert pick["tied_with_best"] and within_noise(best[metric.replace("_mean", "_folds")],
                                                   pick[metric.replace("_mean", "_folds")])
    cost = lambda r: (r["size"], head_spec(r["head"]).cost, fusion_spec(r["fusion"]).cost)  # noqa: E731
    assert all(cost(pick) <= cost(r) for r in ranked if r["tied_with_best"])
    # drop any set of other rows (here: a random subset, or every row of an unrelated head)
    keep_always = {id(r) for r in rows if (r["backbones"], r["head"], r["fusion"]) in
                   {(pick["backbones"], pick["head"], pick["fusion"]),
                    (best["backbones"], best["head"], best["fusion"])}}
    mask = data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
    kept = [r for r, m in zip(rows, mask) if m or id(r) in keep_always]
    assert _pick(kept, metric) == _pick(rows, metric)
    unrelated = {r["head"] for r in rows} - {pick["head"], best["head"]}
    for h in unrelated:
        assert _pick([r for r in rows if r["head"] != h], metric) == _pick(rows, metric)
    # the input order does not matter
    assert rank_rows(list(reversed(rows)), metric) == ranked


def test_within_noise_is_the_paired_two_standard_error_rule():
    assert within_noise([0.9, 0.8, 0.9], [0.9, 0.8, 0.9])              # identical
    assert within_noise([0.9, 0.8, 0.9], [1.0, 0.9, 1.0])              # better is never "worse"
    assert not within_noise([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])          # worse on every fold by the same
    # d = (0.1, 0, 0.2): mean 0.1, standard error 0.0577 -> within 2 SE; d = (0.3, 0.2, 0.4) is not
    assert within_noise([0.8, 0.8, 0.9], [0.7, 0.8, 0.7])
    assert not within_noise([1.0, 1.0, 1.0], [0.7, 0.8, 0.6])


def test_rows_without_a_score_rank_last_and_metrics_are_cross_validated_only():
    rows = [{"backbones": "a", "head": "logreg", "fusion": "single", "size": 1, "cv_accuracy_mean": None,
             "cv_f1_macro_mean": None, "status": "failed"},
            {"backbones": "b", "head": "logreg", "fusion": "single", "size": 1, "cv_accuracy_mean": 0.5,
             "cv_accuracy_folds": [0.5, 0.5], "cv_f1_macro_mean": 0.5, "cv_f1_macro_folds": [0.5, 0.5]}]
    ranked = rank_rows(rows)
    assert [r["backbones"] for r in ranked] == ["b", "a"] and [r["tied_with_best"] for r in ranked] == [True, False]
    for metric in ("test_accuracy", "fit_seconds"):
        with pytest.raises(ConfigError, match=f"'{metric}' is not a cross-validated bench column"):
            rank_rows(rows, metric)


# ------------------------------------------------------------------ ties on real bench runs

@pytest.fixture(scope="module")
def tie_cache(tmp_path_factory) -> Path:
    """`sig` carries the classes, `twin` is an exact copy of it, `noise` carries nothing."""
    return _cache(tmp_path_factory.mktemp("ties") / "ties.h5",
                  {"sig": ("signal", 6), "twin": ("copy", "sig"), "noise": ("noise", 6)})


def test_ties_marked_on_a_real_bench(tie_cache, tmp_path):
    res = run_bench(tie_cache, heads="logreg,gaussian-nb", fusions="single,concat", max_size=2, cv=CV,
                    out=tmp_path / "o", progress=False)
    by = {(r["backbones"], r["head"], r["fusion"]): r for r in res.rows}
    for h in ("logreg", "gaussian-nb"):  # a copy scores exactly like its original: always tied with each other
        assert by[("sig", h, "single")]["cv_accuracy_folds"] == by[("twin", h, "single")]["cv_accuracy_folds"]
        assert by[("sig", h, "single")]["tied_with_best"] == by[("twin", h, "single")]["tied_with_best"]
        assert not by[("noise", h, "single")]["tied_with_best"]  # chance level is far outside the noise
    pick = res.rows[0]
    assert res.best() == pick and pick["tied_with_best"] and pick["size"] == 1
    # a cheaper head wins a tie: gaussian-nb (cost 1) before logreg (cost 2) when both are tied
    if by[("sig", "gaussian-nb", "single")]["tied_with_best"]:
        assert pick["head"] == "gaussian-nb"
    with (tmp_path / "o" / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert_ranked_by_the_tie_rule(rows, json.loads((tmp_path / "o" / "bench.json").read_text()))
    for r in res.rows:  # the standard error is the fold scores' sample std / sqrt(k), beside the spread
        a = np.array(r["cv_accuracy_folds"])
        assert r["cv_accuracy_se"] == pytest.approx(a.std(ddof=1) / np.sqrt(CV))
        assert r["cv_accuracy_std"] == pytest.approx(a.std())


def test_report_ranks_a_bench_json_written_before_the_tie_rule_the_same_way(tie_cache, tmp_path):
    from featstack.report import bench_rows as report_rows

    run_bench(tie_cache, heads="logreg,gaussian-nb", fusions="single,vote", max_size=2, cv=CV, out=tmp_path / "o",
              progress=False)
    doc = json.loads((tmp_path / "o" / "bench.json").read_text())
    new = ("cv_accuracy_se", "cv_f1_macro_se", "cv_accuracy_folds", "cv_f1_macro_folds", "tied_with_best",
           "status", "error")
    old = dict(doc, rows=sorted(({k: v for k, v in r.items() if k not in new} for r in doc["rows"]),
                                key=lambda r: -r["cv_accuracy_mean"]))
    key = lambda r: (r["rank"], r["backbones"], r["head"], r["fusion"], r["tied_with_best"], r["cv_accuracy_se"])  # noqa: E731
    assert [key(r) for r in report_rows(old)] == [key(r) for r in doc["rows"]]
    assert report_rows(doc) == doc["rows"]


def test_removing_an_unrelated_head_from_a_real_bench_keeps_the_pick(tie_cache):
    heads = ["logreg", "gaussian-nb", "linear-svm"]
    full = run_bench(tie_cache, heads=heads, fusions="single,vote", max_size=2, cv=CV, progress=False)
    pick = full.best()
    best = max(full.rows, key=lambda r: (r["cv_accuracy_mean"], r["cv_f1_macro_mean"]))
    for h in set(heads) - {pick["head"], best["head"]}:
        fewer = run_bench(tie_cache, heads=[x for x in heads if x != h], fusions="single,vote", max_size=2, cv=CV,
                          progress=False)
        got = fewer.best()
        assert (got["backbones"], got["head"], got["fusion"]) == (pick["backbones"], pick["head"], pick["fusion"])


# ------------------------------------------------------------------ the README states the rule

def test_readme_states_the_rule_with_the_registry_costs():
    text = (REPO / "README.md").read_text()
    section = text.split("### How the bench ranks: the tie rule")[1].split("\n## ")[0]
    assert "fewer backbones, then the faster head, then the simpler fusion" in section
    assert "two\nstandard errors" in section or "two standard errors" in section.replace("\n", " ")
    flat = section.replace("\n", " ")
    for registry, spec in ((["gaussian-nb", "multinomial-nb", "complement-nb", "logreg", "linear-svm", "svm-rbf"],
                            head_spec), (["single", "concat", "vote", "stack"], fusion_spec)):
        for name in registry:
            m = re.search(rf"`{re.escape(name)}`(?:, `[^`]+`)* (\d)", flat)
            assert m and int(m.group(1)) == spec(name).cost, name
    for metric in RANK_METRICS:
        assert f"`{metric}`" in section


# ------------------------------------------------------------------ train.metric

@pytest.mark.parametrize("metric", ["test_accuracy", "fit_seconds", "cv_accuracy_std"])
def test_train_metric_takes_only_cross_validated_columns(tmp_path, metric):
    text = SMALL_DEMO.format(tmp=tmp_path, export="").replace("  model: best", f"  model: best\n  metric: {metric}")
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"line \d+: train.metric: '{metric}' is not one of "
                                          r"cv_accuracy_mean, cv_f1_macro_mean") as e:
        load_pipeline(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.write_text(text.replace(f"metric: {metric}", "metric: cv_f1_macro_mean"))
    assert load_pipeline(path).stages["train"].metric == "cv_f1_macro_mean"


# ------------------------------------------------------------------ failed cells

class _Picky(LogisticRegression):
    """A user head that cannot fit fewer than 4 columns."""

    def fit(self, X, y, sample_weight=None):
        if X.shape[1] < 4:
            raise ValueError(f"picky needs 4 columns, got {X.shape[1]}\nsecond line")
        return super().fit(X, y, sample_weight)


@pytest.fixture
def picky():
    """The head registered for one test only (other tests iterate over every registered head)."""
    register_head("picky", lambda seed: make_pipeline(_Picky(max_iter=500)), cost=2)
    try:
        yield "picky"
    finally:
        HEADS.pop("picky", None)


def test_a_failing_base_fit_fails_its_cells_only(tmp_path, picky):
    cache = _cache(tmp_path / "p.h5", {"wide": ("signal", 6), "thin": ("signal", 3)})
    before = (warnings.showwarning, list(warnings.filters))
    res = run_bench(cache, heads="picky,logreg", fusions="single,concat,stack", max_size=2, cv=CV, n_jobs=2,
                    backend="threading", progress=False)
    # tasks in concurrent threads leave the process-wide warnings state as it was
    assert (warnings.showwarning, list(warnings.filters)) == before
    failed = {(r["backbones"], r["head"], r["fusion"]): r["error"] for r in res.rows if r["status"] == "failed"}
    # thin alone, and the stack that fits a head on thin's columns; concat sees 9 columns and fits
    assert set(failed) == {("thin", "picky", "single"), ("thin+wide", "picky", "stack")}
    assert failed[("thin", "picky", "single")] == "picky on thin, outer fold 1: ValueError: picky needs 4 columns, got 3"
    assert [r["status"] for r in res.rows[-2:]] == ["failed", "failed"]
    assert all(r["cv_accuracy_mean"] is None and not r["tied_with_best"] for r in res.rows[-2:])
    assert all(r["status"] == "ok" and r["cv_accuracy_mean"] is not None for r in res.rows[:-2])


def _featstack(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featstack", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd),
                               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}, timeout=300)


def test_cli_records_failed_cells_and_goes_on(tmp_path):
    """gaussian-nb + stack on constant features (NaN scores into the meta-learner) used to end the
    whole bench in a traceback; now that cell is a row with its error and the rest is ranked."""
    cache = _cache(tmp_path / "c.h5", {"flat": ("const", 4), "flat2": ("const", 3), "sig": ("signal", 4)})
    out = tmp_path / "run"
    r = _featstack("bench", str(cache), "--heads", "gaussian-nb,logreg", "--fusions", "single,stack", "--cv", "3",
                   "--max-size", "2", "--n-jobs", "2", "--out", str(out), "--no-progress", "--no-report", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    failed = [x for x in rows if x["status"] == "failed"]
    assert {(x["backbones"], x["head"], x["fusion"]) for x in failed} == {
        ("flat+flat2", "gaussian-nb", "stack"), ("flat+sig", "gaussian-nb", "stack"),
        ("flat2+sig", "gaussian-nb", "stack")}
    assert all(re.fullmatch(r"stack of \S+ with gaussian-nb, outer fold \d: ValueError: Input X contains NaN\.",
                            x["error"]) for x in failed), failed
    assert rows[-3:] == failed and all(x["cv_accuracy_mean"] == "" for x in failed)
    assert all(x["status"] == "ok" and x["error"] == "" for x in rows[:-3])
    assert "3 failed (see results.csv)" in r.stdout and "FAILED: stack of flat+flat2" in r.stdout
    # the numerical warnings of the degenerate fits are data (bench.json), not hundreds of stderr lines
    assert "Traceback" not in r.stderr and "RuntimeWarning" not in r.stderr
    assert re.search(r"warnings +\d+ distinct from the fits, listed in bench.json; the first: RuntimeWarning", r.stdout)
    assert any(w.startswith("RuntimeWarning: ") for w in json.loads((out / "bench.json").read_text())["warnings"])


def test_cli_fails_with_one_line_when_every_cell_fails(tmp_path):
    cache = _cache(tmp_path / "c.h5", {"flat": ("const", 4), "flat2": ("const", 3)})
    out = tmp_path / "run"
    r = _featstack("bench", str(cache), "--heads", "gaussian-nb", "--fusions", "stack", "--cv", "3",
                   "--out", str(out), "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"featstack bench: error: every one of the 1 configurations failed (errors in "
                               f"{out / 'results.csv'}); the first: stack of flat+flat2 with gaussian-nb, outer fold 1")
    with (out / "results.csv").open() as fh:
        assert [x["status"] for x in csv.DictReader(fh)] == ["failed"]
