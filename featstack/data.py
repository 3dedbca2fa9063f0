"""Data sources: where images come from, and how each one is decoded into an RGB array.

A source fixes the sample table (ids, labels, splits, class names) before any image is read, so
the cache can be laid out, fingerprinted and resumed; decoding happens later, one row at a time,
inside DataLoader workers. Sources are therefore small and picklable: paths, not pixels.

Kinds:
  * image folder: ``root/<class>/*.jpg`` or ``root/{train,val,test}/<class>/*``; a loose folder
    of images (no class subfolders) gives unlabelled rows;
  * manifest: CSV or JSONL with ``path``, optional ``label``, ``split`` and ``id`` (paths are
    relative to the manifest file);

Rows without a label get the split "unlabelled" (never "train"): predict and info see them, no
training or scoring does.
  * arrays: in-memory ``(N, H, W[, C])`` uint8 images from Python;
  * ``"demo"``: scikit-learn's bundled digits as RGB images with a fixed, seeded train/test split.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .cache import LABELLED_SPLITS, SPLITS, UNLABELLED, SampleTable
from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MANIFEST_EXTENSIONS = (".csv", ".jsonl")
DEMO_SIDE = 32


class ImageDecodeError(Exception):
    """One sample could not be turned into an image: recorded in the cache's error table."""


def decode_image(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Read an image file into an (H, W, 3) uint8 array the way photos are meant to be seen.

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit modes become RGB; alpha is
    composited on white (what a viewer shows) rather than dropped to black. A truncated file is
    an error, not a half-grey image: ``img.load()`` forces the full decode here. ``data``: the
    file's bytes when already read (``path`` then only names it in errors).
    """
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb_array(img)
    except FileNotFoundError as e:
        raise ImageDecodeError(f"file not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode {path}: {e}") from e


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow mode → (H, W, 3) uint8 RGB."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


class Source:
    """Base class: a fixed sample table plus ``load(row)`` → (H, W, 3) uint8."""

    samples: SampleTable
    description: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, row: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, {len(self)} samples)"


class FileSource(Source):
    """A source whose rows are image files on disk (folder or manifest)."""

    def __init__(self, paths: Sequence[str], samples: SampleTable, description: str):
        self.paths = [str(p) for p in paths]
        self.samples = samples
        self.description = description

    def load(self, row: int) -> np.ndarray:
        return decode_image(self.paths[row])


def file_stat(path: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime in ns) of an input file, (-1, -1) when it cannot be read. Recorded per row
    with the features, compared on every re-run to notice replaced or edited images."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def content_hash(data: bytes) -> int:
    """64-bit blake2b of an input's bytes (as a signed int64, to be stored as one)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def read_input(path: str | os.PathLike) -> tuple[bytes, tuple[int, int, int]]:
    """An input file's bytes and its record (size, mtime_ns, content hash), from one read:
    the size and mtime are those of the file the bytes came from (fstat of the open file)."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
    except FileNotFoundError as e:
        raise ImageDecodeError(f"file not found: {path}") from e
    except OSError as e:
        raise ImageDecodeError(f"cannot read {path}: {e.strerror or e}") from e
    return data, (int(st.st_size), int(st.st_mtime_ns), content_hash(data))


def _file_stats(paths: Sequence[Path]) -> tuple[list, list]:
    stats = [file_stat(p) for p in paths]
    return [s for s, _ in stats], [m for _, m in stats]


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


class ImageFolderSource(FileSource):
    """``root/<class>/<image>``, or the same under ``root/train``, ``root/val``, ``root/test``.

    Class names are the union of class folder names over all splits, sorted; sample ids are
    paths relative to ``root`` in POSIX form, so they stay stable across machines.
    """

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: not a directory")
        split_dirs = {s: root / s for s in LABELLED_SPLITS if (root / s).is_dir()}
        layout = split_dirs or {"train": root}
        per_split = {s: _class_folders(d) for s, d in layout.items()}
        classes = sorted({c.name for folders in per_split.values() for c in folders})
        if not classes:
            self._init_loose(root)
            return
        index = {c: i for i, c in enumerate(classes)}
        paths, ids, labels, splits = [], [], [], []
        for split, folders in per_split.items():
            for folder in folders:
                for f in _image_files(folder):
                    paths.append(f)
                    ids.append(f.relative_to(root).as_posix())
                    labels.append(index[folder.name])
                    splits.append(split)
        if not paths:
            raise DataError(f"{root}: class folders {classes} hold no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        sizes, mtimes = _file_stats(paths)
        samples = SampleTable(ids, labels, splits, classes, sizes=sizes, mtimes=mtimes)
        super().__init__(paths, samples, f"image folder {root}")

    def _init_loose(self, root: Path) -> None:
        """A folder of images without class subfolders: every image unlabelled."""
        files = sorted(p for p in root.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise DataError(f"{root}: no class subfolders and no image files found (expected "
                            f"{root}/<class>/<image>, {root}/train/<class>/<image>, or images in {root})")
        sizes, mtimes = _file_stats(files)
        samples = SampleTable([f.name for f in files], [-1] * len(files), [UNLABELLED] * len(files), [],
                              sizes=sizes, mtimes=mtimes)
        FileSource.__init__(self, files, samples, f"image folder {root} (unlabelled)")


def _manifest_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a CSV or JSONL manifest; malformed lines named."""
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}, line {lineno}: expected a JSON object")
                rows.append((lineno, rec))
        return rows
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty manifest") from None
        header = [h.strip() for h in header]
        for rec in reader:
            lineno = reader.line_num
            if not rec or all(not v.strip() for v in rec):
                continue
            if len(rec) != len(header):
                raise DataError(f"{path}, line {lineno}: {len(rec)} fields, the header has "
                                f"{len(header)} ({','.join(header)})")
            rows.append((lineno, dict(zip(header, (v.strip() for v in rec)))))
    return rows


def _manifest_split(rec: dict, label: str) -> str:
    """The split of a manifest row: as written (default train), except that a row without a
    label is "unlabelled" unless it names val or test: it cannot be trained on."""
    split = str(rec.get("split") or "train").strip()
    return UNLABELLED if not label and split == "train" else split


UNLABELLED_VALUES = ("", "-1")  # with null: a sample without a label


def label_name(value, where: str) -> str:
    """The class name of a manifest label: numbers normalised (``1`` == ``1.0`` == ``"1"``), so
    one value is one class whatever way it was written; "" for unlabelled (empty, null, -1)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: 'label' must be a string or a number, got {type(value).__name__} {value!r}")
    text = str(value).strip()
    try:
        num = float(text)
    except ValueError:
        return text
    if num != num or num in (float("inf"), float("-inf")):
        raise DataError(f"{where}: 'label' {text!r} is not a class")
    text = str(int(num)) if num.is_integer() else repr(num)
    return "" if text in UNLABELLED_VALUES else text


class ManifestSource(FileSource):
    """CSV or JSONL manifest: ``path``, optional ``label`` (class name), ``split`` and ``id``.

    Relative paths are resolved against the manifest's folder. A missing, empty, null or -1 label
    means unlabelled (-1, split "unlabelled" unless the row names val or test); numeric labels
    are one class per value (see :func:`label_name`). A missing image file is not an error here:
    it is recorded when extraction reaches it.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: manifest not found")
        records = _manifest_rows(path)
        if not records:
            raise DataError(f"{path}: the manifest lists no samples")
        for lineno, rec in records:
            if "path" not in rec:
                raise DataError(f"{path}, line {lineno}: missing field 'path'")
            if not isinstance(rec["path"], str):
                raise DataError(f"{path}, line {lineno}: 'path' must be a string, got "
                                f"{type(rec['path']).__name__} {rec['path']!r}")
            if not rec["path"].strip():
                raise DataError(f"{path}, line {lineno}: empty 'path'")
            split = str(rec.get("split") or "train").strip()
            if split not in SPLITS:
                raise DataError(f"{path}, line {lineno}: unknown split {split!r} "
                                f"(splits are {', '.join(SPLITS)})")
        label_names = [label_name(rec.get("label"), f"{path}, line {lineno}") for lineno, rec in records]
        classes = sorted({name for name in label_names if name})
        index = {c: i for i, c in enumerate(classes)}
        base = path.parent
        files = [base / str(rec["path"]).strip() for _, rec in records]
        ids, seen = [], {}
        for (lineno, rec), f in zip(records, files):
            sid = str(rec.get("id") or str(rec["path"]).strip())
            if sid in seen:
                raise DataError(f"{path}, line {lineno}: duplicate id {sid!r} (first on line {seen[sid]})")
            seen[sid] = lineno
            ids.append(sid)
        samples = SampleTable(
            ids, [index.get(name, -1) for name in label_names],
            [_manifest_split(rec, name) for (_, rec), name in zip(records, label_names)], classes,
            sizes=_file_stats(files)[0], mtimes=_file_stats(files)[1])
        super().__init__(files, samples, f"manifest {path}")


class ArraySource(Source):
    """In-memory images: ``(N, H, W)`` or ``(N, H, W, C)`` uint8 with labels and splits."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], *, splits: Sequence[str] | None = None,
                 classes: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                 description: str = "arrays"):
        images = np.asarray(images)
        if images.ndim not in (3, 4) or images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, H, W[, C]); got {images.dtype} {images.shape}")
        if images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
            raise DataError(f"images have {images.shape[-1]} channels; expected 1, 3 or 4")
        n = len(images)
        labels = np.asarray(labels, dtype=np.int64)
        classes = list(classes) if classes is not None else [str(c) for c in range(int(labels.max()) + 1)]
        ids = list(ids) if ids is not None else [f"{i:06d}" for i in range(n)]
        splits = list(splits) if splits is not None else ["train"] * n
        digest = [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest()[:16] for im in images]
        self.images = images
        self.samples = SampleTable(ids, labels, splits, classes, content=digest)
        self.description = description

    def load(self, row: int) -> np.ndarray:
        im = self.images[row]
        if im.ndim == 2:
            return np.repeat(im[:, :, None], 3, axis=2)
        if im.shape[-1] == 1:
            return np.repeat(im, 3, axis=2)
        if im.shape[-1] == 4:
            return to_rgb_array(Image.fromarray(im, "RGBA"))
        return im


class DemoSource(ArraySource):
    """scikit-learn's bundled 8x8 digits, upscaled to 32x32 RGB, seeded stratified 75/25 split.

    Ships with scikit-learn, so the demo and tests need no download.
    """

    def __init__(self, seed: int = 0, side: int = DEMO_SIDE):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        gray = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
        imgs = np.stack([np.asarray(Image.fromarray(g).resize((side, side), Image.BICUBIC)) for g in gray])
        rgb = np.repeat(imgs[:, :, :, None], 3, axis=3)
        n = len(rgb)
        train_idx, _ = train_test_split(np.arange(n), test_size=0.25, stratify=digits.target, random_state=seed)
        splits = np.full(n, "test", dtype=object)
        splits[train_idx] = "train"
        super().__init__(rgb, digits.target, splits=list(splits), classes=[str(c) for c in range(10)],
                         ids=[f"digits/{i:04d}" for i in range(n)], description="demo: scikit-learn digits")


def synthetic_photo(rng: np.random.Generator, h: int = 96, w: int = 128, hue: float | None = None,
                    shapes: int = 4) -> Image.Image:
    """A smooth, photo-like RGB image: a colour-gradient sky, a few soft shapes, mild blur.

    For tests and benchmarks without a dataset download: noise images make every preprocessing
    difference look large, these behave like photographs. ``hue=None`` draws one from ``rng``.
    """
    from PIL import ImageDraw, ImageFilter

    hue = float(rng.uniform(0, 6.28)) if hue is None else hue
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([
        120 + 80 * np.sin(x / w * np.pi + hue) * (y / h),
        100 + 60 * np.cos(y / h * np.pi + hue / 2),
        140 + 70 * (x / w) * np.cos(hue),
    ], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(shapes):
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        rx, ry = rng.integers(w // 10, w // 3), rng.integers(h // 10, h // 3)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([cx - rx, cy - ry, cx + rx, cy + ry], fill=color)
    return img.filter(ImageFilter.GaussianBlur(radius=1.5))


def open_source(spec: "str | os.PathLike | Source") -> Source:
    """``"demo"``, an image folder, or a ``.csv``/``.jsonl`` manifest → a Source."""
    if isinstance(spec, Source):
        return spec
    text = str(spec)
    if text == "demo":
        return DemoSource()
    path = Path(text)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory "
                        "(expected an image folder, a .csv/.jsonl manifest, or 'demo')")
    if path.is_dir():
        return ImageFolderSource(path)
    if path.suffix.lower() in MANIFEST_EXTENSIONS:
        return ManifestSource(path)
    raise DataError(f"{path}: not a folder nor a manifest ({', '.join(MANIFEST_EXTENSIONS)})")
