"""`featstack export MODEL --out NET [--cache PATH] [--onnx]`: a saved model → a full network."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export", help="turn a saved model into a full torch network (backbones + head)",
        description="Rebuild the backbones a saved model was trained on (verifying their weights "
                    "against the cache's hashes), export its head to torch, and save the whole "
                    "network as network.safetensors + network.json (no pickle). Load it with "
                    "featstack.load_network(OUT); fine-tune it with `featstack finetune`.")
    p.add_argument("model", help="saved model folder (from `featstack train`)")
    p.add_argument("--out", required=True, help="output network folder (e.g. nets/m)")
    p.add_argument("--cache", default=None,
                   help="the cache the model was trained on (default: the path the model records)")
    p.add_argument("--head-dtype", choices=["float64", "float32"], default="float64",
                   help="precision of the exported head (default float64: scikit-learn's numbers)")
    p.add_argument("--onnx", action="store_true",
                   help="also write network.onnx (needs the onnx package: pip install 'featstack[onnx]')")
    return p


def run(args) -> int:
    from ..export import NETWORK_JSON, NETWORK_TENSORS, export_model, read_network_config

    out = export_model(args.model, args.out, args.cache, head_dtype=args.head_dtype, onnx=args.onnx)
    _, cfg = read_network_config(out)
    size = (out / NETWORK_TENSORS).stat().st_size
    backbones = ", ".join(f"{b['key']} ({b['timm_name']}, {b['dim']})" for b in cfg["backbones"])
    print(f"exported {args.model} -> {out}")
    print(f"  backbones  {backbones}; input {cfg['input_side']}x{cfg['input_side']} uint8")
    print(f"  head       {cfg['meta'].get('head')} / {cfg['meta'].get('fusion')} -> {cfg['head']['type']} "
          f"({cfg['head_dtype']}), {len(cfg['classes'])} classes")
    print(f"  files      {NETWORK_TENSORS} ({size / 2**20:.1f} MiB), {NETWORK_JSON}"
          + (", network.onnx" if args.onnx else ""))
    return 0
