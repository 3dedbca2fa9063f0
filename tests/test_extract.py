"""Extraction end to end: real timm models, real image files, real HDF5 caches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import REPO, shard_files, wait_until, write_image_folder
from featstack.backbones import load_backbone, resolve_backbone, state_dict_sha256
from featstack.cache import generation_dir, open_cache, shard_root
from featstack.data import open_source
from featstack.errors import BackboneError, CacheMismatchError, ConfigError, DataError
from featstack.extract import extract
from featstack.preprocess import reference_transform

FAST = dict(weights="none", workers=0, batch_size=8, progress=False)


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "featstack", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=env, **kw)


def test_extract_folder_round_trip(image_folder, tmp_path):
    cache = tmp_path / "x.h5"
    res = extract(str(image_folder), ["test_resnet", "test_vit"], cache, shard_rows=10, **FAST)
    c = open_cache(cache)
    src = open_source(image_folder)
    assert c.backbones == ["test_resnet", "test_vit"]
    np.testing.assert_array_equal(c.ids, src.samples.ids)
    assert list(c.classes) == ["cat", "dog", "fox"]
    assert (c.splits == "train").sum() == 18 and (c.splits == "test").sum() == 6
    X = c.features(["test_resnet", "test_vit"])
    assert X.shape == (24, 96 + 64) and np.isfinite(X).all()
    assert c.errors == [] and res.errors == 0
    info = c.backbone_info("test_vit")
    assert info["timm_name"] == "test_vit" and info["weights_source"] == "none"
    assert info["data_config"]["input_size"] == [3, 160, 160]
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["timm"] == timm.__version__
    assert info["dtype"] == "float16" and len(info["weights_sha256"]) == 64


def test_reference_path_matches_timm_transform(image_folder, tmp_path):
    """--preprocess reference is exactly timm's create_transform + the model's forward."""
    cache = tmp_path / "x.h5"
    extract(str(image_folder), ["test_vit"], cache, preprocess="reference", dtype="float32", **FAST)
    c = open_cache(cache)
    lb = load_backbone(resolve_backbone("test_vit", weights="none"))
    t = reference_transform(lb.data_config)
    src = open_source(image_folder)
    x = torch.stack([t(Image.fromarray(src.load(i))) for i in range(4)])
    with torch.inference_mode():
        want = lb.model(x).numpy()
    np.testing.assert_allclose(c.features("test_vit")[:4], want, rtol=1e-4, atol=1e-5)


def test_corrupt_and_missing_images_recorded_and_skipped(tmp_path):
    root = write_image_folder(tmp_path / "p", per_class={"train": 4})
    (root / "train" / "dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    cache = tmp_path / "x.h5"
    res = extract(str(root), ["test_resnet"], cache, **FAST)
    c = open_cache(cache)
    assert res.errors == 1 and len(c.errors) == 1
    err = c.errors[0]
    assert err["id"] == "train/dog/bad.jpg" and "bad.jpg" in err["message"]
    X = c.features("test_resnet")
    row = list(c.ids).index("train/dog/bad.jpg")
    assert np.isnan(X[row]).all() and not c.valid[row]
    assert np.isfinite(X[c.valid]).all() and c.valid.sum() == 12


def test_adding_a_backbone_extracts_only_that_one(image_folder, tmp_path):
    cache = tmp_path / "x.h5"
    extract(str(image_folder), ["test_resnet"], cache, shard_rows=10, **FAST)
    shards = sorted((generation_dir(cache, "test_resnet")).glob("*.h5"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    before = open_cache(cache).features("test_resnet")
    res = extract(str(image_folder), ["test_resnet", "test_vit"], cache, shard_rows=10, **FAST)
    assert res.shards_skipped == 3 and res.shards_written == 3
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    c = open_cache(cache)
    assert c.backbones == ["test_resnet", "test_vit"]
    np.testing.assert_array_equal(c.features("test_resnet"), before)
    again = extract(str(image_folder), ["test_resnet", "test_vit"], cache, **FAST)
    assert again.rows_processed == 0 and again.shards_written == 0


def test_fingerprint_mismatch_refused_then_overwrite(image_folder, tmp_path):
    cache = tmp_path / "x.h5"
    extract(str(image_folder), ["test_resnet"], cache, **FAST)
    before = open_cache(cache).features("test_resnet")
    with pytest.raises(CacheMismatchError, match="test_resnet.*weights_sha256.*--overwrite"):
        extract(str(image_folder), ["test_resnet"], cache, seed=1, **FAST)
    np.testing.assert_array_equal(open_cache(cache).features("test_resnet"), before)  # nothing lost
    with pytest.raises(CacheMismatchError, match="preprocess"):
        extract(str(image_folder), ["test_resnet"], cache, preprocess="reference", **FAST)
    extract(str(image_folder), ["test_resnet"], cache, seed=1, overwrite=True, **FAST)
    assert not np.array_equal(open_cache(cache).features("test_resnet"), before)


def test_other_dataset_refused(image_folder, tmp_path):
    cache = tmp_path / "x.h5"
    extract(str(image_folder), ["test_resnet"], cache, **FAST)
    other = write_image_folder(tmp_path / "other", per_class={"train": 3})
    with pytest.raises(CacheMismatchError, match="another dataset"):
        extract(str(other), ["test_resnet"], cache, **FAST)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_reproduces_the_saved_model(image_folder, tmp_path, suffix):
    """A checkpoint saved here (with its classifier) loads through --weights-file."""
    torch.manual_seed(123)
    full = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": full.state_dict()}, path)
    cache = tmp_path / "x.h5"
    r = _cli("extract", "--data", image_folder, "--backbones", "test_resnet", "--weights-file",
             f"test_resnet={path}", "--cache", cache, "--workers", "0", "--dtype", "float32",
             "--preprocess", "reference", "--no-progress")
    assert r.returncode == 0, r.stderr
    full.reset_classifier(0)
    full.eval()
    c = open_cache(cache)
    assert c.backbone_info("test_resnet")["weights_sha256"] == state_dict_sha256(full)
    assert c.backbone_info("test_resnet")["weights_source"] == f"file:{path.resolve()}"
    lb_cfg = c.backbone_info("test_resnet")["data_config"]
    t = reference_transform(lb_cfg)
    src = open_source(image_folder)
    x = torch.stack([t(Image.fromarray(src.load(i))) for i in range(3)])
    with torch.inference_mode():
        want = full(x).numpy()
    np.testing.assert_allclose(c.features("test_resnet")[:3], want, rtol=1e-4, atol=1e-5)


def test_weights_file_errors(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        resolve_backbone("test_resnet", weights_file=tmp_path / "none.safetensors")
    torch.manual_seed(0)
    other = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file
    save_file(timm.create_model("test_vit", num_classes=0).state_dict(), str(other))
    spec = resolve_backbone("test_resnet", weights_file=other)
    with pytest.raises(BackboneError, match="does not fit 'test_resnet'"):
        load_backbone(spec)


def test_bad_inputs_fail_before_any_work(image_folder, tmp_path):
    cache = tmp_path / "x.h5"
    r = _cli("extract", "--data", image_folder, "--backbones", "test_resnet,resnet5O", "--weights",
             "none", "--cache", cache)
    assert r.returncode == 2 and "unknown backbone 'resnet5O'" in r.stderr and "resnet50" in r.stderr
    assert r.stderr.count("\n") == 1 and not cache.exists()
    r = _cli("extract", "--data", tmp_path / "nope", "--backbones", "test_resnet", "--cache", cache)
    assert r.returncode == 2 and "nope" in r.stderr and not cache.exists()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.jpg,cat\nb.jpg,dog,extra,\n")
    r = _cli("extract", "--data", manifest, "--backbones", "test_resnet", "--weights", "none", "--cache", cache)
    assert r.returncode == 2 and "line 3" in r.stderr and not cache.exists()
    r = _cli("extract", "--data", image_folder, "--backbones", "test_resnet", "--weights-file",
             "test_vit=x.pth", "--weights", "none", "--cache", cache)
    assert r.returncode == 2 and "test_vit, not among the backbones" in r.stderr
    r = _cli("extract", "--data", image_folder, "--backbones", "test_resnet", "--weights-file",
             f"test_resnet={tmp_path / 'x.pth'}", "--cache", cache)
    assert r.returncode == 2 and "x.pth" in r.stderr and "not found" in r.stderr and not cache.exists()
    with pytest.raises(ConfigError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        extract(str(image_folder), ["test_resnet"], cache, device="cuda", **FAST)


def test_unreachable_hub_is_one_clear_error(image_folder, tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://hub.invalid")
    t = time.time()
    r = _cli("extract", "--data", image_folder, "--backbones", "test_resnet", "--cache",
             tmp_path / "x.h5", env=env, timeout=120)
    assert r.returncode == 2 and "cannot load pretrained weights for 'test_resnet'" in r.stderr
    assert "--weights none" in r.stderr and time.time() - t < 60


def test_cli_info_human_and_json(image_folder, tmp_path):
    cache = tmp_path / "x.h5"
    r = _cli("extract", "--data", image_folder, "--backbones", "test_resnet,test_vit", "--weights", "none",
             "--cache", cache, "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "device cpu" in r.stderr  # the device actually used is said
    r = _cli("info", cache)
    assert r.returncode == 0 and "test_vit" in r.stdout and "24 samples" in r.stdout and "complete" in r.stdout
    js = json.loads(_cli("info", cache, "--json").stdout)
    assert js["n_samples"] == 24 and js["splits"] == {"train": 18, "val": 0, "test": 6}
    assert [b["key"] for b in js["backbones"]] == ["test_resnet", "test_vit"]
    assert [b["dim"] for b in js["backbones"]] == [96, 64] and all(b["complete"] for b in js["backbones"])


def test_resume_after_killing_a_real_extraction(tmp_path):
    """SIGKILL mid-run, re-run: the cache equals an uninterrupted run's, row for row."""
    root = write_image_folder(tmp_path / "p", per_class={"train": 40}, sizes=((160, 200),))
    args = ["extract", "--data", root, "--backbones", "test_resnet,test_vit", "--weights", "none",
            "--shard-rows", "8", "--batch-size", "4", "--workers", "0", "--no-progress"]
    killed = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-m", "featstack", *map(str, args), "--cache", str(killed)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(shard_files(killed, "test_vit")) >= 3, what="3 shards on disk", proc=proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = len(shard_files(killed, "test_vit")) + len(shard_files(killed, "test_resnet"))
    assert 3 <= done < 30, f"kill landed with {done} of 30 shards written"
    r = _cli(*args, "--cache", killed)
    assert r.returncode == 0, r.stderr
    assert f"{30 - done} shards written, {done} skipped" in r.stdout, r.stdout
    clean = tmp_path / "clean.h5"
    assert _cli(*args, "--cache", clean).returncode == 0
    a, b = open_cache(killed), open_cache(clean)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert len(set(a.ids)) == len(a.ids) == 120
    for key in ("test_resnet", "test_vit"):
        np.testing.assert_array_equal(a.features(key), b.features(key))
    assert not list(shard_root(killed).rglob("*.tmp"))
