"""Cache read speed beside plain NumPy on the same bytes, in the same run.

    python benchmarks/bench_cache.py [--rows 50000] [--dim 2048] [--dtype float16]
        [--fraction 0.1] [--repeat 5] [--dir DIR]

Builds a cache with the real writer (``featstack.cache.write_arrays_cache``: shards, checksums,
index) in a temporary folder, and saves the same array with ``np.save`` beside it. Then, page
cache warm, best of ``--repeat``:

* full read: ``Cache.features(key)`` (float32 out) against ``np.load(path).astype(float32)``;
* sorted random subset (``--fraction`` of the rows): ``Cache.features(key, rows=idx)`` against
  ``np.load(path, mmap_mode="r")[idx].astype(float32)``.

Every ``features`` call is timed on a freshly opened reader, so it includes the shard checks
(row range, fingerprint, readability: each shard file opened once) a first read pays; the
"again" column is a second read on the same reader (the checks are then one stat per shard).
Targets (issue 14): full ≤ 1.3x, subset ≤ 3x.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_preprocess import best_seconds  # noqa: E402  (this folder is on sys.path when run as a script)


def best_of(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls (reads wait on the disk, not only the CPU)."""
    return best_seconds(fn, repeat, clock=time.perf_counter)


def timed_fresh(path: Path, key: str, rows, repeat: int) -> tuple[float, float]:
    """(best first read on a fresh reader, best second read on the same reader)."""
    from featstack.cache import open_cache

    first, again = [], []
    for _ in range(repeat):
        c = open_cache(path)
        t0 = time.perf_counter()
        c.features(key, rows=rows)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        c.features(key, rows=rows)
        again.append(time.perf_counter() - t0)
    return min(first), min(again)


def build(root: Path, n: int, d: int, dtype: str, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    from featstack.cache import SampleTable, write_arrays_cache

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d), dtype=np.float32).astype(dtype)
    samples = SampleTable(ids=[f"s{i}" for i in range(n)], labels=np.arange(n) % 10,
                          splits=["train"] * n, classes=[f"c{i}" for i in range(10)])
    cache = root / "x.h5"
    write_arrays_cache(cache, samples, {"f": X}, dtype=dtype)
    npy = root / "x.npy"
    np.save(npy, X)
    return cache, npy, X


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to build the cache (default: a temp folder)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        t0 = time.perf_counter()
        cache, npy, X = build(Path(tmp), a.rows, a.dim, a.dtype)
        print(f"{a.rows:,} x {a.dim} {a.dtype}: cache built in {time.perf_counter() - t0:.1f} s "
              f"({X.nbytes / 2**20:.0f} MiB); best of {a.repeat}, page cache warm", flush=True)
        idx = np.sort(np.random.default_rng(1).choice(a.rows, int(a.rows * a.fraction), replace=False))
        from featstack.cache import open_cache
        np.testing.assert_array_equal(open_cache(cache).features("f"), X.astype(np.float32))
        np.testing.assert_array_equal(open_cache(cache).features("f", rows=idx), X[idx].astype(np.float32))
        base_full = best_of(lambda: np.load(npy).astype(np.float32), a.repeat)
        base_sub = best_of(lambda: np.load(npy, mmap_mode="r")[idx].astype(np.float32), a.repeat)
        full, full2 = timed_fresh(cache, "f", None, a.repeat)
        sub, sub2 = timed_fresh(cache, "f", idx, a.repeat)
    print(f"{'read':<28}{'featstack s':>12}{'again s':>9}{'numpy s':>9}{'ratio':>7}{'again':>7}  target")
    print(f"{'full':<28}{full:>12.3f}{full2:>9.3f}{base_full:>9.3f}{full / base_full:>6.2f}x"
          f"{full2 / base_full:>6.2f}x  <= 1.3x np.load + astype")
    print(f"{f'sorted random {a.fraction:.0%} rows':<28}{sub:>12.3f}{sub2:>9.3f}{base_sub:>9.3f}"
          f"{sub / base_sub:>6.2f}x{sub2 / base_sub:>6.2f}x  <= 3x memory-mapped index")
    return 0


if __name__ == "__main__":
    sys.exit(main())
