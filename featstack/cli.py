"""`featstack` command line. Each subcommand lives in ``featstack/commands/<name>.py`` with
``add_parser(subparsers)`` and ``run(args) -> int``; heavy imports (torch, timm) happen inside
``run`` only, so `featstack bench` starts fast and never loads the GPU side."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import FeatstackError

COMMANDS = ["run", "extract", "info", "verify", "bench", "train", "predict", "evaluate", "export", "finetune",
            "report", "weights"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featstack",
        description="Extract embeddings from several vision backbones once, then train and "
                    "compare classifiers on a CPU.")
    parser.add_argument("--version", action="version", version=f"featstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"featstack.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"featstack.commands.{name}":
                raise
            continue
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except FeatstackError as e:
        print(f"featstack {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"featstack {args.command}: interrupted; completed shards are kept, re-run to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
