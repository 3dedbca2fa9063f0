"""The fast extraction path: agreement with timm's reference transform, device JPEG decoding
(its CPU twin), bounded memory, torch.compile, parallelism defaults. Real files, real timm
models, real HDF5 caches."""
from __future__ import annotations

import io
import multiprocessing as mp
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import featstack.extract as fx
from conftest import REPO, synthetic_photo, write_image_folder
from featstack.cache import CacheWriter, open_cache
from featstack.data import decode_image, open_source
from featstack.errors import ConfigError
from featstack.extract import extract, resolve_decode, resolve_parallelism
from featstack.preprocess import Recipe, decode_for, images_from_jpeg_bytes, is_plain_jpeg, render_all

BASE = dict(weights="none", workers=0, progress=False, dtype="float32")


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Photo-like JPEG/PNG files in several modes and sizes, some large enough that the fast
    path decodes them at half scale (Image.draft)."""
    root = tmp_path_factory.mktemp("speed") / "photos"
    return write_image_folder(root, per_class={"train": 8},
                              sizes=((96, 128), (400, 560), (300, 220), (64, 64), (600, 380)))


@pytest.mark.parametrize("key", ["test_resnet", "test_vit"])
def test_fast_path_agrees_with_reference(photos, tmp_path, key, record_property):
    """Decode once + batched device preprocessing vs timm's create_transform, per image."""
    feats = {}
    for mode in ("fast", "reference"):
        cache = tmp_path / f"{mode}.h5"
        extract(str(photos), [key], cache, preprocess=mode, batch_size=8, **BASE)
        feats[mode] = open_cache(cache).features(key)
    fast, ref = feats["fast"], feats["reference"]
    assert fast.shape == ref.shape == (24, open_cache(tmp_path / "fast.h5").dim(key))
    same = _cos_rows(fast, ref)
    # The check must be able to fail: rows of different images are far apart...
    rn = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    cross = rn @ rn.T
    off = cross[~np.eye(len(rn), dtype=bool)]
    assert np.median(off) < 0.95, f"{key}: embeddings barely depend on the image (median cross cosine {np.median(off):.3f})"
    # ...and each fast row's nearest reference row is its own image's.
    fn = fast / np.linalg.norm(fast, axis=1, keepdims=True)
    hits = float(((fn @ rn.T).argmax(1) == np.arange(len(fn))).mean())
    msg = (f"{key}: fast vs reference cosine min {same.min():.5f}, mean {same.mean():.5f} "
           f"(different images: median {np.median(off):.3f}); nearest-neighbour hits {hits:.0%}")
    print(msg)
    record_property("min_cosine", float(same.min()))
    assert same.min() >= 0.99, msg
    assert hits >= 0.9, msg


_CFG = dict(input_size=(3, 64, 64), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)


def test_decode_for_matches_full_decode(photos, monkeypatch):
    """JPEG DCT-scaled decoding (files at least DRAFT_GAP times larger than needed) stays close
    to a full decode + timm's resize; smaller files are decoded in full: identical pixels."""
    import featstack.preprocess as pp

    monkeypatch.setattr(pp, "DRAFT_GAP", 2.0)
    src = open_source(photos)
    recipes = {"a": Recipe.from_config(_CFG), "b": Recipe.from_config(dict(_CFG, crop_mode="squash"))}
    diffs, drafted = [], 0
    for row in range(len(src)):
        path = src.paths[row]
        full = render_all(Image.fromarray(decode_image(path)), recipes)
        fast = decode_for(path, recipes)
        with Image.open(path) as im:
            small = im.format == "JPEG" and min(im.size) >= 2 * 2.0 * 73  # 73 = floor(64 / 0.875)
        drafted += small
        for k in recipes:
            assert fast[k].shape == full[k].shape == (64, 64, 3) and fast[k].dtype == np.uint8
            d = np.abs(fast[k].astype(int) - full[k].astype(int))
            diffs.append(d.mean())
            if not small:
                assert d.max() == 0, (path, k)
    assert drafted >= 3  # the reduced-scale branch really ran
    assert max(diffs) < 3.0, diffs  # mean abs difference, in uint8 levels


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def test_images_from_jpeg_bytes_on_cpu_match_pillow():
    """The device-decode batch builder (torchvision decode_jpeg + F.interpolate), run on the CPU."""
    rng = np.random.default_rng(3)
    imgs = [synthetic_photo(rng, h, w, hue=i) for i, (h, w) in enumerate([(96, 128), (300, 220), (183, 183)])]
    datas = [_jpeg_bytes(im) for im in imgs] + [_jpeg_bytes(imgs[0].convert("L"))]
    bad = datas[0][: len(datas[0]) // 3] + b"\x00" * 10
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas + [b"not a jpeg at all"]]
    recipes = {m: Recipe.from_config(dict(_CFG, crop_mode=m, crop_pct=0.9)) for m in ("center", "squash", "border")}
    inputs, failures = images_from_jpeg_bytes(tensors, recipes, "cpu")
    assert failures == [4] and inputs[4] is None
    for d, got in zip(datas, inputs):
        want = decode_for(d, recipes)
        for k in recipes:
            x = got[k]
            assert x.shape == (3, 64, 64) and x.dtype == torch.uint8 and x.device.type == "cpu"
            assert np.abs(x.permute(1, 2, 0).numpy().astype(int) - want[k].astype(int)).mean() < 2.0, k
    assert is_plain_jpeg(datas[0]) and is_plain_jpeg(datas[3])
    assert not is_plain_jpeg(b"\x89PNG\r\n\x1a\n") and not is_plain_jpeg(bad)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: nvjpeg ignores EXIF, so Pillow must decode it
    assert not is_plain_jpeg(_jpeg_bytes(imgs[1], exif=exif))
    assert not is_plain_jpeg(_jpeg_bytes(imgs[1].convert("CMYK")))


def test_device_decode_path_runs_on_cpu_and_matches(photos, tmp_path, monkeypatch):
    """decode='gpu' is the same code path on any device: run it on the CPU (torchvision's
    libjpeg decoder instead of nvjpeg) and compare with Pillow decoding, row by row; PNGs,
    rotated, CMYK and corrupt files take the fallbacks."""
    root = tmp_path / "p"
    import shutil
    shutil.copytree(photos, root)
    rng = np.random.default_rng(5)
    d = root / "train" / "cat"
    exif = Image.Exif()
    exif[0x0112] = 6
    synthetic_photo(rng, 200, 260).save(d / "rotated.jpg", quality=90, exif=exif)
    synthetic_photo(rng, 200, 260).convert("CMYK").save(d / "cmyk.jpg", quality=90)
    (d / "broken.jpg").write_bytes(_jpeg_bytes(synthetic_photo(rng, 200, 260))[:600])
    (d / "zbad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ConfigError, match="--decode gpu"):
        extract(str(root), ["test_resnet"], tmp_path / "x.h5", device="cpu", decode="gpu", **BASE)
    assert resolve_decode("auto", torch.device("cpu"), open_source(root), "fast") == "cpu"
    monkeypatch.setattr(fx, "_DEVICE_DECODE_TYPES", ("cuda", "cpu"))
    calls = []
    real = fx.images_from_jpeg_bytes
    monkeypatch.setattr(fx, "images_from_jpeg_bytes", lambda datas, *a: calls.append(len(datas)) or real(datas, *a))
    keys = ["test_resnet", "test_vit"]
    res = extract(str(root), keys, tmp_path / "dev.h5", device="cpu", decode="gpu", batch_size=8,
                  workers=1, **{k: v for k, v in BASE.items() if k != "workers"})
    assert res.decode == "gpu" and sum(calls) >= 12  # the JPEGs went through the batched decoder
    extract(str(root), keys, tmp_path / "pil.h5", device="cpu", decode="cpu", batch_size=8, **BASE)
    a, b = open_cache(tmp_path / "dev.h5"), open_cache(tmp_path / "pil.h5")
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.valid, b.valid)
    assert [e["id"] for e in a.errors] == [e["id"] for e in b.errors]
    assert {e["id"].split("/")[-1] for e in a.errors} >= {"zbad.jpg"}
    for key in keys:
        x, y = a.features(key)[a.valid], b.features(key)[b.valid]
        cos = _cos_rows(x, y)
        print(f"{key}: device-decode path (torchvision decode_jpeg on CPU) vs Pillow cosine min {cos.min():.5f}")
        assert cos.min() >= 0.995, f"{key}: device-decode vs Pillow cosine min {cos.min():.5f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvjpeg)")
def test_gpu_decode_on_cuda_matches_cpu_decode(photos, tmp_path):
    keys = ["test_resnet", "test_vit"]
    common = dict(weights="none", progress=False, dtype="float32", device="cuda", precision="fp32", batch_size=8)
    res = extract(str(photos), keys, tmp_path / "gpu.h5", decode="gpu", **common)
    assert res.decode == "gpu"
    assert extract(str(photos), keys, tmp_path / "a.h5", decode="auto", **common).decode == "gpu"
    extract(str(photos), keys, tmp_path / "cpu.h5", decode="cpu", **common)
    a, b = open_cache(tmp_path / "gpu.h5"), open_cache(tmp_path / "cpu.h5")
    for key in keys:
        assert _cos_rows(a.features(key), b.features(key)).min() >= 0.99
    bf = extract(str(photos), keys, tmp_path / "bf16.h5", **dict(common, precision="bf16"))
    assert bf.precision == "bf16"
    c = open_cache(tmp_path / "bf16.h5")
    for key in keys:
        assert _cos_rows(c.features(key), b.features(key)).min() >= 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 autocast)")
def test_auto_precision_is_fp16_on_cuda_and_overflow_is_recomputed_in_fp32(photos, tmp_path):
    """auto = fp16 on CUDA (bf16 measured too coarse for real weights); weights whose activations
    overflow fp16's range (every conv scaled by 300) give finite features, recomputed in fp32,
    equal to an fp32 run's."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = timm.create_model("test_resnet", num_classes=0).state_dict()
    big = {k: (v * 300 if v.ndim == 4 else v).contiguous() for k, v in state.items()}
    path = tmp_path / "big.safetensors"
    save_file(big, str(path))
    common = dict(weights_files={"test_resnet": str(path)}, progress=False, dtype="float32", device="cuda",
                  batch_size=8)
    auto = extract(str(photos), ["test_resnet"], tmp_path / "auto.h5", **common)
    assert auto.precision == "fp16" and auto.fp32_retries > 0
    extract(str(photos), ["test_resnet"], tmp_path / "fp32.h5", precision="fp32", **common)
    a, b = open_cache(tmp_path / "auto.h5").features("test_resnet"), open_cache(tmp_path / "fp32.h5").features("test_resnet")
    assert np.isfinite(a).all() and _cos_rows(a, b).min() >= 0.9999


def test_memory_stays_bounded(tmp_path, monkeypatch):
    """100 images, 16-row shards: features are written shard by shard (no array covers more
    than one shard), one shard buffer per backbone is open at a time, the writer queue and the
    decoded-but-not-written images stay bounded."""
    root = write_image_folder(tmp_path / "p", classes=("a", "b", "c", "d"), per_class={"train": 25},
                              sizes=((72, 96), (96, 72)))
    writes, qsizes, assemblers = [], [], []
    decoded = mp.Value("i", 0)  # shared with the forked decode worker
    retired = [0]
    in_flight = [0]

    real_write = CacheWriter.write_shard

    def write_shard(self, key, start, stop, features, *a, **kw):
        writes.append((key, start, stop, np.asarray(features).shape))
        return real_write(self, key, start, stop, features, *a, **kw)

    real_submit = fx._ShardWriterThread.submit

    def submit(self, *item):
        qsizes.append((self.q.qsize(), self.q.maxsize))
        return real_submit(self, *item)

    real_init = fx._ShardAssembler.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        assemblers.append(self)

    real_add = fx._ShardAssembler.add

    def add(self, rows, outs, errors, *rest):
        for arr in outs.values():
            assert arr.shape[0] == len(rows) <= 4
        in_flight[0] = max(in_flight[0], decoded.value - retired[0])
        retired[0] += len(rows)
        return real_add(self, rows, outs, errors, *rest)

    real_getitem = fx._DecodeDataset.__getitem__

    def getitem(self, row):
        with decoded.get_lock():
            decoded.value += 1
        return real_getitem(self, row)

    monkeypatch.setattr(CacheWriter, "write_shard", write_shard)
    monkeypatch.setattr(fx._ShardWriterThread, "submit", submit)
    monkeypatch.setattr(fx._ShardAssembler, "__init__", init)
    monkeypatch.setattr(fx._ShardAssembler, "add", add)
    monkeypatch.setattr(fx._DecodeDataset, "__getitem__", getitem)
    keys = ["test_resnet", "test_vit"]
    res = extract(str(root), keys, tmp_path / "x.h5", input_size=64, shard_rows=16, batch_size=4,
                  workers=1, weights="none", progress=False)
    n, n_shards = 100, 7
    assert res.rows_processed == n and res.shards_written == n_shards * len(keys)
    assert len(writes) == n_shards * len(keys)
    assert all(stop - start <= 16 and shape[0] == stop - start for _, start, stop, shape in writes)
    for key in keys:  # shard by shard, covering every row once
        spans = sorted((s, e) for k, s, e, _ in writes if k == key)
        assert spans == [(s, min(s + 16, n)) for s in range(0, n, 16)]
    assert assemblers and assemblers[0].max_open_rows <= 16 * len(keys)
    assert all(size <= maxsize <= 2 for size, maxsize in qsizes)
    # prefetch: 1 worker x 8 batches of 4 ahead, plus the batch on the device and the one retiring
    bound = 4 * (8 + 3)
    print(f"decoded but not yet written, at most: {in_flight[0]} images (bound {bound}, dataset {n})")
    assert decoded.value == n and 0 < in_flight[0] <= bound < n, in_flight[0]
    assert open_cache(tmp_path / "x.h5").features(keys).shape == (n, 96 + 64)


def test_compile_flag_same_features(image_folder, tmp_path, monkeypatch):
    """--compile wraps every model in torch.compile (static shapes: short batches padded);
    the 'eager' backend keeps this test fast, inductor is the CLI default."""
    compiled = []
    real = torch.compile

    def spy(model, **kw):
        compiled.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    keys = ["test_resnet", "test_vit"]
    common = dict(input_size=64, batch_size=5, **BASE)
    res = extract(str(image_folder), keys, tmp_path / "c.h5", compile="eager", **common)
    assert res.compiled and [kw["backend"] for kw in compiled] == ["eager", "eager"]
    assert all(kw["dynamic"] is False for kw in compiled)
    extract(str(image_folder), keys, tmp_path / "e.h5", **common)
    a, b = open_cache(tmp_path / "c.h5"), open_cache(tmp_path / "e.h5")
    for key in keys:  # 24 rows in batches of 5: the last one was padded
        np.testing.assert_allclose(a.features(key), b.features(key), rtol=1e-4, atol=1e-4)


def test_compile_falls_back_to_eager(image_folder, tmp_path, capfd):
    """A compiler that fails on the first batch (say, no C compiler for inductor) costs a
    warning, not the run; an unknown backend is a configuration error."""
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    res = extract(str(image_folder), ["test_resnet"], tmp_path / "c.h5", compile=broken_backend,
                  input_size=64, batch_size=8, **BASE)
    assert res.rows_processed == 24 and np.isfinite(open_cache(tmp_path / "c.h5").features("test_resnet")).all()
    assert "torch.compile failed" in capfd.readouterr().err
    with pytest.raises(ConfigError, match="--compile"):
        extract(str(image_folder), ["test_resnet"], tmp_path / "d.h5", compile="no-such-backend",
                input_size=64, **BASE)


def test_fold_batchnorm():
    """BatchNorm folded into the convolutions: same embeddings, fewer passes; models without
    BatchNorm (ViT) or that cannot be traced are returned as they are."""
    from featstack.backbones import load_backbone, resolve_backbone
    from featstack.extract import fold_batchnorm

    lb = load_backbone(resolve_backbone("test_resnet", weights="none", input_size=64))
    folded = fold_batchnorm(lb.model, lb.data_config["input_size"])
    assert folded is not lb.model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lb.model.modules())  # original untouched
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), lb.model(x), rtol=1e-4, atol=1e-5)
    vit = load_backbone(resolve_backbone("test_vit", weights="none", input_size=64))
    assert fold_batchnorm(vit.model, vit.data_config["input_size"]) is vit.model

    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = -x
            return self.bn(self.conv(x)).mean((2, 3))

    m = Untraceable().eval()
    assert fold_batchnorm(m, (3, 8, 8)) is m


def test_parallelism_defaults(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(fx, "_cores", lambda: 8)
    w, t = resolve_parallelism(cpu, None, None)
    assert w >= 0 and t is not None and w + t == 8  # the cores are split, not oversubscribed
    assert resolve_parallelism(cpu, 3, None) == (3, 5)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 torchrun ranks share the 8 cores
    w, t = resolve_parallelism(cpu, None, None)
    assert w + t <= 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_parallelism(cpu, 0, None) == (0, None)  # torchrun's setting is respected
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    w, t = resolve_parallelism(gpu, None, None)
    assert 1 <= w <= 7 and t is None  # on a GPU the host cores decode
    with pytest.raises(ConfigError):
        resolve_parallelism(cpu, -1, None)


def test_threads_setting_is_used_and_restored(image_folder, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    seen = []
    real = fx._run
    monkeypatch.setattr(fx, "_run", lambda *a, **kw: seen.append(torch.get_num_threads()) or real(*a, **kw))
    res = extract(str(image_folder), ["test_resnet"], tmp_path / "x.h5", input_size=64, threads=1, **BASE)
    assert seen == [1] and res.threads == 1 and torch.get_num_threads() == before


def test_cli_speed_flags(image_folder, tmp_path):
    cache = tmp_path / "x.h5"
    r = subprocess.run([sys.executable, "-m", "featstack", "extract", "--data", str(image_folder),
                        "--backbones", "test_resnet", "--weights", "none", "--cache", str(cache),
                        "--input-size", "64", "--decode", "cpu", "--threads", "1", "--workers", "0",
                        "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "decode cpu" in r.stderr and "1 torch threads" in r.stderr
    assert open_cache(cache).features("test_resnet").shape == (24, 96)
