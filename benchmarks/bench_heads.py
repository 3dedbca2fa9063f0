"""Head fit times at real sizes, beside a direct scikit-learn LogisticRegression in the same run.

    python benchmarks/bench_heads.py [--quick] [--heads logreg,linear-svm,svm-rbf,gaussian-nb]
        [--sizes 5000,20000] [--dims 768,2048] [--classes 20] [--cv 5] [--n-jobs 2]

Synthetic class-structured embeddings (class centres in a 64-dim latent space, a random
ReLU projection to D columns plus noise: about 0.6-0.7 accuracy at 20 classes, like a hard
fine-grained task). For each (N, D): the 5-fold cross-validated accuracy and wall time of every
featstack head (``featstack.heads.create_head``, the estimator ``featstack bench`` fits) and of
``cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()))`` on the same data and
folds, with the ratio head time / direct time. ``--quick``: N=2,000, D=768, for a smoke run.
``--heads svm-rbf,svm-rbf-exact`` puts svm-rbf (Nystroem + linear SVM from 2,000 training rows
on) beside the exact SVC. Run it with one BLAS thread (``OPENBLAS_NUM_THREADS=1``; the script
also limits BLAS to one thread per job).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_features(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = 64
    centres = rng.normal(0, 1, (classes, k))
    y = rng.permutation(np.arange(n) % classes)
    z = centres[y] + rng.normal(0, 3.0, (n, k))
    W = rng.normal(0, 1 / np.sqrt(k), (k, d))
    X = np.maximum(z @ W + rng.normal(0, 0.5, (n, d)), 0)
    return X.astype(np.float32), y


def cv_time(est, X, y, cv, n_jobs) -> tuple[float, float]:
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    t0 = time.perf_counter()
    acc = cross_val_score(est, X, y, cv=StratifiedKFold(cv, shuffle=True, random_state=0), n_jobs=n_jobs)
    return time.perf_counter() - t0, float(acc.mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default="logreg,linear-svm,svm-rbf,gaussian-nb")
    p.add_argument("--sizes", default="5000,20000")
    p.add_argument("--dims", default="768,2048")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--cv", type=int, default=5)
    p.add_argument("--n-jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true", help="N=2000, D=768 only")
    a = p.parse_args(argv)
    from threadpoolctl import threadpool_limits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featstack.heads import create_head

    sizes = [2000] if a.quick else [int(s) for s in a.sizes.split(",")]
    dims = [768] if a.quick else [int(s) for s in a.dims.split(",")]
    heads = a.heads.split(",")
    print(f"{a.classes} classes, cv {a.cv}, n_jobs {a.n_jobs}, one BLAS thread per job, {os.cpu_count()} cores",
          flush=True)
    print(f"{'N':>6} {'D':>5} {'head':<14}{'head s':>9}{'direct s':>10}{'ratio':>7}{'head acc':>10}{'direct acc':>11}",
          flush=True)
    total = {}
    with threadpool_limits(1):
        Xw, yw = make_features(100, 8, 2)
        cv_time(LogisticRegression(), Xw, yw, a.cv, a.n_jobs)  # start the workers outside the timings
        for n in sizes:
            for d in dims:
                X, y = make_features(n, d, a.classes)
                direct = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
                d_s, d_acc = cv_time(direct, X, y, a.cv, a.n_jobs)
                for h in heads:
                    h_s, h_acc = cv_time(create_head(h), X, y, a.cv, a.n_jobs)
                    total[(n, d)] = total.get((n, d), 0.0) + h_s
                    print(f"{n:>6} {d:>5} {h:<14}{h_s:>9.1f}{d_s:>10.1f}{h_s / d_s:>6.1f}x{h_acc:>10.3f}{d_acc:>11.3f}",
                          flush=True)
                print(f"{n:>6} {d:>5} {'all heads':<14}{total[(n, d)]:>9.1f}{d_s:>10.1f}"
                      f"{total[(n, d)] / d_s:>6.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
