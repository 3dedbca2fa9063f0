"""Data sources: folder and manifest parsing, decoding of every image mode, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from featstack.data import (ArraySource, DemoSource, ImageDecodeError, ImageFolderSource,
                            ManifestSource, decode_image, open_source)
from featstack.errors import DataError

from conftest import synthetic_photo, write_image_folder


def test_image_folder_with_splits(tmp_path):
    root = write_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class={"train": 3, "test": 2})
    src = open_source(root)
    assert isinstance(src, ImageFolderSource)
    s = src.samples
    assert s.classes == ["cat", "dog"] and len(src) == 10
    assert list(s.splits).count("train") == 6 and list(s.splits).count("test") == 4
    assert s.ids[0] == "train/cat/000.jpg"
    assert all(("/cat/" in i) == (lab == 0) for i, lab in zip(s.ids, s.labels))
    img = src.load(0)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    # the ids and the fingerprint do not depend on where the folder lives
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    assert open_source(moved).samples.fingerprint() == s.fingerprint()


def test_image_folder_without_splits_and_empty(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "flat" / cls).mkdir(parents=True)
        synthetic_photo(np.random.default_rng(0)).save(tmp_path / "flat" / cls / "x.png")
    (tmp_path / "flat" / "b" / "notes.txt").write_text("not an image")
    s = open_source(tmp_path / "flat").samples
    assert list(s.ids) == ["a/x.png", "b/x.png"] and set(s.splits) == {"train"}
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="hold no image files"):
        open_source(tmp_path / "empty")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        open_source(tmp_path / "none")


def test_decode_modes(tmp_path):
    rng = np.random.default_rng(1)
    base = synthetic_photo(rng, 40, 60)
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent → white, as a viewer shows it
    rgba.save(tmp_path / "t.png")
    assert (decode_image(tmp_path / "t.png") == 255).all()
    base.convert("L").save(tmp_path / "g.jpg")
    g = decode_image(tmp_path / "g.jpg")
    assert g.shape == (40, 60, 3) and (g[..., 0] == g[..., 1]).all()
    base.convert("P", palette=Image.ADAPTIVE).save(tmp_path / "p.png")
    assert decode_image(tmp_path / "p.png").shape == (40, 60, 3)
    base.convert("CMYK").save(tmp_path / "c.jpg")
    c = decode_image(tmp_path / "c.jpg")
    assert c.shape == (40, 60, 3) and abs(c.astype(float).mean() - np.asarray(base).mean()) < 25
    # EXIF orientation 6 (rotate 90° clockwise to view): stored 40x60 → seen 60x40
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(tmp_path / "r.jpg", exif=exif)
    assert decode_image(tmp_path / "r.jpg").shape == (60, 40, 3)


def test_decode_failures_are_decode_errors(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        decode_image(tmp_path / "bad.jpg")
    synthetic_photo(np.random.default_rng(0)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        decode_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageDecodeError, match="not found"):
        decode_image(tmp_path / "gone.jpg")


def _photos(tmp_path, names):
    (tmp_path / "img").mkdir(exist_ok=True)
    for n in names:
        synthetic_photo(np.random.default_rng(len(n))).save(tmp_path / "img" / n)


def test_csv_and_jsonl_manifests(tmp_path):
    _photos(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "m.csv").write_text("path,label,split,id\nimg/a.jpg,dog,train,A\n"
                                    "img/b.jpg,cat,test,\nimg/c.jpg,,train,C\n")
    src = open_source(tmp_path / "m.csv")
    assert isinstance(src, ManifestSource)
    s = src.samples
    assert s.classes == ["cat", "dog"] and list(s.labels) == [1, 0, -1]
    # an unlabelled row never lands in "train"
    assert list(s.ids) == ["A", "img/b.jpg", "C"] and list(s.splits) == ["train", "test", "unlabelled"]
    assert src.load(1).shape == (96, 128, 3)
    lines = [{"path": "img/a.jpg", "label": "dog"}, {"path": "img/b.jpg", "label": "cat", "split": "val"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    s2 = open_source(tmp_path / "m.jsonl").samples
    assert list(s2.splits) == ["train", "val"] and list(s2.labels) == [1, 0]


@pytest.mark.parametrize("text,message", [
    ("path,label\na.jpg,cat\nb.jpg\n", "line 3"),
    ("path,label\na.jpg,cat,train\n", "line 2"),
    ("path,label,split\na.jpg,cat,holdout\n", "unknown split 'holdout'"),
    ("file,label\na.jpg,cat\n", "missing field 'path'"),
    ("path,label,id\na.jpg,cat,x\nb.jpg,dog,x\n", "duplicate id 'x'"),
    ("path,label\n", "lists no samples"),
])
def test_malformed_csv_manifest_names_line(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DataError, match=message) as e:
        open_source(tmp_path / "m.csv")
    assert "m.csv" in str(e.value)


def test_malformed_jsonl_names_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"path": "a.jpg", "label": "x"}\n{"path": "b.jpg", label}\n')
    with pytest.raises(DataError, match="line 2"):
        open_source(tmp_path / "m.jsonl")


def test_missing_manifest_file_is_recorded_not_fatal(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\ngone.jpg,cat\n")
    src = open_source(tmp_path / "m.csv")
    with pytest.raises(ImageDecodeError, match="not found"):
        src.load(0)


def test_open_source_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_source(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match="not a folder nor a manifest"):
        open_source(tmp_path / "x.txt")


def test_array_and_demo_sources():
    imgs = np.random.default_rng(0).integers(0, 255, (5, 16, 16), dtype=np.uint8)
    src = ArraySource(imgs, [0, 1, 0, 1, 1], classes=["a", "b"])
    assert src.load(2).shape == (16, 16, 3) and (src.load(2)[..., 2] == imgs[2]).all()
    changed = imgs.copy()
    changed[0, 0, 0] ^= 1
    assert ArraySource(changed, [0, 1, 0, 1, 1], classes=["a", "b"]).samples.fingerprint() != \
        src.samples.fingerprint()
    with pytest.raises(DataError, match="uint8"):
        ArraySource(imgs.astype(np.float32), [0] * 5)
    demo = DemoSource()
    assert len(demo) == 1797 and demo.samples.classes == [str(i) for i in range(10)]
    assert list(demo.samples.splits).count("test") == 450
    assert demo.load(0).shape == (32, 32, 3)
    assert DemoSource().samples.fingerprint() == demo.samples.fingerprint()


def test_loose_folder_and_manifest_without_labels_are_unlabelled(tmp_path):
    _photos(tmp_path, ["a.jpg", "b.png", "c.jpg"])
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    s = open_source(tmp_path / "img").samples
    assert list(s.ids) == ["a.jpg", "b.png", "c.jpg"] and s.classes == []
    assert list(s.labels) == [-1, -1, -1] and set(s.splits) == {"unlabelled"}
    (tmp_path / "m.csv").write_text("path\nimg/a.jpg\nimg/b.png\n")
    m = open_source(tmp_path / "m.csv").samples
    assert list(m.labels) == [-1, -1] and set(m.splits) == {"unlabelled"} and m.classes == []
    (tmp_path / "m.jsonl").write_text('{"path": "img/a.jpg", "split": "test"}\n{"path": "img/c.jpg"}\n')
    j = open_source(tmp_path / "m.jsonl").samples
    assert list(j.splits) == ["test", "unlabelled"]


def test_loose_folder_extracts_and_reports_unlabelled(tmp_path):
    from featstack.cache import open_cache
    from featstack.extract import extract

    _photos(tmp_path, ["a.jpg", "bb.jpg"])
    extract(str(tmp_path / "img"), ["test_resnet-64"], tmp_path / "c.h5", weights="none", workers=0,
            progress=False)
    c = open_cache(tmp_path / "c.h5")
    assert list(c.splits) == ["unlabelled", "unlabelled"] and c.features(["test_resnet-64"]).shape[0] == 2
    assert c.summary()["splits"]["unlabelled"] == 2
