"""`featstack bench CACHE`: cross-validate every backbone combination × head × fusion."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import BenchConfig, api_kwargs, from_args, stage_parser


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `featstack bench`: its options are the fields of BenchConfig."""
    return stage_parser(
        sub, "bench", BenchConfig, help="compare backbone combinations x heads x fusions by cross-validation",
        description="Evaluate every combination of the cached backbones (up to --max-size) x head x "
                    "fusion with stratified k-fold CV on the training split (and on the test split "
                    "after a refit, when it exists). Base heads are fitted once per backbone and "
                    "reused by every combination. Writes results.csv, results.md, bench.json, "
                    "heatmap.png, best_by_size.png and report.html to --out.")


def default_out(cache: str) -> Path:
    """runs/<cache stem>: where a bench of ``cache`` writes when no --out is given."""
    return Path("runs") / Path(cache).stem


def run(args) -> int:
    from ..bench import pick_line, run_bench
    from ..bounds import check_output_dir, check_seed
    from ..cache import open_cache

    cfg = from_args(BenchConfig, args)
    check_seed(cfg.seed)
    cache = open_cache(cfg.cache)
    out = check_output_dir(Path(cfg.out) if cfg.out else default_out(cfg.cache))  # before the grid runs
    res = run_bench(cache, **api_kwargs(cfg, skip=("cache", "out")), out=out)
    excluded = f", {res.n_excluded} excluded (decode errors)" if res.n_excluded else ""
    test = f"{res.n_test} test rows" if res.n_test else "no labelled test split"
    print(f"bench        {len(res.rows)} models on {res.n_train} training rows{excluded}; {test}")
    print(f"fits         {res.n_base_fits} base (shared by all combinations), {res.n_concat_fits} concat, "
          f"{res.n_meta_fits} meta-learner; {res.seconds:.1f} s")
    if res.warnings:
        print(f"warnings     {len(res.warnings)} distinct from the fits, listed in bench.json; the first: "
              f"{res.warnings[0]}")
    print()
    print(res.table(top=cfg.top))
    print()
    print(f"best         {pick_line(res.rows)}")
    print(f"written      {out}/results.csv, results.md, bench.json, heatmap.png, best_by_size.png")
    if cfg.report:
        from ..report import build_report

        print(f"report       {build_report(out, context={'data': cfg.data}, cache=cache)}")
    return 0
