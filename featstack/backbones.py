"""Backbone registry: a key names a timm model, its weights source and its data config.

Like timm's ``create_model("name")``, a key maps 1:1 to what YAML pipelines and the CLI say.
Any timm model name (with or without a pretrained tag, e.g. ``vit_base_patch16_224.augreg_in21k``)
is a key; :func:`register_backbone` adds aliases with their own defaults (e.g. a small input
size for quick demos). The embedding is timm's pooled pre-logits vector (``num_classes=0``).
"""
from __future__ import annotations

import difflib
import hashlib
import os
import socket
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import timm_names
from .config import WEIGHT_SOURCES  # noqa: F401  (one list: the extract setting)
from .errors import BackboneError, ConfigError

if TYPE_CHECKING:  # torch and timm load only when a model is built: `run --check` stays light
    import torch



@dataclass(frozen=True)
class BackboneSpec:
    """What to build: the cache key, the timm model, where its weights come from."""

    key: str
    timm_name: str
    weights: str = "hub"           # "hub" | "none" | "file"
    weights_file: str | None = None
    input_size: int | None = None  # square input side; None = the model's own data config
    seed: int = 0                  # random init seed for weights="none"
    model_kwargs: dict = field(default_factory=dict)

    @property
    def weights_source(self) -> str:
        return f"file:{self.weights_file}" if self.weights == "file" else self.weights


_REGISTRY: dict[str, dict] = {}


def register_backbone(key: str, timm_name: str, *, input_size: int | None = None, **model_kwargs) -> None:
    """Add a named backbone (an alias of a timm model with its own defaults)."""
    _REGISTRY[key] = {"timm_name": timm_name, "input_size": input_size, "model_kwargs": model_kwargs}


# Small, fast aliases for demos and tests on a CPU.
register_backbone("resnet18-64", "resnet18", input_size=64)
register_backbone("test_resnet-64", "test_resnet", input_size=64)
register_backbone("test_vit-64", "test_vit", input_size=64)


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered aliases plus every timm model name matching ``pattern``."""
    import fnmatch

    import timm
    return sorted(k for k in _REGISTRY if fnmatch.fnmatch(k, pattern)) + timm.list_models(pattern)


_arch = timm_names.arch_name


def resolve_backbone(key: str, *, weights: str = "hub", weights_file: str | os.PathLike | None = None,
                     input_size: int | None = None, seed: int = 0) -> BackboneSpec:
    """Turn a key and options into a spec, checking the name and weights file up front."""
    key = key.strip()
    if not key:
        raise ConfigError("empty backbone name")
    entry = _REGISTRY.get(key, {"timm_name": key, "input_size": None, "model_kwargs": {}})
    timm_name = entry["timm_name"]
    if not timm_names.is_model(timm_name):
        close = difflib.get_close_matches(_arch(timm_name), timm_names.list_models() + list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(f"unknown backbone {key!r}: no timm model of that name{hint}")
    if weights_file is not None:
        weights = "file"
        path = Path(weights_file)
        if not path.is_file():
            raise BackboneError(f"weights file for {key!r} not found: {path}")
        if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise BackboneError(f"weights file {path}: expected .safetensors, .pth, .pt or .bin")
        weights_file = str(path.resolve())
    elif weights == "file":
        raise BackboneError(f"--weights file needs --weights-file {key}=PATH")
    if weights not in WEIGHT_SOURCES:
        raise ConfigError(f"unknown weights source {weights!r}: use hub, none or a weights file")
    return BackboneSpec(key=key, timm_name=timm_name, weights=weights, weights_file=weights_file,
                        input_size=input_size or entry["input_size"], seed=seed,
                        model_kwargs=dict(entry["model_kwargs"]))


@dataclass
class LoadedBackbone:
    """A ready model: eval mode, its data config, embedding width and weights hash."""

    spec: BackboneSpec
    model: torch.nn.Module
    data_config: dict
    dim: int
    weights_sha256: str

    def metadata(self) -> dict:
        """Cache metadata for this backbone (what the fingerprint is computed from)."""
        import platform

        import timm
        import torch
        return {
            "key": self.spec.key,
            "timm_name": self.spec.timm_name,
            "weights_source": self.spec.weights_source,
            "weights_sha256": self.weights_sha256,
            "data_config": self.data_config,
            "dim": self.dim,
            "versions": {"torch": torch.__version__, "timm": timm.__version__,
                         "python": platform.python_version()},
            "spec": asdict(self.spec),
        }


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes).

    One hash for every weights source: hub, file and seeded random init alike, so a cache
    records exactly which numbers produced its features.
    """
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urllib.parse.urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create(spec: BackboneSpec, pretrained: bool) -> torch.nn.Module:
    import timm

    kwargs = dict(spec.model_kwargs)
    if spec.input_size:
        try:  # ViT-style models fix their input size at construction
            return timm.create_model(spec.timm_name, pretrained=pretrained, num_classes=0,
                                     img_size=spec.input_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(spec.timm_name, pretrained=pretrained, num_classes=0, **kwargs)


def _create_from_hub(spec: BackboneSpec) -> torch.nn.Module:
    import huggingface_hub.constants as hf_constants

    reachable = _hub_reachable()
    old = hf_constants.HF_HUB_OFFLINE
    if not reachable:  # use the local hub cache only, instead of minutes of retries
        hf_constants.HF_HUB_OFFLINE = True
    try:
        return _create(spec, pretrained=True)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        where = "the hub is unreachable and the weights are not in the local hub cache" if not reachable \
            else f"download failed ({type(e).__name__}: {str(e)[:200]})"
        raise BackboneError(
            f"cannot load pretrained weights for {spec.key!r}: {where}; use --weights none "
            f"(random init) or --weights-file {spec.key}=PATH") from e
    finally:
        hf_constants.HF_HUB_OFFLINE = old


def _load_file_weights(model: torch.nn.Module, spec: BackboneSpec) -> None:
    """Load a local .safetensors/.pth checkpoint (never unpickling arbitrary objects)."""
    from timm.models import load_state_dict

    path = spec.weights_file
    try:
        state = load_state_dict(path, use_ema=True, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise BackboneError(f"{path}: cannot read weights ({type(e).__name__}: {str(e)[:200]})") from e
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    # The embedding model has no classifier: drop its weights from a full checkpoint.
    state = {k: v for k, v in state.items()
             if k in own or not any(k.startswith(c + ".") for c in classifier)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise BackboneError(
            f"{path} does not fit {spec.timm_name!r}: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise BackboneError(f"{path}: tensor {k} has shape {tuple(state[k].shape)}, "
                            f"{spec.timm_name} expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True)


def load_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> LoadedBackbone:
    """Build the model with its weights, in eval mode on ``device``."""
    import timm.data
    import torch

    if spec.weights == "hub":
        model = _create_from_hub(spec)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = _create(spec, pretrained=False)
        if spec.weights == "file":
            _load_file_weights(model, spec)
    model.eval()
    cfg = dict(timm.data.resolve_model_data_config(model))
    if spec.input_size:
        cfg["input_size"] = (3, int(spec.input_size), int(spec.input_size))
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    sha = state_dict_sha256(model)
    model.to(device)
    return LoadedBackbone(spec=spec, model=model, data_config=cfg, dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
                          weights_sha256=sha)
