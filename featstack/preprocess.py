"""Per-backbone preprocessing: decode once, then resize/crop/normalize per backbone on the device.

timm's eval transform is: resize the shorter side to ``size / crop_pct``, centre-crop ``size``,
scale to [0, 1], normalize. Geometrically that takes the centre square of side
``crop_pct * min(h, w)`` and resizes it to ``size``. So for K backbones we decode each image
once, take its centre square and resize it (antialiased, on the CPU worker) to one common
resolution R large enough for every backbone; then per backbone, on the device, in batches:
centre-crop ``crop_pct * R``, resize (antialiased, the model's interpolation) to its input size,
normalize with its mean/std. timm's own ``create_transform`` stays available as the reference
path (``preprocess="reference"``); tests check the two agree.

Decoding, the costly step, has two implementations:

* CPU (DataLoader workers): Pillow, with JPEG DCT-domain downscaling (``Image.draft``) when the
  file is much larger than R, so a 12-megapixel photo is decoded at 1/2, 1/4 or 1/8 scale
  (never below R) instead of in full;
* device (``--decode gpu``): workers only read the file bytes; the main process decodes a
  whole batch of JPEGs at once with ``torchvision.io.decode_jpeg(list, device="cuda")``
  (nvjpeg), then centre-squares and resizes each image on the device. Files that are not plain
  baseline RGB/grayscale JPEGs without EXIF rotation (PNG, CMYK, rotated photos) are decoded by
  Pillow in the worker instead, and so is any file nvjpeg rejects.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import PREPROCESS_MODES  # noqa: F401  (one list: the extract setting)

_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest",
                "lanczos": "bicubic", "hamming": "bilinear", "box": "area"}


def _hw(cfg: dict) -> tuple[int, int]:
    size = cfg["input_size"]
    return int(size[-2]), int(size[-1])


def decode_resolution(data_configs: Sequence[dict]) -> int:
    """Common side R of the decoded square: large enough for every backbone's crop."""
    return max(math.ceil(max(_hw(c)) / float(c.get("crop_pct") or 1.0)) for c in data_configs)


def square_box(h: int, w: int) -> tuple[int, int, int]:
    """(top, left, side) of the centre square of an h x w image: the one crop rule of the squares
    extraction decodes (:func:`center_square`) and the network takes (:func:`decode_to_square`)."""
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s


def center_square(img: np.ndarray, side: int) -> np.ndarray:
    """Centre square of an HxWx3 uint8 image, resized (antialiased, bicubic) to side x side."""
    h, w = img.shape[:2]
    top, left, s = square_box(h, w)
    pil = Image.fromarray(img).crop((left, top, left + s, top + s))
    if s != side:
        pil = pil.resize((side, side), Image.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


def _square_from_pil(img: Image.Image, side: int) -> np.ndarray:
    from .data import to_rgb_array

    if img.format == "JPEG" and img.mode in ("RGB", "L", "YCbCr"):
        w, h = img.size
        s = min(w, h)
        # DCT-domain downscaling by 1/2, 1/4 or 1/8, never below what the centre square needs.
        img.draft(img.mode, (math.ceil(side * w / s), math.ceil(side * h / s)))
    img.load()
    img = ImageOps.exif_transpose(img)
    return center_square(to_rgb_array(img), side)


def decode_square(src: "str | os.PathLike | bytes", side: int, name: str | None = None) -> np.ndarray:
    """Decode an image file (path or bytes) straight to its ``side`` x ``side`` centre square.

    Same result as ``center_square(data.decode_image(path), side)`` except that a large JPEG is
    decoded at a reduced scale first (see module doc); same errors (:class:`ImageDecodeError`).
    """
    from .data import ImageDecodeError

    raw = isinstance(src, (bytes, bytearray, memoryview))
    name = name or ("<bytes>" if raw else os.fspath(src))
    try:
        with Image.open(io.BytesIO(src) if raw else src) as img:
            return _square_from_pil(img, side)
    except FileNotFoundError as e:
        raise ImageDecodeError(f"file not found: {name}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode {name}: {e}") from e


def decode_to_square(images: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 3, H, W) images → (N, 3, side, side) float in [0, 255], as extraction decodes them.

    uint8 input is taken as pixels; floating input as [0, 1] (torchvision's convention) and
    scaled by 255. The centre square (:func:`square_box`, as :func:`center_square` crops)
    is resized antialiased bicubic and rounded to whole pixel values, as the uint8 squares of
    extraction are; images already ``side`` x ``side`` pass through untouched, so feeding the
    squares extraction decodes reproduces the cached features exactly.
    """
    from .errors import ConfigError

    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"images must be (N, 3, H, W); got {tuple(images.shape)}")
    is_uint8 = images.dtype == torch.uint8
    if not is_uint8 and not images.is_floating_point():
        raise ConfigError(f"images must be uint8 or floating point; got {images.dtype}")
    h, w = images.shape[-2:]
    if (h, w) == (side, side):
        return images.float() if is_uint8 else images.float() * 255.0
    top, left, s = square_box(h, w)
    sq = images[..., top:top + s, left:left + s]
    if is_uint8 and sq.device.type == "cpu":
        # torchvision's uint8 antialiased bicubic follows Pillow's (what extraction uses) closely
        import torchvision.transforms.v2.functional as TF
        out = TF.resize(sq.contiguous(), [side, side], interpolation=TF.InterpolationMode.BICUBIC,
                        antialias=True)
        return out.float()
    x = sq.float() if is_uint8 else sq.float() * 255.0
    x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0.0, 255.0).round()


def decode_squares(source, rows: Sequence[int], side: int) -> torch.Tensor:
    """(N, 3, side, side) uint8 squares of ``rows`` of a data source, decoded exactly as
    extraction decodes them (image files straight to their square; arrays via centre_square)."""
    from .data import FileSource

    out = []
    for r in rows:
        r = int(r)
        if isinstance(source, FileSource):
            sq = decode_square(source.paths[r], side)
        else:
            sq = center_square(source.load(r), side)
        out.append(torch.from_numpy(np.ascontiguousarray(sq.transpose(2, 0, 1))))
    if not out:
        return torch.zeros((0, 3, side, side), dtype=torch.uint8)
    return torch.stack(out)


def is_plain_jpeg(data: bytes) -> bool:
    """True when nvjpeg gives the same picture as Pillow: a JPEG in RGB/YCbCr or grayscale,
    with no EXIF rotation (nvjpeg ignores EXIF orientation), ending with its end-of-image
    marker (a truncated file goes to Pillow, which reports it). Reads the header only."""
    if data[:3] != b"\xff\xd8\xff" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            return int(img.getexif().get(0x0112, 1) or 1) == 1
    except Exception:  # noqa: BLE001 - anything odd goes to the Pillow path, which names the error
        return False


def gpu_jpeg_decode_available(device: torch.device | str) -> bool:
    """Whether ``torchvision.io.decode_jpeg`` can decode on ``device`` (nvjpeg for CUDA)."""
    device = torch.device(device)
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - torchvision missing or built without image ops
        return False
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())


def _decode_jpegs(datas: list, device: torch.device) -> list:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image IO (for TorchCodec)
        warnings.simplefilter("ignore")
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def squares_from_jpeg_bytes(datas: Sequence[torch.Tensor], side: int, device: torch.device | str
                            ) -> tuple[list, list]:
    """Batch-decode JPEG byte tensors on ``device``; return (squares, failures).

    ``squares[i]`` is a (3, side, side) uint8 tensor on ``device`` (the centre square, resized
    antialiased bicubic like :func:`center_square`), or None when image i could not be decoded
    there; ``failures`` lists those indices (the caller decodes them with Pillow instead). One
    bad file does not lose the batch: nvjpeg fails whole batches, so they are retried one by one.
    """
    device = torch.device(device)
    datas = list(datas)
    try:
        imgs = _decode_jpegs(datas, device) if datas else []
    except Exception:  # noqa: BLE001 - retry one by one to isolate the bad file(s)
        imgs = []
        for d in datas:
            try:
                imgs.append(_decode_jpegs([d], device)[0])
            except Exception:  # noqa: BLE001
                imgs.append(None)
    squares, failures = [], []
    for i, img in enumerate(imgs):
        if img is None or img.ndim != 3 or img.shape[0] != 3:
            squares.append(None)
            failures.append(i)
            continue
        h, w = img.shape[-2:]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = img[:, top:top + s, left:left + s]
        if s != side:
            x = F.interpolate(x[None].float(), size=(side, side), mode="bicubic", align_corners=False,
                              antialias=True)[0].clamp_(0, 255).round_().to(torch.uint8)
        squares.append(x)
    return squares, failures


class DevicePreprocessor:
    """Batched crop/resize/normalize of uint8 squares for one backbone, on any device.

    Input (B, 3, R, R) uint8 in any memory format; the loader hands over channels_last batches
    (stacked HWC squares, permuted: no copy), so the crop is a view, the float conversion
    touches only the cropped pixels and keeps the layout, and the normalization is in place.
    """

    def __init__(self, data_config: dict, device: torch.device | str = "cpu",
                 channels_last: bool = False):
        self.size = _hw(data_config)
        self.crop_pct = float(data_config.get("crop_pct") or 1.0)
        self.mode = _TORCH_MODES.get(str(data_config.get("interpolation", "bilinear")), "bilinear")
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(data_config["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
                              * 255.0)
        self.channels_last = channels_last

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) uint8 -> (B, 3, H, W) float32 normalized (a new tensor)."""
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
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)  # a no-op when the layout is already right
        return x.sub_(self.mean).mul_(self.inv_std)


def reference_transform(data_config: dict):
    """timm's own eval transform for this data config (PIL image -> normalized tensor)."""
    import timm.data

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items() if k in keys}
    return timm.data.create_transform(**cfg, is_training=False)
