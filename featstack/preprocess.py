"""Per-backbone preprocessing: decode each image once, then give every backbone exactly timm's
eval transform of it.

timm's eval transform (``transforms_imagenet_eval``) resizes the whole image (Pillow, the
model's filter, antialiased) to a size that depends on ``crop_mode`` and
``scale_size = floor(input_size / crop_pct)`` -- ``center``: shorter side to scale_size,
``squash``: both sides to scale_size, ``border``: longer side to scale_size -- then centre-crops
(or pads, with the mean colour for ``border``) to ``input_size``, scales to [0, 1] and
normalises. The fast path computes the same pixels with less work and batches the rest:

* :class:`Recipe` turns a data config into that geometry as plain numbers; :meth:`Recipe.plan`
  gives, for one image size, the source box whose resize *is* the crop, its output size and
  where it lands in the (padded) input;
* CPU: a DataLoader worker decodes the file once with Pillow (JPEG DCT-domain downscaling,
  ``Image.draft``, only when the image is at least :data:`DRAFT_GAP` times larger than what every
  backbone resizes it to), then per backbone calls ``Image.resize(size, filter, box=...)``:
  Pillow computes only the crop's pixels, with the very coefficients of the full resize
  (resize-then-crop and resize-with-box are the same sums), so the uint8 pixels equal timm's;
* device (``--decode gpu``): workers only read the file bytes; the main process decodes a
  whole batch of JPEGs with ``torchvision.io.decode_jpeg(list, device="cuda")`` (nvjpeg) and
  resizes each image per backbone with ``F.interpolate(antialias=True)``, which implements
  Pillow's bilinear/bicubic antialiased filters (within one grey level), then crops/pads the
  same boxes. Files that are not plain RGB/grayscale JPEGs without EXIF rotation go to Pillow
  in the worker;
* per backbone, on the device, in batches: uint8 -> float, normalise with its mean/std.

A data config the fast path cannot reproduce (an unknown crop mode or filter) is preprocessed
by timm's own ``create_transform`` (the reference path, ``preprocess="reference"``), with a
printed note. Tests check the paths agree on real ImageNet weights.

:func:`center_square`, :func:`decode_square`, :func:`decode_resolution` and
:class:`DevicePreprocessor` are the square-input preprocessing of the exported network
(``FeatstackNet`` takes one (N, 3, R, R) tensor for all its backbones).
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
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


#: Version of the fast path's pixels, recorded in every backbone's fingerprint: bump it whenever
#: a change alters what the fast path feeds a model, so old shards never mix with new ones.
#: 1: centre square at a common resolution, cropped/resized on the device; 2: timm's transform.
PREPROCESS_VERSION = 2
CROP_MODES = ("center", "squash", "border")
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
               "bilinear": Image.Resampling.BILINEAR, "hamming": Image.Resampling.HAMMING,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
# F.interpolate modes that compute Pillow's filter (antialiased): the device-decode path
# supports these; for the others the files are decoded and resized by Pillow on the CPU.
DEVICE_FILTERS = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}
#: A JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT domain, ``Image.draft``) only when the reduced
#: image is still at least this many times larger, on each side, than every backbone resizes it
#: to. Measured on the real MobileNetV2 / EfficientNet-Lite0 weights against a full decode, over
#: photos 3-6x larger than needed: gap 1 (the earlier rule) raw cosine down to 0.992, gap 2
#: down to 0.996 (a grainy photo; 0.9995 on real photos), gap 3 >= 0.9998, top-1 identical
#: from gap 1.5 on. CPU cost per 12-megapixel JPEG (3 backbones): gap 1 30 ms, 2 47 ms, 3 65 ms
#: (README, "Preprocessing"). 2 keeps every image well inside the 0.99 agreement target.
DRAFT_GAP = 2.0


class UnsupportedPreprocessing(ValueError):
    """A data config whose eval transform the fast path does not reproduce."""


@dataclass(frozen=True)
class Plan:
    """One image's path to one backbone's input: resize ``box`` (source pixels, floats) to
    ``size`` (w, h) -- the part of timm's resized image that survives its crop -- and place it
    at ``offset`` (top, left) of the ``out`` (h, w) input, the rest filled with ``fill``."""

    box: tuple[float, float, float, float]
    size: tuple[int, int]
    offset: tuple[int, int]
    resized: tuple[int, int]  # (h, w) of timm's whole resized image
    start: tuple[int, int]    # (top, left) of the crop in it
    out: tuple[int, int]
    fill: tuple[int, int, int]

    @property
    def padded(self) -> bool:
        return (self.size[1], self.size[0]) != self.out


def _crop_axis(length: int, out: int) -> tuple[int, int, int]:
    """(start, count, pad_before) of timm/torchvision's centre crop-or-pad along one axis."""
    if out >= length:
        return 0, length, (out - length) // 2
    return int(round((length - out) / 2.0)), out, 0


@dataclass(frozen=True)
class Recipe:
    """A backbone's eval transform (timm ``transforms_imagenet_eval``) as plain numbers."""

    out: tuple[int, int]      # input size (h, w)
    scale: tuple[int, int]    # scale_size (h, w) = floor(out / crop_pct)
    crop_mode: str
    interpolation: str
    fill: tuple[int, int, int]

    @classmethod
    def from_config(cls, data_config: dict) -> "Recipe":
        """Raises :class:`UnsupportedPreprocessing` naming what the fast path cannot do."""
        mode = data_config.get("crop_mode") or "center"
        interp = str(data_config.get("interpolation") or "bilinear")
        if mode not in CROP_MODES:
            raise UnsupportedPreprocessing(f"crop_mode {mode!r} (the fast path knows {', '.join(CROP_MODES)})")
        if interp not in PIL_FILTERS:
            raise UnsupportedPreprocessing(f"interpolation {interp!r} (the fast path knows {', '.join(PIL_FILTERS)})")
        out = _hw(data_config)
        pct = float(data_config.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
        scale = (math.floor(out[0] / pct), math.floor(out[1] / pct))
        fill = tuple(round(255 * float(v)) for v in data_config["mean"]) if mode == "border" else (0, 0, 0)
        return cls(out, scale, mode, interp, fill)

    def resized(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) timm resizes an h x w image to, before its crop (torchvision's rounding)."""
        sh, sw = self.scale
        if self.crop_mode == "squash":
            return sh, sw
        if self.crop_mode == "center" and sh == sw:  # transforms.Resize(int): the shorter side
            if w <= h:
                return int(sh * h / w), sh
            return sh, int(sh * w / h)
        rh, rw = h / sh, w / sw  # timm ResizeKeepRatio (longest=1 for border, 0 for center)
        ratio = max(rh, rw) if self.crop_mode == "border" else min(rh, rw)
        return round(h / ratio), round(w / ratio)

    def plan(self, h: int, w: int) -> Plan:
        """Where the pixels of an h x w image go (see :class:`Plan`)."""
        rh, rw = self.resized(h, w)
        y0, ny, pt = _crop_axis(rh, self.out[0])
        x0, nx, pl = _crop_axis(rw, self.out[1])
        box = (w * x0 / rw, h * y0 / rh, w * (x0 + nx) / rw, h * (y0 + ny) / rh)
        return Plan(box, (nx, ny), (pt, pl), (rh, rw), (y0, x0), self.out, self.fill)


def recipes_for(data_configs: dict) -> tuple[dict, dict]:
    """Split backbones into ({key: Recipe} the fast path reproduces, {key: reason} it does not)."""
    recipes, unsupported = {}, {}
    for key, cfg in data_configs.items():
        try:
            recipes[key] = Recipe.from_config(cfg)
        except UnsupportedPreprocessing as e:
            unsupported[key] = str(e)
    return recipes, unsupported


# How far (in source pixels, times the reduction factor) each Pillow filter reaches.
_SUPPORT = {"nearest": 0.5, "box": 0.5, "bilinear": 1.0, "hamming": 1.0, "bicubic": 2.0, "lanczos": 3.0}


# Kernels with a jump (a pixel is in or out): a box offset moves sample positions by float
# rounding and flips ties, so these resize the whole image and crop, as timm does.
_STEP_FILTERS = ("nearest", "box")


def _resize_then_crop(img: Image.Image, size: tuple[int, int], filt, box: tuple) -> Image.Image:
    (nx, ny), (x0, y0, x1, y1), (w, h) = size, box, img.size
    rw, rh = round(nx * w / (x1 - x0)), round(ny * h / (y1 - y0))
    left, top = round(x0 * rw / w), round(y0 * rh / h)
    return img.resize((rw, rh), filt).crop((left, top, left + nx, top + ny))


def _resize_box(img: Image.Image, size: tuple[int, int], interpolation: str,
                box: tuple[float, float, float, float]) -> Image.Image:
    """Pillow's resize of ``box`` to ``size``, with the passes in the order of a full resize.

    A full ``Image.resize`` runs the horizontal pass, rounds to uint8, then the vertical one;
    a single call with a box may run them the other way round (Pillow 13 does when it enlarges),
    which moves pixels by up to 8 grey levels. So: the rows the vertical filter reaches, the
    horizontal pass on them, then the vertical pass -- each a one-axis resize."""
    filt = PIL_FILTERS[interpolation]
    (nx, ny), (x0, y0, x1, y1), (w, h) = size, box, img.size
    if interpolation in _STEP_FILTERS:
        return _resize_then_crop(img, size, filt, box)
    reach = _SUPPORT[interpolation] * max((y1 - y0) / ny, 1.0) + 2.0
    r0, r1 = max(0, math.floor(y0 - reach)), min(h, math.ceil(y1 + reach))
    out = img.crop((0, r0, w, r1)) if (r0, r1) != (0, h) else img
    if (x0, x1, nx) != (0, w, w):
        out = out.resize((nx, r1 - r0), filt, box=(x0, 0, x1, r1 - r0))
    if (y0 - r0, y1 - r0, ny) != (0, r1 - r0, r1 - r0):
        out = out.resize((nx, ny), filt, box=(0, y0 - r0, nx, y1 - r0))
    return out


def render(img: Image.Image, plan: Plan, interpolation: str, scale: float = 1.0) -> np.ndarray:
    """timm's resized-and-cropped pixels of an RGB Pillow image, (h, w, 3) uint8.

    ``scale``: how much smaller ``img`` is than the image ``plan`` was made for (a JPEG decoded
    at reduced scale); the box is mapped onto it."""
    box = tuple(b / scale for b in plan.box)
    part = np.asarray(_resize_box(img, plan.size, interpolation, box))
    if not plan.padded:
        return part
    out = np.empty((*plan.out, 3), dtype=np.uint8)
    out[...] = np.asarray(plan.fill, dtype=np.uint8)
    (t, left), (w, h) = plan.offset, plan.size
    out[t:t + h, left:left + w] = part
    return out


def _rgb(img: Image.Image) -> Image.Image:
    from .data import to_rgb_array

    return img if img.mode == "RGB" else Image.fromarray(to_rgb_array(img))


def render_all(img: Image.Image, recipes: dict, scale: float = 1.0, size: tuple | None = None) -> dict:
    """{key: (h, w, 3) uint8} for every recipe, from one decoded image.

    ``size``: the (w, h) the plans are made for, when ``img`` is a reduced decode of it."""
    img = _rgb(img)
    w, h = size or img.size
    return {k: render(img, r.plan(h, w), r.interpolation, scale) for k, r in recipes.items()}


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(w, h) after EXIF rotation (orientations 5-8 swap the sides)."""
    w, h = img.size
    try:
        turned = int(img.getexif().get(0x0112, 1) or 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - unreadable EXIF: exif_transpose will not turn it either
        turned = False
    return (h, w) if turned else (w, h)


def _draft(img: Image.Image, recipes: dict) -> tuple[float, tuple[int, int]]:
    """Ask the JPEG decoder for a reduced scale when that provably changes nothing that
    matters (see :data:`DRAFT_GAP`); return (scale, oriented full size (w, h))."""
    w, h = _oriented_size(img)
    if img.format != "JPEG" or img.mode not in ("RGB", "L", "YCbCr") or not recipes:
        return 1.0, (w, h)
    need_h = max(r.resized(h, w)[0] for r in recipes.values())
    need_w = max(r.resized(h, w)[1] for r in recipes.values())
    want = (math.ceil(DRAFT_GAP * need_w), math.ceil(DRAFT_GAP * need_h))
    if (w, h) != img.size:  # draft works in the file's orientation
        want = want[::-1]
    if want[0] * 2 > img.size[0] or want[1] * 2 > img.size[1]:
        return 1.0, (w, h)
    file_w = img.size[0]
    res = img.draft(img.mode, want)
    if res is None:
        return 1.0, (w, h)
    return file_w / res[1][2], (w, h)


def decode_for(src: "str | os.PathLike | bytes", recipes: dict, name: str | None = None) -> dict:
    """Decode an image file (path or bytes) once; {key: timm's uint8 (h, w, 3) input} per recipe.

    Same pixels and same errors (:class:`ImageDecodeError`) as ``data.decode_image`` followed by
    each backbone's timm transform, except that a JPEG much larger than every backbone needs is
    decoded at a reduced scale first (:data:`DRAFT_GAP`)."""
    from .data import ImageDecodeError

    raw = isinstance(src, (bytes, bytearray, memoryview))
    name = name or ("<bytes>" if raw else os.fspath(src))
    try:
        with Image.open(io.BytesIO(src) if raw else src) as img:
            scale, size = _draft(img, recipes)
            img.load()
            return render_all(ImageOps.exif_transpose(img), recipes, scale, size)
    except FileNotFoundError as e:
        raise ImageDecodeError(f"file not found: {name}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode {name}: {e}") from e


def render_tensor(img: torch.Tensor, plan: Plan, interpolation: str) -> torch.Tensor:
    """:func:`render` for a (3, H, W) uint8 tensor on any device (the device-decode path):
    the whole image resized with Pillow's antialiased filter as F.interpolate implements it,
    then cropped/padded; (3, h, w) uint8."""
    mode = DEVICE_FILTERS[interpolation]
    (rh, rw), (y0, x0), (w, h) = plan.resized, plan.start, plan.size
    x = img
    if (rh, rw) != tuple(img.shape[-2:]):
        kw = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
        x = F.interpolate(img[None].float(), size=(rh, rw), mode=mode, **kw)[0]
        x = x.clamp_(0, 255).round_().to(torch.uint8)
    x = x[:, y0:y0 + h, x0:x0 + w]
    if not plan.padded:
        return x
    out = torch.tensor(plan.fill, dtype=torch.uint8, device=img.device).view(3, 1, 1).repeat(1, *plan.out)
    (t, left) = plan.offset
    out[:, t:t + h, left:left + w] = x
    return out


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


def images_from_jpeg_bytes(datas: Sequence[torch.Tensor], recipes: dict, device: torch.device | str
                           ) -> tuple[list, list]:
    """Batch-decode JPEG byte tensors on ``device``; return (inputs, failures).

    ``inputs[i]`` is {key: (3, h, w) uint8 tensor on ``device``}, timm's input for each recipe
    (:func:`render_tensor`), or None when image i could not be decoded there; ``failures``
    lists those indices (the caller decodes them with Pillow instead). One bad file does not
    lose the batch: nvjpeg fails whole batches, so they are retried one by one.
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
    inputs, failures = [], []
    for i, img in enumerate(imgs):
        if img is None or img.ndim != 3 or img.shape[0] != 3:
            inputs.append(None)
            failures.append(i)
            continue
        h, w = img.shape[-2:]
        inputs.append({k: render_tensor(img, r.plan(h, w), r.interpolation) for k, r in recipes.items()})
    return inputs, failures


class Normalizer:
    """Batched uint8 -> normalised float for one backbone, on any device.

    Input (B, 3, H, W) uint8 in any memory format (the loader hands over channels_last batches:
    stacked HWC images, permuted, no copy); the float conversion keeps the layout and the
    normalisation is in place."""

    def __init__(self, data_config: dict, device: torch.device | str = "cpu", channels_last: bool = False):
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(data_config["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
                              * 255.0)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixel values in [0, 255] -> normalised float32: a new tensor for uint8
        input; a float32 input (a temporary of the caller's) is normalised in place."""
        x = x.float()
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)  # a no-op when the layout is already right
        return x.sub_(self.mean).mul_(self.inv_std)


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
        self.normalize = Normalizer(data_config, device, channels_last)

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
        return self.normalize(x)


def reference_transform(data_config: dict):
    """timm's own eval transform for this data config (PIL image -> normalized tensor)."""
    import timm.data

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items() if k in keys}
    return timm.data.create_transform(**cfg, is_training=False)
