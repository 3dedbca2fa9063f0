"""`featstack report DIR [--data SRC]`: rebuild DIR/report.html (and report.md) from the files of
a bench or run folder."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report", help="rebuild the HTML report of a bench or run folder",
        description="Rebuild DIR/report.html and DIR/report.md from what the folder holds (bench.json, the "
                    "cache it names, and the model, network and data recorded in DIR/report.json).")
    p.add_argument("folder", help="bench or run output folder (holding bench.json)")
    p.add_argument("--data", default=None,
                   help="the images the cache was extracted from, for thumbnails of misclassified test images "
                        "(default: the one recorded in report.json, if any)")
    p.add_argument("--model", default=None, help="saved model folder to report on (default: the recorded one, "
                                                  "else the bench's best configuration refitted)")
    p.add_argument("--network", default=None, help="network folder to report on (default: the recorded one)")
    return p


def run(args) -> int:
    from ..report import build_report

    path = build_report(args.folder, context={"data": args.data, "model": args.model, "network": args.network})
    print(f"wrote        {path}")
    return 0
