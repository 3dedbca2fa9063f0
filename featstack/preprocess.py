"""Per-backbone preprocessing: decode once, then resize/crop/normalize per backbone on the device.

timm's eval transform is: resize the shorter side to ``size / crop_pct``, centre-crop ``size``,
scale to [0, 1], normalize. Geometrically that takes the centre square of side
``crop_pct * min(h, w)`` and resizes it to ``size``. So for K backbones we decode each image
once, take its centre square and resize it (antialiased, on the CPU worker) to one common
resolution R large enough for every backbone; then per backbone, on the device, in batches:
centre-crop ``crop_pct * R``, resize (antialiased, the model's interpolation) to its input size,
normalize with its mean/std. timm's own ``create_transform`` stays available as the reference
path (``preprocess="reference"``); tests check the two agree.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PREPROCESS_MODES = ("fast", "reference")
_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest",
                "lanczos": "bicubic", "hamming": "bilinear", "box": "area"}


def _hw(cfg: dict) -> tuple[int, int]:
    size = cfg["input_size"]
    return int(size[-2]), int(size[-1])


def decode_resolution(data_configs: Sequence[dict]) -> int:
    """Common side R of the decoded square: large enough for every backbone's crop."""
    return max(math.ceil(max(_hw(c)) / float(c.get("crop_pct") or 1.0)) for c in data_configs)


def center_square(img: np.ndarray, side: int) -> np.ndarray:
    """Centre square of an HxWx3 uint8 image, resized (antialiased, bicubic) to side x side."""
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    pil = Image.fromarray(img).crop((left, top, left + s, top + s))
    if s != side:
        pil = pil.resize((side, side), Image.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


class DevicePreprocessor:
    """Batched crop/resize/normalize of uint8 squares for one backbone, on any device."""

    def __init__(self, data_config: dict, device: torch.device | str = "cpu",
                 channels_last: bool = False):
        self.size = _hw(data_config)
        self.crop_pct = float(data_config.get("crop_pct") or 1.0)
        self.mode = _TORCH_MODES.get(str(data_config.get("interpolation", "bilinear")), "bilinear")
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(data_config["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.channels_last = channels_last

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) uint8 -> (B, 3, H, W) float32 normalized."""
        r = batch.shape[-1]
        side = max(1, min(r, round(r * self.crop_pct)))
        off = (r - side) // 2
        x = batch[..., off:off + side, off:off + side].float()
        if (side, side) != self.size:
            kw = {"antialias": True} if self.mode in ("bilinear", "bicubic") else {}
            x = F.interpolate(x, size=self.size, mode=self.mode,
                              **({"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}), **kw)
            if self.mode == "bicubic":  # bicubic overshoots; keep the uint8 range like PIL does
                x = x.clamp_(0.0, 255.0)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def reference_transform(data_config: dict):
    """timm's own eval transform for this data config (PIL image -> normalized tensor)."""
    import timm.data

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items() if k in keys}
    return timm.data.create_transform(**cfg, is_training=False)
