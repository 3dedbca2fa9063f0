"""The bench's progress bar moves during long fits (ticks per fit, the running fit counted from
the measured time of fits like it), gives an ETA from measured per-fit times of the same kind,
and names the task that has been running longest; checked with a head whose fit waits on a
file, in-process (n_jobs 1) and in loky workers (n_jobs 2)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from featstack.bench_progress import BenchProgress, estimate_fit_seconds
from featstack.cache import SampleTable, write_arrays_cache


def test_eta_uses_fits_of_the_same_kind_then_scales_by_width():
    measured = {("svm-rbf", "base", 100): [8.0, 4], ("logreg", "base", 100): [0.4, 4]}
    assert estimate_fit_seconds(measured, ("svm-rbf", "base", 100), 100) == 2.0
    assert estimate_fit_seconds(measured, ("svm-rbf", "base", 300), 300) == pytest.approx(6.0)  # same head, wider
    assert estimate_fit_seconds(measured, ("logreg", "concat", 200), 200) == pytest.approx(0.2)  # same head
    assert estimate_fit_seconds(measured, ("gaussian-nb", "base", 100), 100) is None  # never measured: no guess


def test_state_counts_running_fits_and_names_the_longest_task():
    bar = BenchProgress(total=9, workers=1, enabled=True, long_task_s=60.0)
    try:
        first = bar.heartbeat("slow on a, outer fold 1", 3, ("slow", "base", 8), 8)
        second = bar.heartbeat("slow on a, outer fold 2", 3, ("slow", "base", 8), 8)
        third = bar.heartbeat("slow on b, outer fold 1", 3, ("slow", "base", 16), 16)
        first.start()
        bar.finish(first, 3.0)                # 3 fits of 1 s each
        second.every = 0.0
        second.start()
        second.fit(1.0)                       # one fit done, the second one running
        last = second._state[3]
        done, eta, longest = bar.state(now=last + 0.5)
        assert done == pytest.approx(3 + 1 + 0.5)  # half of a 1 s fit has elapsed
        # left: 1.5 fits of 1 s here, 3 fits twice as wide (2 s each) for the unstarted task
        assert eta == pytest.approx(1.5 * 1.0 + 3 * 2.0)
        assert longest is None
        done, _, longest = bar.state(now=last + 30.0)
        assert done == pytest.approx(3 + 1 + 0.95)   # a running fit never counts as finished
        _, _, longest = bar.state(now=second._state[0] + 61.0)
        assert longest[0] == "slow on a, outer fold 2" and longest[1] == pytest.approx(61.0)
        assert third.name not in os.listdir(bar.folder)  # not started: no heartbeat yet
    finally:
        bar.__exit__(None, None, None)
    assert not Path(bar.folder).exists()


# ------------------------------------------------------------------ a real bench with a fit that waits

SLOW_HEAD = '''
import os, time
from sklearn.linear_model import LogisticRegression

class WaitingLogReg(LogisticRegression):
    """Fits on the 8-wide backbone wait until the gate file exists."""
    def fit(self, X, y, sample_weight=None):
        if X.shape[1] == 8:
            open(os.environ["GATE"] + ".waiting", "a").close()
            while not os.path.exists(os.environ["GATE"]):
                time.sleep(0.01)
        return super().fit(X, y, sample_weight)
'''

SCRIPT = '''
import sys
from sklearn.pipeline import make_pipeline
import featstack
from featstack import bench_progress
from slowhead import WaitingLogReg

bench_progress.REFRESH_S = 0.1
bench_progress.LONG_TASK_S = 1.0
featstack.register_head("waiting", lambda seed: make_pipeline(WaitingLogReg(max_iter=300)), cost=2)
res = featstack.run_bench(sys.argv[1], heads="logreg,waiting", fusions="single", cv=3, n_jobs=int(sys.argv[2]),
                          progress=True)
print("DONE", len(res.rows))
'''


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gated")
    rng = np.random.default_rng(0)
    n, y = 48, np.arange(48) % 2
    samples = SampleTable(ids=[f"s{i}" for i in range(n)], labels=y, splits=["train"] * n, classes=["a", "b"])
    write_arrays_cache(tmp / "c.h5", samples, {"narrow": rng.normal(size=(n, 4)) + y[:, None],
                                               "wide": rng.normal(size=(n, 8)) + y[:, None]})
    (tmp / "slowhead.py").write_text(SLOW_HEAD)
    (tmp / "run.py").write_text(SCRIPT)
    return tmp


def _wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_bar_moves_and_names_the_waiting_fit(gated, tmp_path, n_jobs):
    gate = tmp_path / "gate"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{gated}", "GATE": str(gate), "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(gated / "run.py"), str(gated / "c.h5"), str(n_jobs)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        _wait_for(lambda: Path(str(gate) + ".waiting").exists(), "a fit to wait on the gate")
        # the bar names the waiting task once it has run for LONG_TASK_S
        named = re.compile(r"running 0:0\d: waiting on wide, outer fold \d")
        _wait_for(lambda: named.search("".join(err)), "the bar to name the waiting task")
        frames = lambda: re.split(r"[\r\n]", "".join(err))  # noqa: E731 - each redraw of the bar (text mode: \r -> \n)
        seen = len(frames())
        _wait_for(lambda: len(frames()) >= seen + 5, "five more redraws while the fit waits")
        last = frames()[-1]
        assert named.search(last) and "ETA" in last, last
        fits = int(re.search(r"\| *(\d+)/(\d+) fits", last).group(1))
        assert fits > 0  # the fits that did not wait were counted one by one
    finally:
        gate.touch()
    assert proc.wait(timeout=300) == 0
    reader.join()  # stderr is read to its end by the reader alone
    assert "DONE 4" in proc.stdout.read(), "".join(err)[-3000:]
    final = [f for f in re.split(r"[\r\n]", "".join(err)) if "fits" in f][-1]
    # 2 backbones x 2 heads x 3 folds: one base fit and one combine step each
    assert re.search(r"24/24 fits", final), final


@pytest.mark.parametrize("stack_folds", ["nested", "shared"])
def test_stack_grid_with_several_heads_runs_with_the_bar(tmp_path, capsys, monkeypatch, stack_folds):
    """The meta-learner steps of several heads and the shared fits get ETA estimates like the base
    fits (a regression: the estimate once compared a head name with a width on the second
    head's meta-learners, and `make demo` failed). The bar's estimate is computed after every
    task here, not only when its timer fires."""
    from featstack.bench import run_bench

    finish = BenchProgress.finish

    def finish_and_estimate(self, beat, seconds):
        finish(self, beat, seconds)
        self.state()

    monkeypatch.setattr(BenchProgress, "finish", finish_and_estimate)

    rng = np.random.default_rng(3)
    n, y = 45, np.arange(45) % 3
    samples = SampleTable(ids=[f"s{i}" for i in range(n)], labels=y, splits=["train"] * n, classes=["a", "b", "c"])
    feats = {f"b{i}": rng.normal(size=(n, 3 + i)) + np.eye(3)[y] @ rng.normal(size=(3, 3 + i)) for i in range(3)}
    cache = write_arrays_cache(tmp_path / "c.h5", samples, feats)
    res = run_bench(cache, heads="logreg,gaussian-nb,linear-svm", fusions="single,vote,stack", cv=3, progress=True,
                    stack_folds=stack_folds)
    assert len(res.rows) == 3 * (3 + 4 + 4)
    frames = [f for f in re.split(r"[\r\n]", capsys.readouterr().err) if "fits" in f]
    base = 3 * 3 * (3 * 4 if stack_folds == "nested" else 3 + 3)  # backbones x heads x fits (no test split)
    total = base + len(res.rows) * 3  # and one combine step per (cell, fold)
    assert re.search(rf"{total}/{total} fits", frames[-1]), frames[-1]
