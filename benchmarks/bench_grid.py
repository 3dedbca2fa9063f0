"""Bench grid speed: featstack's reuse of per-backbone fits against one StackingClassifier per subset.

    python benchmarks/bench_grid.py [--cache PATH] [--heads logreg,linear-svm,gaussian-nb]
        [--backbones 5] [--train 600] [--classes 5] [--dim D] [--cv 5] [--n-jobs 1] [--repeat 3]
        [--seed 0] [--skip-baseline] [--json PATH]

Without ``--cache`` it writes a synthetic cache of 5 backbones (widths 32, 48, 64, 96, 128;
600 training rows, 5 classes; each backbone a noisy, differently informative linear view of
a class signal, so scores differ between subsets, heads and folds) to a temporary folder.

Then, for the heads given and the ``stack`` fusion over every subset of size >= 2 (26 subsets for
5 backbones), it times:

  (a) featstack: ``featstack.bench.run_bench(..., fusions=["stack"], max_size=K)``: base heads
      fitted once per (backbone, head, fold) and reused by every subset;
  (b) baseline: per (subset, head), scikit-learn's ``StackingClassifier`` over column-selecting
      pipelines (``ColumnTransformer`` passthrough → head), same inner cv splitter and final
      estimator (``LogisticRegression(max_iter=1000, random_state=seed)``), cross-validated with
      ``cross_validate`` on the same outer ``StratifiedKFold(cv, shuffle=True, random_state=seed)``
      (and, when the cache has a labelled test split, refit on all training rows and scored on it,
      as the bench does).

  (c) floor: the base fits alone, which any stack grid must do: per (backbone, head, outer
      fold) the ``cv`` inner out-of-fold fits and the refit on the outer-training rows (and the
      same on all training rows when there is a test split), with the same heads, same threads
      and ``--n-jobs`` workers (one task per dispatch, as the bench), no predictions, no
      meta-learner, no scoring. Each head is fitted on its own, as ``head.fit`` does: the bench
      fits a scaler that several heads start with once for them all, which is how it can come
      in under this floor.

``--stack-folds shared`` runs (a) with featstack's shared inner folds (per outer fold, the other
outer folds are the inner folds, so each inner fit serves two outer folds) and (b) with the same
inner folds (``PredefinedSplit``); (c) stays the nested floor, which shared folds go below.

(a) and (c) alternate ``--repeat`` times (default 3) and each keeps its best time (a shared
machine's load only adds time). With ``--n-jobs`` above 1 they are first timed ``--repeat``
times each starting their own worker processes (what one command pays: ~1 s of importing
scikit-learn per worker), then ``--repeat`` times on warm workers (the grid's own cost).

Prints the three times, the ratios (b)/(a) and (a)/(c) (target <= 1.2), and whether every per-fold accuracy and macro-F1 (and test
accuracy) is identical, bit for bit. Both sides use ``--n-jobs`` workers and one BLAS/OpenMP
thread per task (the bench sets that itself; the baseline runs under the same
``threadpool_limits(1)``, so the ratio measures the reuse, not thread oversubscription, which on a
busy 2-core machine slows small fits by 10x or more).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featstack.bench import bench_rows, run_bench  # noqa: E402
from featstack.cache import SampleTable, open_cache, write_arrays_cache  # noqa: E402
from featstack.heads import create_head  # noqa: E402

DIMS = (32, 48, 64, 96, 128)


def synthetic_cache(path: Path, *, n_train: int, n_classes: int, n_backbones: int, seed: int,
                    dim: int | None = None) -> Path:
    """Class-structured random features: a shared latent class signal, seen by each backbone
    through its own random projection with its own noise level (some backbones are better)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n_train) % n_classes)
    latent = np.eye(n_classes)[y] @ rng.normal(size=(n_classes, 16)) + rng.normal(size=(n_train, 16))
    feats = {}
    for i in range(n_backbones):
        d = dim or DIMS[i % len(DIMS)]
        proj = rng.normal(size=(16, d)) / 4.0
        noise = 0.8 + 0.3 * i
        feats[f"bb{i}_{d}"] = (latent @ proj + noise * rng.normal(size=(n_train, d))).astype(np.float32)
    samples = SampleTable(ids=[f"s{i:05d}" for i in range(n_train)], labels=y,
                          splits=["train"] * n_train, classes=[f"c{c}" for c in range(n_classes)])
    write_arrays_cache(path, samples, feats)
    return path


def baseline(cache, keys, heads, cv: int, seed: int, n_jobs: int, shared: bool = False) -> tuple[dict, float]:
    """One scikit-learn StackingClassifier per (subset, head), cross-validated on the same folds
    (``shared``: per outer fold, its inner folds are the other outer folds, as featstack's
    ``stack_folds="shared"``)."""
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    train, test, _ = bench_rows(cache)
    X = cache.features(keys, rows=train, dtype=np.float32)
    y = cache.labels[train]
    Xt = cache.features(keys, rows=test, dtype=np.float32) if len(test) else None
    yt = cache.labels[test]
    cols, start = {}, 0
    for k in keys:
        d = cache.dim(k)
        cols[k] = list(range(start, start + d))
        start += d
    outer = StratifiedKFold(cv, shuffle=True, random_state=seed)
    scores = {}
    t0 = time.perf_counter()
    with threadpool_limits(limits=1):  # the bench's tasks run single-threaded too: same conditions
        _baseline_loop(keys, heads, cv, seed, n_jobs, X, y, Xt, yt, cols, outer, scores, shared)
    return scores, time.perf_counter() - t0


def floor(cache, keys, heads, cv: int, seed: int, n_jobs: int) -> float:
    """Seconds of the base fits alone (see (c) in the module docstring)."""
    from joblib import Parallel, delayed
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    train, test, _ = bench_rows(cache)
    y = cache.labels[train]
    Xs = {k: cache.features(k, rows=train, dtype=np.float32) for k in keys}
    outer = [tr for tr, _ in StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)]
    if len(test):
        outer.append(np.arange(len(y)))
    t0 = time.perf_counter()
    with threadpool_limits(limits=1):
        Parallel(n_jobs=n_jobs, batch_size=1)(delayed(_floor_fits)(Xs[k][tr], y[tr], h, cv, seed)
                                for k in keys for h in heads for tr in outer)
    return time.perf_counter() - t0


def stop_workers() -> None:
    """Shut joblib's reusable loky workers down, so the next timed run starts its own."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def _floor_fits(X, y, head: str, cv: int, seed: int) -> None:
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        for tr, _ in StratifiedKFold(cv, shuffle=True, random_state=seed).split(X, y):
            create_head(head, random_state=seed).fit(X[tr], y[tr])
        create_head(head, random_state=seed).fit(X, y)


def _baseline_loop(keys, heads, cv, seed, n_jobs, X, y, Xt, yt, cols, outer, scores, shared=False) -> None:
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import PredefinedSplit, StratifiedKFold, cross_validate
    from sklearn.pipeline import make_pipeline

    folds = list(outer.split(np.zeros(len(y)), y))
    fold_of = np.empty(len(y), dtype=int)
    for f, (_, te) in enumerate(folds):
        fold_of[te] = f

    def stack(subset, h, inner):
        return StackingClassifier(
            estimators=[(k, make_pipeline(ColumnTransformer([(k, "passthrough", cols[k])]),
                                          create_head(h, random_state=seed)))
                        for k in subset],
            final_estimator=LogisticRegression(max_iter=1000, random_state=seed), cv=inner)

    for size in range(2, len(keys) + 1):
        for subset in itertools.combinations(keys, size):
            for h in heads:
                if shared:  # per outer fold, the other outer folds are the inner folds
                    got = []
                    for tr, te in folds:
                        pred = stack(subset, h, PredefinedSplit(fold_of[tr])).fit(X[tr], y[tr]).predict(X[te])
                        got.append((accuracy_score(y[te], pred), f1_score(y[te], pred, average="macro")))
                    entry = {"accuracy": [float(a) for a, _ in got], "f1_macro": [float(b) for _, b in got]}
                    est = stack(subset, h, PredefinedSplit(fold_of))
                else:
                    est = stack(subset, h, StratifiedKFold(cv, shuffle=True, random_state=seed))
                    res = cross_validate(est, X, y, cv=outer, scoring=["accuracy", "f1_macro"], n_jobs=n_jobs)
                    entry = {"accuracy": [float(v) for v in res["test_accuracy"]],
                             "f1_macro": [float(v) for v in res["test_f1_macro"]]}
                if Xt is not None:
                    entry["test_accuracy"] = float(est.fit(X, y).score(Xt, yt))
                scores[("+".join(subset), h)] = entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="an existing cache (default: synthetic, 5 backbones)")
    ap.add_argument("--heads", default="logreg,linear-svm,gaussian-nb")
    ap.add_argument("--backbones", type=int, default=5, help="synthetic backbones (default 5)")
    ap.add_argument("--train", type=int, default=600, help="synthetic training rows (default 600)")
    ap.add_argument("--classes", type=int, default=5, help="synthetic classes (default 5)")
    ap.add_argument("--dim", type=int, default=None, help="one width for every synthetic backbone "
                    "(default: 32, 48, 64, 96, 128 in turn)")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="time featstack and the floor only (the StackingClassifier loop is the slow part)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="time featstack and the floor this many times each, alternating; keep the best")
    ap.add_argument("--stack-folds", choices=("nested", "shared"), default="nested",
                    help="featstack's stack inner folds (shared: below the floor, which stays the nested one's; "
                         "the baseline then uses the same inner folds)")
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--n-jobs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    heads = [h for h in args.heads.split(",") if h]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.cache) if args.cache else synthetic_cache(
            Path(tmp) / "grid.h5", n_train=args.train, n_classes=args.classes,
            n_backbones=args.backbones, seed=args.seed, dim=args.dim)
        cache = open_cache(path)
        keys = list(cache.backbones)
        train, test, _ = bench_rows(cache)
        n_subsets = sum(1 for s in range(2, len(keys) + 1) for _ in itertools.combinations(keys, s))
        print(f"cache      {path}: {len(keys)} backbones ({', '.join(f'{k}:{cache.dim(k)}' for k in keys)}), "
              f"{len(train)} train rows, {len(test)} test rows, {len(cache.classes)} classes")
        print(f"grid       {n_subsets} subsets (size >= 2) x {len(heads)} heads ({', '.join(heads)}) x stack, "
              f"cv {args.cv}, n_jobs {args.n_jobs}, stack folds {args.stack_folds}")

        def featstack_run():
            t0 = time.perf_counter()
            extra = {} if args.stack_folds == "nested" else {"stack_folds": args.stack_folds}
            out = run_bench(cache, heads=heads, fusions=["stack"], max_size=len(keys), cv=args.cv,
                            n_jobs=args.n_jobs, random_state=args.seed, progress=False, **extra)
            return out, time.perf_counter() - t0

        def floor_run():
            return floor(cache, keys, heads, args.cv, args.seed, args.n_jobs)

        # The two sides alternate and each keeps its best time: on a shared machine, load from
        # other jobs only ever adds time, and alternating exposes both sides to the same load.
        cold = None
        if args.n_jobs > 1:  # each side starting its own workers (what one command pays), best of --repeat
            t_cold = f_cold = float("inf")
            for _ in range(args.repeat):
                stop_workers()
                res, t = featstack_run()
                t_cold = min(t_cold, t)
                stop_workers()
                f_cold = min(f_cold, floor_run())
            cold = {"featstack_seconds": t_cold, "floor_seconds": f_cold}
        runs, floors = [], []
        for _ in range(args.repeat):
            runs.append(featstack_run())
            floors.append(floor_run())
        res, t_bench = min(runs, key=lambda r: r[1])
        t_floor = min(floors)
        warm = " warm" if cold else ""
        print(f"featstack  {t_bench:8.2f} s{warm}  (best of {args.repeat}; {res.n_base_fits} base fits, "
              f"{res.n_meta_fits} meta fits)")
        print(f"floor      {t_floor:8.2f} s{warm}  (best of {args.repeat}; base fits alone)")
        print(f"featstack / floor = {t_bench / t_floor:.2f}x{warm}  (target <= 1.2x)")
        if cold:
            print(f"starting {args.n_jobs} workers: featstack {t_cold:.2f} s, floor {f_cold:.2f} s, "
                  f"featstack / floor = {t_cold / f_cold:.2f}x  (best of {args.repeat} each)")
        if args.skip_baseline:
            return 0
        base, t_base = baseline(cache, keys, heads, args.cv, args.seed, args.n_jobs, args.stack_folds == "shared")
        per_outer = args.cv if args.stack_folds == "shared" else args.cv + 1  # inner fits + the refit
        n_base_fits = sum(len(s.split("+")) for s, _ in base) * args.cv * per_outer \
            + (sum(len(s.split("+")) for s, _ in base) * (args.cv + 1) if len(test) else 0)
        print(f"baseline   {t_base:8.2f} s  ({n_base_fits} base fits)")

    rows = {(r["backbones"], r["head"]): r for r in res.rows}
    diffs = []
    for key, want in base.items():
        got = res.folds[(key[0], key[1], "stack")]
        if got["accuracy"] != want["accuracy"] or got["f1_macro"] != want["f1_macro"]:
            diffs.append((key, got["accuracy"], want["accuracy"]))
        if "test_accuracy" in want and rows[key]["test_accuracy"] != want["test_accuracy"]:
            diffs.append((key, rows[key]["test_accuracy"], want["test_accuracy"]))
    identical = not diffs and len(base) == len(res.rows)
    ratio = t_base / t_bench
    accs = sorted(r["cv_accuracy_mean"] for r in res.rows)
    print(f"ratio      {ratio:8.1f}x  (target >= 10x)")
    print(f"identical  {identical}  ({len(base)} models x {args.cv} folds compared exactly; "
          f"cv accuracy ranges {accs[0]:.4f}..{accs[-1]:.4f})")
    for d in diffs[:5]:
        print(f"  differs: {d}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "featstack_seconds": t_bench, "baseline_seconds": t_base, "ratio": ratio,
            "floor_seconds": t_floor, "featstack_over_floor": t_bench / t_floor, "cold": cold,
            "identical": identical, "n_models": len(base), "cv": args.cv, "n_jobs": args.n_jobs,
            "heads": heads, "backbones": keys, "n_base_fits": res.n_base_fits,
            "baseline_base_fits": n_base_fits}, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
