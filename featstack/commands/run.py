"""`featstack run PIPELINE.yaml`: every stage the file names, skipping what is already valid."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run", help="run a YAML pipeline (extract → bench → train → export → finetune → report)",
        description="Validate the pipeline file, then run every stage it names. Stages whose outputs "
                    "are already valid are skipped, so editing the heads and re-running does no "
                    "extraction.")
    p.add_argument("pipeline", help="pipeline file, e.g. pipelines/demo.yaml")
    p.add_argument("--check", action="store_true", help="only validate the file and exit (default: off)")
    p.add_argument("--top", type=int, default=None,
                   help="bench rows to print at the end (default: the file's bench.top, see `featstack bench "
                        "--help`)")
    return p


def run(args) -> int:
    from ..pipeline import load_pipeline, run_pipeline

    if args.check:
        p = load_pipeline(args.pipeline)
        print(f"{args.pipeline}: valid ({len(p.backbones)} backbones, stages "
              f"{', '.join(s for s, v in p.stages.items() if v is not None)})")
        return 0
    res = run_pipeline(args.pipeline)
    bench = load_pipeline(args.pipeline).stages["bench"]
    top = args.top if args.top is not None else (bench.top if bench is not None else 0)
    _print_top(Path(res.out) / "results.csv", top)
    print("stages   " + ", ".join(f"{k} {v}" for k, v in res.stages.items()))
    print(f"cache    {res.cache}")
    if res.best:
        print(f"best     {res.best['backbones']} / {res.best['head']} / {res.best['fusion']}")
    if res.model:
        print(f"model    {res.model}")
    if res.network:
        print(f"network  {res.network}")
    if res.report:
        print(f"report   {res.report}")
    return 0


def _print_top(results: Path, n: int) -> None:
    """The first rows of the ranked bench table, so the answer is on screen without the report."""
    if n <= 0 or not results.is_file():
        return
    with open(results, newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    if not rows:
        return
    print(f"{'rank':>4}  {'backbones':<32} {'head':<14} {'fusion':<7} {'cv acc':>14} {'test acc':>8}  random init")
    for r in rows:
        cv = f"{float(r['cv_accuracy_mean']):.4f}±{float(r['cv_accuracy_std']):.4f}"
        test = f"{float(r['test_accuracy']):.4f}" if r.get("test_accuracy") not in (None, "", "nan") else "-"
        init = f"RANDOM INIT: {r['random_init']}" if r.get("random_init") else ""
        print(f"{r.get('rank', ''):>4}  {r['backbones']:<32} {r['head']:<14} {r['fusion']:<7} {cv:>14} {test:>8}  "
              f"{init}".rstrip())
