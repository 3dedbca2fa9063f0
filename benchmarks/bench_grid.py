"""Bench grid speed: featstack's reuse of per-backbone fits against one StackingClassifier per subset.

    python benchmarks/bench_grid.py [--cache PATH] [--heads logreg,linear-svm,gaussian-nb]
        [--backbones 5] [--train 600] [--classes 5] [--cv 5] [--n-jobs 1] [--seed 0] [--json PATH]

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

Prints both times, the ratio (b)/(a), and whether every per-fold accuracy and macro-F1 (and test
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featstack.bench import bench_rows, run_bench  # noqa: E402
from featstack.cache import SampleTable, open_cache, write_arrays_cache  # noqa: E402
from featstack.heads import create_head  # noqa: E402

DIMS = (32, 48, 64, 96, 128)


def synthetic_cache(path: Path, *, n_train: int, n_classes: int, n_backbones: int, seed: int) -> Path:
    """Class-structured random features: a shared latent class signal, seen by each backbone
    through its own random projection with its own noise level (some backbones are better)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n_train) % n_classes)
    latent = np.eye(n_classes)[y] @ rng.normal(size=(n_classes, 16)) + rng.normal(size=(n_train, 16))
    feats = {}
    for i in range(n_backbones):
        d = DIMS[i % len(DIMS)]
        proj = rng.normal(size=(16, d)) / 4.0
        noise = 0.8 + 0.3 * i
        feats[f"bb{i}_{d}"] = (latent @ proj + noise * rng.normal(size=(n_train, d))).astype(np.float32)
    samples = SampleTable(ids=[f"s{i:05d}" for i in range(n_train)], labels=y,
                          splits=["train"] * n_train, classes=[f"c{c}" for c in range(n_classes)])
    write_arrays_cache(path, samples, feats)
    return path


def baseline(cache, keys, heads, cv: int, seed: int, n_jobs: int) -> tuple[dict, float]:
    """One scikit-learn StackingClassifier per (subset, head), cross-validated on the same folds."""
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
        _baseline_loop(keys, heads, cv, seed, n_jobs, X, y, Xt, yt, cols, outer, scores)
    return scores, time.perf_counter() - t0


def _baseline_loop(keys, heads, cv, seed, n_jobs, X, y, Xt, yt, cols, outer, scores) -> None:
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.pipeline import make_pipeline

    for size in range(2, len(keys) + 1):
        for subset in itertools.combinations(keys, size):
            for h in heads:
                est = StackingClassifier(
                    estimators=[(k, make_pipeline(ColumnTransformer([(k, "passthrough", cols[k])]),
                                                  create_head(h, random_state=seed)))
                                for k in subset],
                    final_estimator=LogisticRegression(max_iter=1000, random_state=seed),
                    cv=StratifiedKFold(cv, shuffle=True, random_state=seed))
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
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--n-jobs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    heads = [h for h in args.heads.split(",") if h]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.cache) if args.cache else synthetic_cache(
            Path(tmp) / "grid.h5", n_train=args.train, n_classes=args.classes,
            n_backbones=args.backbones, seed=args.seed)
        cache = open_cache(path)
        keys = list(cache.backbones)
        train, test, _ = bench_rows(cache)
        n_subsets = sum(1 for s in range(2, len(keys) + 1) for _ in itertools.combinations(keys, s))
        print(f"cache      {path}: {len(keys)} backbones ({', '.join(f'{k}:{cache.dim(k)}' for k in keys)}), "
              f"{len(train)} train rows, {len(test)} test rows, {len(cache.classes)} classes")
        print(f"grid       {n_subsets} subsets (size >= 2) x {len(heads)} heads ({', '.join(heads)}) x stack, "
              f"cv {args.cv}, n_jobs {args.n_jobs}")

        t0 = time.perf_counter()
        res = run_bench(cache, heads=heads, fusions=["stack"], max_size=len(keys), cv=args.cv,
                        n_jobs=args.n_jobs, random_state=args.seed, progress=False)
        t_bench = time.perf_counter() - t0
        print(f"featstack  {t_bench:8.2f} s  ({res.n_base_fits} base fits, {res.n_meta_fits} meta fits)")

        base, t_base = baseline(cache, keys, heads, args.cv, args.seed, args.n_jobs)
        n_base_fits = sum(len(s.split("+")) for s, _ in base) * args.cv * (args.cv + 1) \
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
            "identical": identical, "n_models": len(base), "cv": args.cv, "n_jobs": args.n_jobs,
            "heads": heads, "backbones": keys, "n_base_fits": res.n_base_fits,
            "baseline_base_fits": n_base_fits}, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
