"""`featstack bench CACHE`: cross-validate every backbone combination × head × fusion."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="compare backbone combinations x heads x fusions by cross-validation",
        description="Evaluate every combination of the cached backbones (up to --max-size) x head x "
                    "fusion with stratified k-fold CV on the training split (and on the test split "
                    "after a refit, when it exists). Base heads are fitted once per backbone and "
                    "reused by every combination. Writes results.csv, results.md, bench.json, "
                    "heatmap.png and best_by_size.png to --out.")
    p.add_argument("cache", help="path of the cache index file (e.g. cache/x.h5)")
    p.add_argument("--heads", default="logreg,linear-svm,svm-rbf,gaussian-nb",
                   help="comma-separated head names (default: %(default)s)")
    p.add_argument("--fusions", default="single,concat,vote,stack",
                   help="comma-separated fusions: single (size 1), concat, vote, stack (size >= 2) "
                        "(default: %(default)s)")
    p.add_argument("--backbones", default=None,
                   help="comma-separated backbone keys (default: every complete backbone of the cache)")
    p.add_argument("--max-size", type=int, default=3, help="largest combination size (default 3)")
    p.add_argument("--cv", type=int, default=5, help="stratified folds (default 5)")
    p.add_argument("--n-jobs", type=int, default=2, help="joblib workers (default 2; -1 = all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and heads (default 0)")
    p.add_argument("--tune", action="store_true",
                   help="choose each head's regularisation by inner CV on the training rows")
    p.add_argument("--out", default=None, help="output folder (default: runs/<cache name>)")
    p.add_argument("--backend", default="loky", choices=["loky", "threading", "dask"],
                   help="joblib backend (dask: a dask.distributed cluster, needs featstack[dask])")
    p.add_argument("--scheduler", default=None,
                   help="dask scheduler address, e.g. tcp://host:8786 (default: $DASK_SCHEDULER_ADDRESS, "
                        "else a local cluster with --n-jobs workers)")
    fs = p.add_mutually_exclusive_group()
    fs.add_argument("--share-fs", dest="share_fs", action="store_true", default=None,
                    help="dask workers read the cache by path (default for local schedulers)")
    fs.add_argument("--scatter", dest="share_fs", action="store_false",
                    help="send the feature arrays to the dask workers (default for remote schedulers)")
    p.add_argument("--top", type=int, default=20, help="rows of the ranked table to print (default 20)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run(args) -> int:
    from ..bench import run_bench
    from ..bounds import check_int, check_output_dir, check_seed
    from ..cache import open_cache

    check_seed(args.seed)
    check_int(args.cv, "--cv", 2)
    check_int(args.max_size, "--max-size", 1)
    cache = open_cache(args.cache)
    out = check_output_dir(Path(args.out) if args.out else Path("runs") / Path(args.cache).stem)
    res = run_bench(cache, heads=args.heads, fusions=args.fusions, backbones=args.backbones,
                    max_size=args.max_size, cv=args.cv, n_jobs=args.n_jobs, random_state=args.seed,
                    tune=args.tune, out=out, backend=args.backend, scheduler=args.scheduler,
                    share_fs=args.share_fs, progress=args.progress)
    excluded = f", {res.n_excluded} excluded (decode errors)" if res.n_excluded else ""
    test = f"{res.n_test} test rows" if res.n_test else "no labelled test split"
    print(f"bench        {len(res.rows)} models on {res.n_train} training rows{excluded}; {test}")
    print(f"fits         {res.n_base_fits} base (shared by all combinations), {res.n_concat_fits} concat, "
          f"{res.n_meta_fits} meta-learner; {res.seconds:.1f} s")
    print()
    print(res.table(top=args.top))
    print()
    best = res.best()
    print(f"best         {best['backbones']} / {best['head']} / {best['fusion']}: cv accuracy "
          f"{best['cv_accuracy_mean']:.4f} ± {best['cv_accuracy_std']:.4f}")
    print(f"written      {out}/results.csv, results.md, bench.json, heatmap.png, best_by_size.png")
    return 0
