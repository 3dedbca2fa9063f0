"""The network: FeatstackNet = per-backbone preprocessing (as in extraction) + the backbones
with the exact weights the cache fingerprint names + an exported head; built from a saved model,
saved as safetensors + JSON (never a pickle), loaded back, written as ONNX.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import __version__
from .atomic import atomic_paths
from .cache import FINGERPRINT_FIELDS, OPTIONAL_FINGERPRINT_FIELDS
from .convert import model_converter
from .errors import BackboneError, ConfigError, FeatstackError, read_format_json
from .preprocess import decode_to_square
from .torch_heads import ExportError, HeadModule, _dtype_name, head_from_config

NETWORK_FORMAT = "featstack-network"
NETWORK_FORMAT_VERSION = 1
NETWORK_JSON = "network.json"
NETWORK_TENSORS = "network.safetensors"
NETWORK_ONNX = "network.onnx"


class _Preprocess:
    """One backbone's extraction preprocessing (featstack.preprocess.DevicePreprocessor), built
    per device on first use: it holds its mean/std on that device."""

    def __init__(self, data_config: dict):
        self.data_config = data_config
        self._by_device: dict = {}

    def __call__(self, squares: torch.Tensor) -> torch.Tensor:
        from .preprocess import DevicePreprocessor

        key = str(squares.device)
        prep = self._by_device.get(key)
        if prep is None:
            prep = self._by_device[key] = DevicePreprocessor(self.data_config, squares.device)
        return prep(squares)


class FeatstackNet(nn.Module):
    """Images → logits: per-backbone preprocessing (as in extraction) + the backbones + the
    exported head.

    ``forward(images)`` takes (N, 3, H, W) uint8 pixels or floats in [0, 1]; images are
    centre-squared to ``input_side`` (the decode resolution of extraction), then each backbone
    crops/resizes/normalises per its data config. Predictions (:meth:`predict`) follow the
    scikit-learn head's rule; ``classes`` names the output columns.
    """

    def __init__(self, backbones: Sequence[nn.Module], backbone_info: Sequence[dict], head: HeadModule,
                 classes: Sequence[str], meta: dict | None = None):
        super().__init__()
        from .preprocess import decode_resolution

        if len(backbones) != len(backbone_info) or not backbones:
            raise ExportError("one info entry per backbone needed")
        self.backbones = nn.ModuleList(backbones)
        self.backbone_info = [dict(b) for b in backbone_info]
        self.dims = [int(b["dim"]) for b in self.backbone_info]
        self.keys = [str(b["key"]) for b in self.backbone_info]
        if head.n_features != sum(self.dims):
            raise ExportError(f"the head takes {head.n_features} features, the backbones give "
                              f"{sum(self.dims)} ({', '.join(f'{k}: {d}' for k, d in zip(self.keys, self.dims))})")
        self.head = head
        self.classes = [str(c) for c in classes]
        if len(self.classes) != head.n_classes:
            raise ExportError(f"{len(self.classes)} class names for a head with {head.n_classes} outputs")
        self.input_side = int(decode_resolution([b["data_config"] for b in self.backbone_info]))
        self._prep = [_Preprocess(b["data_config"]) for b in self.backbone_info]
        self.meta = dict(meta or {})
        #: further JSON sections carried through save/load (e.g. "finetune")
        self.extra: dict = {}

    def squares(self, images: torch.Tensor) -> torch.Tensor:
        """Images → float (N, 3, R, R) pixel squares on the network's device."""
        p = next(self.backbones.parameters(), None)
        if p is not None and images.device != p.device:
            images = images.to(p.device, non_blocking=True)
        return decode_to_square(images, self.input_side)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, Σ dims) backbone embeddings, blocks in backbone order (what the cache holds)."""
        sq = self.squares(images)
        feats = [model(prep(sq)) for model, prep in zip(self.backbones, self._prep)]
        return torch.cat([f.float() for f in feats], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class indices (into :attr:`classes`) by the scikit-learn head's own rule."""
        return self.head.predict_index(self.features(images))

    def predict_names(self, images: torch.Tensor) -> list:
        return [self.classes[i] for i in self.predict(images).tolist()]

    def sklearn_outputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the saved scikit-learn model's predict_proba / decision_function would return."""
        return self.head.sklearn_outputs(self.features(images))

    def config(self) -> dict:
        """JSON-able description from which :func:`load_network` rebuilds the module."""
        return {
            "format": NETWORK_FORMAT,
            "format_version": NETWORK_FORMAT_VERSION,
            "featstack_version": __version__,
            "torch_version": torch.__version__,
            "timm_version": _timm_version(),
            "classes": self.classes,
            "dims": self.dims,
            "input_side": self.input_side,
            "backbones": self.backbone_info,
            "head_dtype": _dtype_name(self.head.dtype),
            "head": self.head.config(),
            "meta": self.meta,
        }


def _timm_version() -> str:
    import timm
    return timm.__version__


# --------------------------------------------------------------------------------------------
# Building, saving and loading networks
# --------------------------------------------------------------------------------------------

# What a network records of each backbone: what its features mean (the cache's fingerprint
# fields, less the dataset), where its weights came from, and the spec that rebuilds it.
_INFO_FIELDS = tuple(f for f in FINGERPRINT_FIELDS if f != "dataset_fingerprint") + OPTIONAL_FINGERPRINT_FIELDS + \
    ("weights_source", "fingerprint", "spec")


def _spec_from_info(info: dict):
    from .backbones import BackboneSpec

    spec = info.get("spec")
    if not isinstance(spec, dict) or "timm_name" not in spec:
        raise BackboneError(
            f"backbone {info.get('key')!r}: the cache records no timm model spec (features imported "
            f"from arrays, weights {info.get('weights_source')!r}); a network cannot be rebuilt from it")
    return BackboneSpec.from_dict(spec)


def rebuild_backbone(info: dict, device: str | torch.device = "cpu") -> nn.Module:
    """The backbone with the weights the cache fingerprint names, VERIFIED: its state-dict
    sha256 must equal the cached ``weights_sha256`` (seeded random init is re-created with the
    same seed; a weights file or the hub is loaded), else a BackboneError names the backbone."""
    from .backbones import build_backbone

    spec = _spec_from_info(info)
    try:
        lb = build_backbone(spec, device)
    except FeatstackError:
        raise
    except Exception as e:  # noqa: BLE001 - timm/torch errors come in many types
        raise BackboneError(f"backbone {info.get('key')!r}: cannot rebuild {spec.timm_name!r} "
                            f"({type(e).__name__}: {str(e)[:200]})") from e
    want = info.get("weights_sha256")
    if lb.weights_sha256 != want:
        raise BackboneError(
            f"backbone {info.get('key')!r}: rebuilt weights (source {spec.weights_source}) have sha256 "
            f"{lb.weights_sha256[:12]}, the cache's features were computed with {str(want)[:12]}; "
            "the weights file or hub checkpoint changed since extraction (re-extract, or restore it)")
    if info.get("dim") is not None and int(info["dim"]) != lb.dim:
        raise BackboneError(f"backbone {info.get('key')!r}: rebuilt model gives {lb.dim} features, the cache {info['dim']}")
    return lb.model


def head_C(estimator) -> float | None:
    """The regularisation constant C of a fitted head (the base head of a vote or stack, the
    chosen one of a --tune search, the C a rescaling solver applied); None for heads without one."""
    from sklearn.pipeline import Pipeline

    est = estimator
    blocks = getattr(est, "estimators_", None)
    if blocks:
        est = blocks[0]
    est = getattr(est, "best_estimator_", est)
    if isinstance(est, Pipeline):
        est = est.steps[-1][1]
    c = getattr(est, "C_effective_", None)  # a solver that rescales C records the C it used
    c = getattr(est, "C", None) if c is None else c
    return float(c) if c is not None else None


def _step(bar, what: str, advance: bool = False) -> None:
    """Mark the previous export step done (after the first) and name the next one."""
    if bar is None or bar.disable:
        return
    if bar.postfix or advance:
        bar.update()
    bar.set_postfix_str(what)


def build_network(saved, cache, *, head_dtype: torch.dtype | str = torch.float64,
                  device: str | torch.device = "cpu", bar=None) -> FeatstackNet:
    """A FeatstackNet from a saved model (featstack.models.SavedModel) and the cache it was
    trained on (where the backbones' timm specs, weights hashes and data configs live)."""
    from .cache import Cache, open_cache

    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if hasattr(saved, "check_cache"):
        saved.check_cache(cache)
    infos = []
    for key in saved.backbones:
        info = cache.backbone_info(key)
        infos.append({k: info.get(k) for k in _INFO_FIELDS})
        if info.get("preprocess") not in (None, "fast"):
            warnings.warn(f"backbone {key!r} was extracted with --preprocess {info.get('preprocess')}; "
                          "the network preprocesses with the fast path, so its features differ slightly "
                          "from the cached ones", stacklevel=2)
    _step(bar, "exporting the head")
    head = model_converter(saved.head, saved.fusion)(saved.estimator, saved.dims, head_dtype)
    models = []
    for info in infos:
        _step(bar, f"rebuilding {info['key']} and verifying its weights")
        models.append(rebuild_backbone(info))
    for info, m in zip(infos, models):
        info["source_weights_sha256"] = info["weights_sha256"]
    meta = {
        "model_path": str(getattr(saved, "path", "") or ""),
        "head": saved.head,
        "fusion": saved.fusion,
        "model_fingerprints": dict(saved.fingerprints),
        "cache_path": str(cache.path),
        "cache_fingerprint": cache.dataset_fingerprint,
        "sklearn_version": (saved.meta or {}).get("sklearn_version"),
        "train_accuracy": (saved.meta or {}).get("train_accuracy"),
        "test_accuracy": (saved.meta or {}).get("test_accuracy"),
        "head_C": head_C(saved.estimator),
    }
    # names of the estimator's output columns (a class without training rows has none)
    classes = list(getattr(saved, "output_classes", None) or saved.classes)
    net = FeatstackNet(models, infos, head, classes, meta=meta)
    return net.to(device)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_network(net: FeatstackNet, out_dir: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``out_dir/network.safetensors`` (every tensor: backbones and head) and
    ``out_dir/network.json`` (the config that rebuilds the module). No pickle anywhere. Both
    files are written to temporary names and renamed; the JSON records the tensors' sha256."""
    from safetensors.torch import save_file
    from .backbones import state_dict_sha256

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; a network is saved as a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / NETWORK_JSON).exists():
        raise ConfigError(f"{out}: folder is not empty and holds no {NETWORK_JSON}; pick a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    seen: set = set()
    for k, v in list(state.items()):  # safetensors refuses shared storage: copy the duplicates
        ptr = v.untyped_storage().data_ptr()
        if v.numel() and ptr in seen:
            state[k] = v.clone()
        seen.add(ptr)
    cfg = net.config()
    for info, model in zip(cfg["backbones"], net.backbones):
        info["weights_sha256"] = state_dict_sha256(model)
    cfg.update(getattr(net, "extra", {}) or {})
    cfg.update(extra or {})
    with atomic_paths(out / NETWORK_TENSORS, out / NETWORK_JSON) as (tmp_t, tmp_j):
        save_file(state, str(tmp_t), metadata={"format": NETWORK_FORMAT})
        cfg["tensors_sha256"] = _sha256_file(tmp_t)
        tmp_j.write_text(json.dumps(cfg, indent=1, default=str) + "\n")
    net.meta = dict(cfg.get("meta", net.meta))
    return out


def read_network_config(path: str | os.PathLike) -> tuple[Path, dict]:
    """(folder, parsed network.json) of a network folder, with the format checked."""
    path = Path(path)
    if path.is_file() and path.name in (NETWORK_JSON, NETWORK_TENSORS):
        path = path.parent
    jfile = path / NETWORK_JSON
    if not path.is_dir():
        raise ExportError(f"{path}: no such network folder")
    cfg = read_format_json(jfile, fmt=NETWORK_FORMAT, version=NETWORK_FORMAT_VERSION,
                           required=("backbones", "head", "classes", "head_dtype"), error=ExportError,
                           what="network", hint="; make one with `featstack export`")
    return path, cfg


def _create_backbone(info: dict) -> nn.Module:
    """The model of a backbone with seeded random weights (its tensors are loaded next)."""
    from dataclasses import replace

    from .backbones import build_backbone

    spec = replace(_spec_from_info(info), weights="none", weights_file=None)
    try:
        return build_backbone(spec, hash_weights=False).model
    except FeatstackError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BackboneError(f"backbone {info.get('key')!r}: cannot create model {spec.timm_name!r} "
                            f"({type(e).__name__}: {str(e)[:200]})") from e


def load_network(path: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True) -> FeatstackNet:
    """Rebuild a FeatstackNet from a network folder (network.json + network.safetensors).

    The backbones are created by timm (pretrained=False, num_classes=0), the head from its
    config, then every tensor is loaded strictly from the safetensors file. With ``verify`` the
    file's sha256 and each backbone's weights hash are checked against the JSON.
    """
    from safetensors.torch import load_file
    from .backbones import state_dict_sha256

    folder, cfg = read_network_config(path)
    tfile = folder / NETWORK_TENSORS
    if not tfile.exists():
        raise ExportError(f"{folder}: network folder lacks {NETWORK_TENSORS}")
    if verify and cfg.get("tensors_sha256") and _sha256_file(tfile) != cfg["tensors_sha256"]:
        raise ExportError(f"{tfile}: sha256 differs from the one {NETWORK_JSON} records; the two files "
                          "come from different saves")
    models = [_create_backbone(info) for info in cfg["backbones"]]
    head = head_from_config(cfg["head"], cfg["head_dtype"])
    net = FeatstackNet(models, cfg["backbones"], head, cfg["classes"], meta=cfg.get("meta"))
    try:
        state = load_file(str(tfile))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{tfile}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{tfile} does not fit the network {NETWORK_JSON} describes: {str(e)[:400]}") from e
    if verify:
        for info, model in zip(cfg["backbones"], net.backbones):
            got = state_dict_sha256(model)
            if info.get("weights_sha256") and got != info["weights_sha256"]:
                raise ExportError(f"{folder}: backbone {info.get('key')!r} weights hash {got[:12]} differs "
                                  f"from {NETWORK_JSON} ({str(info['weights_sha256'])[:12]})")
    standard = set(net.config()) | {"tensors_sha256"}
    net.extra = {k: v for k, v in cfg.items() if k not in standard}
    return net.to(device).eval()


def export_onnx(net: FeatstackNet, path: str | os.PathLike, *, batch: int = 2) -> Path:
    """Write the network as ONNX (uint8 images of side ``input_side`` in, logits out, dynamic
    batch) with torch's dynamo exporter. Needs the optional ``onnx`` and ``onnxscript`` packages
    (``pip install 'featstack[onnx]'``); the antialiased resize of the preprocessing has no
    mapping in the older TorchScript exporter."""
    missing = []
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ConfigError(f"--onnx needs the {' and '.join(missing)} package(s): pip install 'featstack[onnx]'")
    path = Path(path)
    example = torch.zeros((batch, 3, net.input_side, net.input_side), dtype=torch.uint8)
    net = net.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net, (example,), dynamo=True, input_names=["images"],
                                        output_names=["logits"],
                                        dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
            program.save(str(path))
    except Exception as e:  # noqa: BLE001 - exporter errors come in many types
        raise ExportError(f"ONNX export failed ({type(e).__name__}: {str(e)[:300]}); the safetensors "
                          "network is unaffected") from e
    return path


def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, cache: str | os.PathLike | None = None,
                 *, head_dtype: torch.dtype | str = "float64", onnx: bool = False, progress: bool = True) -> Path:
    """Saved model folder → network folder (safetensors + JSON; with ``onnx`` also network.onnx).

    The backbones' timm specs and weights hashes come from the cache the model was trained on:
    ``cache`` if given, else the ``cache_path`` the model records.
    """
    from .models import load_model

    saved = load_model(model_dir)
    model_converter(saved.head, saved.fusion)  # refuse an unconvertible model before any work
    cache_path = cache or saved.meta.get("cache_path")
    if not cache_path:
        raise ConfigError(f"{model_dir}: the model records no cache path; pass --cache PATH (the cache it "
                          "was trained on, which holds the backbones' specs and weights hashes)")
    if not Path(cache_path).exists():
        raise ConfigError(f"cache {cache_path} (recorded by {model_dir}) not found; pass --cache PATH")
    import sys
    from tqdm.auto import tqdm

    cache = saved.check_cache(cache_path)  # a fingerprint refusal is one line, before the progress bar
    steps = 2 + len(saved.backbones) + int(onnx)  # head, backbones, save, onnx
    with tqdm(total=steps, desc="export", unit="step", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        net = build_network(saved, cache, head_dtype=head_dtype, bar=bar)
        _step(bar, "saving")
        out = save_network(net, out_dir)
        if onnx:
            _step(bar, "writing ONNX")
            export_onnx(net, out / NETWORK_ONNX)
        _step(bar, "done", advance=True)
    return out
