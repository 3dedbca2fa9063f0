"""`featstack report DIR [--data SRC]`: rebuild DIR/report.html (and report.md) from the files of
a bench or run folder."""
from __future__ import annotations

import argparse

from ..config import ReportConfig, from_args, stage_parser


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `featstack report`: its options are the fields of ReportConfig."""
    return stage_parser(
        sub, "report", ReportConfig, help="rebuild the HTML report of a bench or run folder",
        description="Rebuild DIR/report.html and DIR/report.md from what the folder holds (bench.json, the "
                    "cache it names, and the model, network and data recorded in DIR/report.json).")


def run(args) -> int:
    from ..report import build_report

    cfg = from_args(ReportConfig, args)
    path = build_report(cfg.out, context={"data": cfg.data, "model": cfg.model, "network": cfg.network})
    print(f"wrote        {path}")
    return 0
