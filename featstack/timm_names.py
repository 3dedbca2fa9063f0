"""timm's model names without importing timm (which imports torch and torchvision: ~8 s).

``featstack run --check`` and a pipeline run whose extraction is skipped must not pay for torch,
yet an unknown backbone name should still fail at check time. timm registers every model with
``@register_model`` above a ``def <name>(...)`` and deprecated aliases with
``register_model_deprecations(__name__, {...})``, all in ``timm/models/*.py``; reading those
files (about 50 ms) gives the same set as ``timm.is_model`` (a test compares the two). When the
sources cannot be read (timm missing, or zipped), the functions fall back to importing timm.
"""
from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

_MODEL = re.compile(r"@register_model\s*(?:\([^)]*\))?\s*\ndef\s+(\w+)")
_DEPRECATIONS = re.compile(r"register_model_deprecations\(\s*__name__\s*,\s*\{(.*?)\}\s*\)", re.S)
_DEPRECATED_KEY = re.compile(r"['\"]([\w.\-]+)['\"]\s*:")


@functools.lru_cache(maxsize=1)
def _scan() -> frozenset[str] | None:
    """Every registered architecture name, or None when timm's sources are not readable."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.origin:
        return None
    models = Path(spec.origin).parent / "models"
    names: set[str] = set()
    try:
        for file in sorted(models.glob("*.py")):
            text = file.read_text(encoding="utf-8")
            if "register_model" not in text:
                continue
            names.update(_MODEL.findall(text))
            for block in _DEPRECATIONS.findall(text):
                names.update(_DEPRECATED_KEY.findall(block))
    except OSError:
        return None
    return frozenset(names) or None


def arch_name(name: str) -> str:
    """``vit_base_patch16_224.augreg_in21k`` → ``vit_base_patch16_224`` (timm's pretrained tag off)."""
    return name.split(".", 1)[0]


def is_model(name: str) -> bool:
    """``timm.is_model(name)``, answered from timm's sources when they are readable."""
    names = _scan()
    if names is None:
        import timm
        return bool(timm.is_model(name))
    return arch_name(name) in names


def list_models() -> list[str]:
    """Every timm architecture name (deprecated aliases included), sorted; for suggestions."""
    names = _scan()
    if names is None:
        import timm
        return list(timm.list_models())
    return sorted(names)
