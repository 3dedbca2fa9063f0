"""`featstack weights convert SRC --backbone ARCH --out X.safetensors`: import a checkpoint once."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "weights", help="convert checkpoints of other libraries to a backbone's own layout",
        description="Weights files of torchvision and efficientnet_pytorch are converted on the fly by "
                    "--weights-file; `weights convert` writes the converted tensors once, as safetensors, "
                    "with the source file's sha256 in its metadata.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    c = actions.add_parser("convert", help="convert one checkpoint file",
                           description="Fit SRC to the backbone (strictly: every tensor used once, equal "
                                       "shapes) and write it, classifier included, as one .safetensors file.")
    c.add_argument("src", help="checkpoint file (.pth/.pt/.bin/.safetensors, or package:MODULE/PATH)")
    c.add_argument("--backbone", required=True, help="backbone key: a timm model name or tv:NAME")
    c.add_argument("--out", required=True, help="output .safetensors path")
    c.add_argument("--overwrite", action="store_true", help="replace an --out converted from another file (default: off)")
    return p


def run(args) -> int:
    from ..backbones import resolve_weights_path
    from ..checkpoints import convert_file

    res = convert_file(resolve_weights_path(args.src), args.backbone, args.out, overwrite=args.overwrite)
    if res["written"]:
        print(f"{res['out']}: {res['tensors']} tensors for {res['backbone']} from {res['source_file']} "
              f"({res['source_layout']} layout, sha256 {res['source_sha256'][:12]})")
    else:
        print(f"{res['out']}: already converted from this file (sha256 {res['source_sha256'][:12]}); left as is")
    return 0
