"""`featstack run PIPELINE.yaml`: every stage the file names, skipping what is already valid."""
from __future__ import annotations

import argparse
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
    _print_top(Path(res.out) / "bench.json", top)
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


def _print_top(doc: Path, n: int) -> None:
    """The first rows of the ranked bench table (as `featstack bench` prints it, from bench.json),
    so the answer is on screen without the report."""
    if n <= 0 or not doc.is_file():
        return
    import json

    from ..bench import format_table

    rows = json.loads(doc.read_text()).get("rows") or []
    if rows:
        print(format_table(rows, top=n))
