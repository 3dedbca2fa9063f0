"""Checkpoint importers: weights saved by another library, loaded into the model of a backbone.

A weights file is read with ``weights_only=True`` (or as safetensors) and fitted to the model:

* same names (timm's own checkpoints; torchvision's ResNets, whose names timm kept) → as is;
* otherwise a recognised foreign layout (:data:`LAYOUTS`: torchvision's ``features.N…``
  models such as MobileNetV2 and EfficientNet, efficientnet_pytorch's ``_conv_stem``/``_blocks``)
  is converted module by module, in order: the i-th module holding tensors in the file becomes
  the i-th such module of the model when both hold the same tensor names (weight, bias,
  running_mean, ...) with equal shapes. What is left at the end of the file must be one linear
  classifier, which is kept apart (the embedding model has none).

The check is strict: every tensor of the file is used once, every tensor of the model is filled,
shapes are equal; otherwise one error lists the first mismatches. Nothing is loaded by guessing
from shapes alone.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import BackboneError

if TYPE_CHECKING:  # torch loads only when a checkpoint is read: sha256_file stays light
    import torch

# ``num_batches_tracked`` only counts BatchNorm updates; older checkpoints lack it.
_OPTIONAL_LEAVES = ("num_batches_tracked",)


@dataclass(frozen=True)
class Layout:
    """A checkpoint key layout of another library, recognised by its keys."""

    name: str
    detect: Callable[[list], bool]
    example: str  # an architecture that uses it, for messages


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> None:
    """Add a recognised checkpoint layout (converted by module order, see the module docstring)."""
    LAYOUTS[layout.name] = layout


register_layout(Layout("torchvision", lambda keys: any(k.startswith("features.0.") for k in keys),
                       "torchvision mobilenet_v2 / efficientnet_b0 / vgg16 / alexnet"))
register_layout(Layout("efficientnet_pytorch", lambda keys: "_conv_stem.weight" in keys,
                       "efficientnet_pytorch EfficientNet / EfficientNet-Lite"))
register_layout(Layout("timm", lambda keys: "conv_stem.weight" in keys or "blocks.0.0.conv_dw.weight" in keys,
                       "timm mobilenetv2_100 / efficientnet_lite0"))


def detect_layout(keys) -> str | None:
    keys = list(keys)
    for layout in LAYOUTS.values():
        if layout.detect(keys):
            return layout.name
    return None


@dataclass
class FittedState:
    """A checkpoint fitted to a model: ``state`` loads strictly into it; ``classifier`` holds the
    file's classifier tensors (``weight``, ``bias``) that the embedding model has no place for."""

    state: dict
    classifier: dict = field(default_factory=dict)
    layout: str = "same names"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Tensors of a .safetensors/.pth/.pt/.bin file (``state_dict``/EMA wrappers unwrapped by
    timm's reader; pickles only with ``weights_only=True``; ``module.`` prefixes dropped)."""
    import torch
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch/safetensors errors come in many types
        raise BackboneError(f"{path}: cannot read weights ({type(e).__name__}: {str(e)[:200]})") from e
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def _modules(names) -> list[tuple[str, list[str]]]:
    """(module prefix, its tensor leaves) in order of first appearance."""
    out: dict[str, list[str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        out.setdefault(prefix, []).append(leaf)
    return list(out.items())


def _required(leaves) -> set:
    return {leaf for leaf in leaves if leaf not in _OPTIONAL_LEAVES}


def _is_classifier(prefix: str, classifier_names) -> bool:
    return any(prefix == c or prefix.startswith(c + ".") for c in classifier_names)


def _mismatch_error(path, arch: str, layout: str, problems: list, n_file: int, n_model: int) -> BackboneError:
    shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
    return BackboneError(
        f"{path} ({layout} layout, {n_file} tensors) does not fit {arch!r} ({n_model} tensors): {shown}")


def fit_state_dict(state: dict, model: torch.nn.Module, *, classifier_names=(), arch: str = "",
                   path: str | os.PathLike = "weights") -> FittedState:
    """Fit a checkpoint's tensors to ``model`` (see the module docstring); BackboneError if the
    file does not fit, naming the first mismatches."""
    own = model.state_dict()
    own_shapes = {k: tuple(v.shape) for k, v in own.items()}
    # 1. same names: the model's tensors plus, at most, a classifier
    if all(k in state or k.rpartition(".")[2] in _OPTIONAL_LEAVES for k in own):
        extra = [k for k in state if k not in own]
        if all(_is_classifier(k.rpartition(".")[0], classifier_names) for k in extra):
            bad = [f"{k} has shape {tuple(state[k].shape)}, the model's {own_shapes[k]}"
                   for k in own if k in state and tuple(state[k].shape) != own_shapes[k]]
            if bad:
                raise _mismatch_error(path, arch, "same-name", bad, len(state), len(own))
            fitted = {k: state[k] for k in own if k in state}
            fitted.update({k: own[k].clone() for k in own if k not in state})
            cls = {k.rpartition(".")[2]: state[k] for k in extra}
            return FittedState(fitted, cls, "same names")
    layout = detect_layout(state)
    if layout is None:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own and not _is_classifier(k.rpartition(".")[0], classifier_names)]
        raise BackboneError(
            f"{path} does not fit {arch!r} and its key layout is not one featstack converts "
            f"({', '.join(LAYOUTS)}): missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    return _fit_by_module_order(state, own, layout, arch, path)


def _fit_by_module_order(state: dict, own: dict, layout: str, arch: str, path) -> FittedState:
    src, dst = _modules(state), _modules(own)
    problems: list[str] = []
    fitted: dict = {}
    for i, (dst_prefix, dst_leaves) in enumerate(dst):
        if i >= len(src):
            problems.append(f"model tensors from {dst_prefix} on have no counterpart in the file "
                            f"({len(dst) - i} modules)")
            break
        src_prefix, src_leaves = src[i]
        if _required(src_leaves) != _required(dst_leaves):
            problems.append(f"file module {src_prefix} holds {sorted(src_leaves)}, model module "
                            f"{dst_prefix} holds {sorted(dst_leaves)}")
            continue
        for leaf in dst_leaves:
            name = f"{dst_prefix}.{leaf}" if dst_prefix else leaf
            if leaf not in src_leaves:  # an optional counter the file lacks
                fitted[name] = own[name].clone()
                continue
            t = state[f"{src_prefix}.{leaf}" if src_prefix else leaf]
            if tuple(t.shape) != tuple(own[name].shape):
                problems.append(f"{src_prefix}.{leaf} {tuple(t.shape)} → {name} {tuple(own[name].shape)}")
            fitted[name] = t
    leftover = src[len(dst):]
    classifier: dict = {}
    if leftover and not problems:
        (prefix, leaves), rest = leftover[0], leftover[1:]
        w = state.get(f"{prefix}.weight")
        if rest or w is None or set(leaves) - {"weight", "bias"} or w.ndim not in (2, 4):
            unused = [p for p, _ in leftover]
            problems.append(f"file modules {unused[:4]}{'...' if len(unused) > 4 else ''} are left over "
                            "after the model's (only one linear classifier may be)")
        else:
            classifier = {leaf: state[f"{prefix}.{leaf}"] for leaf in leaves}
            if w.ndim == 4:
                classifier["weight"] = w.flatten(1)
    if problems:
        raise _mismatch_error(path, arch, layout, problems, len(state), len(own))
    return FittedState(fitted, classifier, layout)


def load_weights_file(model: torch.nn.Module, path: str | os.PathLike, *, classifier_names=(),
                      arch: str = "") -> FittedState:
    """Read ``path``, fit it to ``model`` and load it strictly; returns what was fitted (with the
    file's classifier tensors, if any)."""
    fitted = fit_state_dict(read_checkpoint(path), model, classifier_names=classifier_names, arch=arch,
                            path=path)
    model.load_state_dict(fitted.state, strict=True)
    return fitted


def convert_file(src: str | os.PathLike, arch: str, out: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """`featstack weights convert`: write ``src`` fitted to ``arch`` (a backbone key: a timm name
    or ``tv:NAME``) as one safetensors file, classifier included under the model's own
    classifier name, with the source file's sha256 in the metadata. An ``out`` already converted
    from the same bytes is left as it is (written once); another ``out`` needs ``overwrite``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .backbones import build_backbone, resolve_backbone
    from .errors import ConfigError

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise ConfigError(f"weights file not found: {src}")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: the converted file is written as .safetensors")
    digest = sha256_file(src)
    if out.exists():
        try:
            with safe_open(str(out), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - not a safetensors file: treated as another file
            meta = {}
        if meta.get("source_sha256") == digest and meta.get("backbone") == arch:
            return dict(meta, out=str(out), written=False)
        if not overwrite:
            raise ConfigError(f"{out} exists and was not converted from {src} for {arch}; pass --overwrite")
    spec = resolve_backbone(arch, weights="none")
    lb = build_backbone(spec, hash_weights=False)
    fitted = fit_state_dict(read_checkpoint(src), lb.model, classifier_names=lb.classifier_names,
                            arch=spec.timm_name, path=src)
    tensors = {k: v.detach().contiguous() for k, v in fitted.state.items()}
    if fitted.classifier and lb.classifier_names:
        tensors.update({f"{lb.classifier_names[0]}.{leaf}": v.contiguous() for leaf, v in fitted.classifier.items()})
    meta = {"source_file": src.name, "source_sha256": digest, "source_layout": fitted.layout,
            "backbone": arch, "format": "featstack-converted-weights"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return dict(meta, out=str(out), written=True, tensors=len(tensors))
