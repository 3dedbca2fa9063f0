"""Clean failure (issue 12 f, i, j, k): every bad number, path or label is one line naming the
option, key, file or row, exit 2, before any work; nothing already written is lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, write_image_folder
from featstack.cache import NonFiniteFeaturesError, SampleTable, generation_dir, write_arrays_cache
from featstack.data import ManifestSource
from featstack.bounds import MAX_INPUT_SIZE_ENV, check_input_size
from featstack.errors import CacheError, ConfigError, DataError


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "featstack", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300, **kw)


def _one_line_error(r, *needles) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bounds") / "x.h5"
    rng = np.random.default_rng(0)
    n = 30
    samples = SampleTable(ids=[f"{i:03d}.jpg" for i in range(n)], labels=np.arange(n) % 2,
                          splits=["train"] * 24 + ["test"] * 6, classes=["a", "b"])
    write_arrays_cache(path, samples, {"f": rng.standard_normal((n, 4)) + (np.arange(n) % 2)[:, None]},
                       dtype="float32", shard_rows=10)
    return path


def test_f_input_size_bounds_before_any_work(tmp_path):
    root = write_image_folder(tmp_path / "p", per_class={"train": 1})
    base = ["extract", "--data", root, "--cache", tmp_path / "x.h5", "--backbones", "test_resnet",
            "--weights", "none", "--no-progress"]
    _one_line_error(_cli(*base, "--input-size", "100000"), "--input-size must be 16 to 2048", "100000",
                    "--max-input-size")
    for flag, value, bound in (("--input-size", "-32", "16"), ("--input-size", "0", "16"), ("--batch-size", "0", "1"),
                               ("--shard-rows", "-1", "1"), ("--workers", "-2", "0"),
                               ("--seed", str(2 ** 32), "4294967295")):
        line = _one_line_error(_cli(*base, flag, value), flag, f"got {value}")
        assert f" {bound}" in line.split(flag, 1)[1], line
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.shards").exists()
    # raised explicitly, a larger size is accepted (the limit is a guard, not a wall)
    assert check_input_size(2080, limit=4096) == 2080
    os.environ[MAX_INPUT_SIZE_ENV] = "4096"
    try:
        assert check_input_size(2080) == 2080
    finally:
        del os.environ[MAX_INPUT_SIZE_ENV]
    with pytest.raises(ConfigError, match="FEATSTACK_MAX_INPUT_SIZE"):
        check_input_size(2080)


def test_j_seeds_and_output_paths(small_cache, tmp_path):
    _one_line_error(_cli("bench", small_cache, "--seed", "99999999999999999999999", "--out", tmp_path / "b"),
                    "--seed must be 0 to 4294967295, got 99999999999999999999999")
    _one_line_error(_cli("train", small_cache, "--backbones", "f", "--seed", "-5", "--out", tmp_path / "m"),
                    "--seed must be 0 to 4294967295, got -5")
    r = _cli("bench", small_cache, "--heads", "logreg", "--fusions", "single", "--cv", "2", "--out", "/proc/nope")
    _one_line_error(r, "--out /proc/nope: cannot write there")
    assert r.stdout == ""  # refused before the grid ran
    assert _cli("train", small_cache, "--backbones", "f", "--out", tmp_path / "m").returncode == 0
    (tmp_path / "existing").mkdir()
    _one_line_error(_cli("predict", tmp_path / "m", small_cache, "--out", tmp_path / "existing"),
                    f"--out {tmp_path / 'existing'}: is an existing folder")


def test_j_yaml_huge_seed_and_recursive_alias(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("data: demo\nbackbones: [test_resnet]\nseed: 99999999999999999999999999999\n")
    _one_line_error(_cli("run", big), f"{big}, line 3: seed must be 0 to 4294967295")
    loop = tmp_path / "loop.yaml"
    loop.write_text("data: demo\nbackbones: &b [test_resnet, *b]\n")
    _one_line_error(_cli("run", loop), str(loop), "refers to itself")
    neg = tmp_path / "neg.yaml"
    neg.write_text("data: demo\nbackbones: [test_resnet]\nextract:\n  batch_size: 0\n")
    _one_line_error(_cli("run", neg), f"{neg}, line 4: extract.batch_size", "got 0")


def _manifest(tmp_path: Path, records: list) -> Path:
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def test_k_labels_normalised_and_unlabelled(tmp_path):
    recs = [{"path": "a.jpg", "label": 1}, {"path": "b.jpg", "label": 1.0}, {"path": "c.jpg", "label": "1"},
            {"path": "d.jpg", "label": " 2 "}, {"path": "e.jpg", "label": "cat"}, {"path": "f.jpg", "label": -1},
            {"path": "g.jpg", "label": None}, {"path": "h.jpg", "label": ""}, {"path": "i.jpg", "label": "-1"},
            {"path": "j.jpg", "label": 2.5}]
    src = ManifestSource(_manifest(tmp_path, recs))
    assert src.samples.classes == ["1", "2", "2.5", "cat"]
    assert src.samples.labels.tolist() == [0, 0, 0, 1, 3, -1, -1, -1, -1, 2]
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\na.jpg,1\nb.jpg,1.0\nc.jpg,-1\nd.jpg,\n")
    s = ManifestSource(csv).samples
    assert s.classes == ["1"] and s.labels.tolist() == [0, 0, -1, -1]


def test_k_non_string_path_or_label_is_a_line_error(tmp_path):
    with pytest.raises(DataError, match=r"m\.jsonl, line 2: 'path' must be a string, got list"):
        ManifestSource(_manifest(tmp_path, [{"path": "a.jpg", "label": "x"}, {"path": ["img/001.jpg"], "label": "x"}]))
    with pytest.raises(DataError, match=r"line 1: 'label' must be a string or a number, got dict"):
        ManifestSource(_manifest(tmp_path, [{"path": "a.jpg", "label": {"x": 1}}]))
    r = _cli("extract", "--data", _manifest(tmp_path, [{"path": 3, "label": "x"}]), "--backbones", "test_resnet",
             "--weights", "none", "--cache", tmp_path / "x.h5")
    _one_line_error(r, "m.jsonl, line 1: 'path' must be a string, got int")


def test_i_values_float16_cannot_hold_are_refused_naming_backbone_and_rows(tmp_path):
    samples = SampleTable(ids=[f"{i:02d}.jpg" for i in range(12)], labels=[0] * 12, splits=["train"] * 12,
                          classes=["a"])
    X = np.ones((12, 3), dtype=np.float32)
    X[9, 1] = 1e6
    with pytest.raises(NonFiniteFeaturesError, match=r"backbone 'f' gave features beyond float16's range.*"
                                                      r"first 09\.jpg.*--dtype float32"):
        write_arrays_cache(tmp_path / "x.h5", samples, {"f": X}, dtype="float16", shard_rows=4, check_finite=True)
    # the shards before the bad one are kept; float32 stores the same values
    assert sorted(p.name for p in generation_dir(tmp_path / "x.h5", "f").glob("*-*.h5")) == ["0-4.h5", "4-8.h5"]
    np.testing.assert_array_equal(write_arrays_cache(tmp_path / "y.h5", samples, {"f": X}).features("f"), X)
    X[3, 0] = np.inf
    with pytest.raises(NonFiniteFeaturesError, match=r"non-finite features \(inf or NaN\) for 1 rows of 0-4, first 03"):
        write_arrays_cache(tmp_path / "z.h5", samples, {"f": X}, dtype="float32", shard_rows=4, check_finite=True)


def test_i_overflowing_weights_fail_the_extraction_in_one_line(tmp_path):
    """Weights whose activations overflow float16: refused at extraction, not found at train."""
    import timm
    import torch
    from safetensors.torch import save_file

    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        bns[-1].weight.mul_(1e7)
        bns[-1].bias.mul_(1e7)
    wfile = tmp_path / "hot.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wfile))
    root = write_image_folder(tmp_path / "p", per_class={"train": 2})
    r = _cli("extract", "--data", root, "--cache", tmp_path / "x.h5", "--backbones", "test_resnet",
             "--weights-file", f"test_resnet={wfile}", "--input-size", "32", "--workers", "0", "--no-progress")
    line = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "backbone 'test_resnet'" in line and "float16" in line and "--dtype float32" in line


def _mount_small_fs(where: Path, size: str) -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a real disk ({r.stderr.strip() or r.returncode}); "
                    "the disk-full case is not tested on this machine")


def test_g_full_disk_is_one_line_and_a_rerun_resumes(tmp_path):
    """ENOSPC on a real (tmpfs) file system: one error naming the file; the shards already
    written stay intact; with space freed, the same command resumes and completes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root; the disk-full case is not tested here")
    mnt = tmp_path / "small"
    _mount_small_fs(mnt, "1m")
    try:
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (1024 * 1024 - 400 * 1024))  # leaves ~400 KiB
        n = 60
        samples = SampleTable(ids=[f"{i:03d}.jpg" for i in range(n)], labels=[0] * n, splits=["train"] * n,
                              classes=["a"])
        X = np.random.default_rng(0).standard_normal((n, 2048)).astype(np.float32)  # 8 KiB per row
        cache = mnt / "x.h5"
        with pytest.raises(CacheError, match=r"x\.shards/f/g1/\d+-\d+\.h5: cannot write .*re-run the same command"):
            write_arrays_cache(cache, samples, {"f": X}, shard_rows=5)
        written = sorted(generation_dir(cache, "f").glob("*-*.h5"))
        assert 1 <= len(written) < 12
        assert not list(mnt.rglob("*.tmp"))
        filler.unlink()
        c = write_arrays_cache(cache, samples, {"f": X}, shard_rows=5)
        np.testing.assert_array_equal(c.features("f"), X)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
