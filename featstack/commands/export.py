"""`featstack export MODEL --out NET [--cache PATH] [--onnx]`: a saved model → a full network."""
from __future__ import annotations

import argparse

from ..config import ExportConfig, api_kwargs, from_args, stage_parser


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `featstack export`: its options are the fields of ExportConfig."""
    return stage_parser(
        sub, "export", ExportConfig, help="turn a saved model into a full torch network (backbones + head)",
        description="Rebuild the backbones a saved model was trained on (verifying their weights "
                    "against the cache's hashes), export its head to torch, and save the whole "
                    "network as network.safetensors + network.json (no pickle). Load it with "
                    "featstack.load_network(OUT); fine-tune it with `featstack finetune`.")


def run(args) -> int:
    from ..export import NETWORK_JSON, NETWORK_TENSORS, export_model, read_network_config

    settings = from_args(ExportConfig, args)
    out = export_model(**api_kwargs(settings))
    _, cfg = read_network_config(out)
    size = (out / NETWORK_TENSORS).stat().st_size
    backbones = ", ".join(f"{b['key']} ({b['timm_name']}, {b['dim']})" for b in cfg["backbones"])
    print(f"exported {settings.model} -> {out}")
    print(f"  backbones  {backbones}; input {cfg['input_side']}x{cfg['input_side']} uint8")
    print(f"  head       {cfg['meta'].get('head')} / {cfg['meta'].get('fusion')} -> {cfg['head']['type']} "
          f"({cfg['head_dtype']}), {len(cfg['classes'])} classes")
    print(f"  files      {NETWORK_TENSORS} ({size / 2**20:.1f} MiB), {NETWORK_JSON}"
          + (", network.onnx" if settings.onnx else ""))
    return 0
