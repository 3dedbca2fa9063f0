"""featstack: embeddings from several vision backbones, cached once, many CPU classifiers.

The top-level names are imported lazily so that the CPU side (``open_cache``, heads, bench)
never pulls in torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "open_cache": ("featstack.cache", "open_cache"),
    "Cache": ("featstack.cache", "Cache"),
    "SampleTable": ("featstack.cache", "SampleTable"),
    "open_source": ("featstack.data", "open_source"),
    "extract_features": ("featstack.extract", "extract"),
    "create_head": ("featstack.heads", "create_head"),
    "list_heads": ("featstack.heads", "list_heads"),
    "register_head": ("featstack.heads", "register_head"),
    "list_fusions": ("featstack.fusion", "list_fusions"),
    "register_fusion": ("featstack.fusion", "register_fusion"),
    "list_backbone_sources": ("featstack.backbones", "list_backbone_sources"),
    "build_backbone": ("featstack.backbones", "build_backbone"),
    "load_model": ("featstack.models", "load_model"),
    "run_bench": ("featstack.bench", "run_bench"),
    "train_model": ("featstack.models", "train_model"),
    "build_model": ("featstack.fusion", "build_model"),
    "export_head": ("featstack.export", "export_head"),
    "export_model": ("featstack.export", "export_model"),
    "FeatstackNet": ("featstack.export", "FeatstackNet"),
    "load_network": ("featstack.export", "load_network"),
    "finetune": ("featstack.finetune", "finetune"),
    "run_pipeline": ("featstack.pipeline", "run_pipeline"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'featstack' has no attribute {name!r}")
