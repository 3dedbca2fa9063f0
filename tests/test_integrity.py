"""A cache that cannot lie (issue 12): one writer per backbone, generations, verified shards.

Real extraction subprocesses paused and resumed with SIGSTOP/SIGCONT, real HDF5 files damaged
the way disks and users damage them, every command run as a user runs it."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, shard_files, synthetic_photo, wait_until, write_image_folder
from featstack.cache import SampleTable, generation_dir, open_cache, verify_cache, write_arrays_cache
from featstack.errors import CacheError
from featstack.extract import extract


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "featstack", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300, **kw)


def _popen(*args, stderr=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-m", "featstack", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("integrity") / "p", per_class={"train": 16},
                              sizes=((64, 80),))  # 48 images


def _args(photos: Path, cache: Path, seed: int) -> list:
    return ["extract", "--data", photos, "--cache", cache, "--backbones", "test_resnet", "--weights", "none",
            "--seed", seed, "--input-size", "32", "--shard-rows", "4", "--batch-size", "4", "--workers", "0",
            "--threads", "1", "--device", "cpu", "--no-progress"]


def _clean(photos: Path, path: Path, seed: int) -> np.ndarray:
    extract(str(photos), ["test_resnet"], path, weights="none", seed=seed, input_size=32, shard_rows=4,
            batch_size=4, workers=0, threads=1, device="cpu", progress=False)
    return open_cache(path).features("test_resnet")


@pytest.fixture(scope="module")
def clean_runs(photos, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("clean")
    runs: dict = {seed: _clean(photos, d / f"s{seed}.h5", seed) for seed in (0, 1)}
    runs["dir"] = d
    return runs


def _stopped_after_two_shards(photos: Path, cache: Path, seed: int = 0) -> subprocess.Popen:
    a = _popen(*_args(photos, cache, seed))
    try:
        wait_until(lambda: len(shard_files(cache, "test_resnet")) >= 2, what="2 shards of writer A", proc=a)
    finally:
        a.send_signal(signal.SIGSTOP)
    assert len(shard_files(cache, "test_resnet")) < 12, "A finished before it was paused"
    return a


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_a_second_writer_is_refused_then_waits_and_results_never_mix(photos, clean_runs, tmp_path):
    """(a) A (--seed 0) paused after 2 shards; B (--seed 1 --overwrite) is refused at once with
    one line naming the cache, the backbone and A; with --wait B runs after A has finished. The
    end result is B's generation, equal to a clean seed-1 run."""
    cache = tmp_path / "x.h5"
    a = _stopped_after_two_shards(photos, cache)
    try:
        r = _cli(*_args(photos, cache, 1), "--overwrite")
        assert r.returncode == 2, r.stderr
        line = _last_line(r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert str(cache) in line and "'test_resnet'" in line and f"pid {a.pid}" in line
        assert f"host {socket.gethostname()}" in line and " since " in line and "--wait" in line
        log = tmp_path / "b.err"
        with open(log, "w") as fh:
            b = _popen(*_args(photos, cache, 1), "--overwrite", "--wait", stderr=fh)
            wait_until(lambda: "waiting for" in log.read_text(), what="B waiting for the lock", proc=b)
            assert generation_dir(cache, "test_resnet").name == "g1"  # B wrote nothing meanwhile
            rc, out, err = _finish(a)
            assert rc == 0 and "48 samples" in out, err
            assert b.wait(timeout=300) == 0, log.read_text()
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            a.kill()
            a.wait()
    c = open_cache(cache)
    assert c.backbones == ["test_resnet"] and generation_dir(cache, "test_resnet").name == "g2"
    np.testing.assert_array_equal(c.features("test_resnet"), clean_runs[1])
    info = _cli("info", cache)
    assert info.returncode == 0 and "complete" in info.stdout and c.fingerprint("test_resnet")[:12] in info.stdout


def test_overwrite_is_a_new_generation_switched_in_when_complete(photos, clean_runs, tmp_path):
    """While B's --overwrite generation is half written the cache still serves A's complete
    features; once switched, a reader that opened A's generation keeps reading A's."""
    cache = tmp_path / "x.h5"
    assert _cli(*_args(photos, cache, 0)).returncode == 0
    reader = open_cache(cache)
    old_fp = reader.fingerprint("test_resnet")
    b = _popen(*_args(photos, cache, 1), "--overwrite")
    try:
        wait_until(lambda: len(list((cache.parent / "x.shards" / "test_resnet" / "g2").glob("*-*.h5"))) >= 2,
                   what="2 shards of B's generation", proc=b)
        b.send_signal(signal.SIGSTOP)
        mid = open_cache(cache)
        assert mid.backbones == ["test_resnet"] and mid.fingerprint("test_resnet") == old_fp
        np.testing.assert_array_equal(mid.features("test_resnet"), clean_runs[0])
        rc, _, err = _finish(b)
    finally:
        if b.poll() is None:
            b.kill()
            b.wait()
    assert rc == 0, err
    new = open_cache(cache)
    assert new.fingerprint("test_resnet") != old_fp
    np.testing.assert_array_equal(new.features("test_resnet"), clean_runs[1])
    np.testing.assert_array_equal(reader.features("test_resnet"), clean_runs[0])  # opened before: unchanged
    np.testing.assert_array_equal(reader.features("test_resnet", rows=[5, 2]), clean_runs[0][[5, 2]])


def test_without_locks_the_fingerprint_recheck_stops_the_stale_writer(photos, clean_runs, tmp_path):
    """(a) with locking turned off: B overwrites while A is paused; A, resumed, notices before
    its next shard and stops; the cache holds B's features only."""
    cache = tmp_path / "x.h5"
    a = _stopped_after_two_shards(photos, cache)
    try:
        r = _cli(*_args(photos, cache, 1), "--overwrite", "--no-lock")
        assert r.returncode == 0, r.stderr
        rc, _, err = _finish(a)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert rc == 2 and "changed by another writer" in _last_line(err), err
    c = open_cache(cache)
    np.testing.assert_array_equal(c.features("test_resnet"), clean_runs[1])
    assert all(f.parent == generation_dir(cache, "test_resnet") for f in shard_files(cache, "test_resnet"))


def _arrays_cache(path: Path, n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    samples = SampleTable(ids=[f"img/{i:03d}.jpg" for i in range(n)], labels=np.arange(n) % 2,
                          splits=["train"] * (n - 10) + ["test"] * 10, classes=["a", "b"])
    X = (rng.standard_normal((n, 6)) + (np.arange(n) % 2)[:, None]).astype(np.float32)
    return write_arrays_cache(path, samples, {"f": X}, dtype="float32", shard_rows=8), samples, X


def test_swapped_shards_are_refused_by_every_reader_and_repaired(tmp_path):
    """(b) 8-16.h5 <-> 16-24.h5: reads name the file; verify lists both; --repair-like
    re-planning deletes exactly those two and the rewrite equals the original."""
    path = tmp_path / "x.h5"
    c, samples, X = _arrays_cache(path)
    gen = generation_dir(path, "f")
    tmp = gen / "swap"
    os.replace(gen / "8-16.h5", tmp)
    os.replace(gen / "16-24.h5", gen / "8-16.h5")
    os.replace(tmp, gen / "16-24.h5")
    with pytest.raises(CacheError, match=r"8-16\.h5: shard of backbone 'f' holds rows 16-24"):
        open_cache(path).features("f")
    with pytest.raises(CacheError, match=r"8-16\.h5"):
        c.features("f", rows=[0])  # an open reader notices too (the files changed under it)
    r = _cli("verify", path)
    assert r.returncode == 1
    bad = [ln for ln in r.stdout.splitlines() if ln.startswith("BAD")]
    assert len(bad) == 2 and "8-16.h5" in bad[0] + bad[1] and "16-24.h5" in bad[0] + bad[1]
    r = _cli("info", path)
    assert r.returncode == 1 and "CORRUPT" in r.stdout and ".h5" in _last_line(r.stderr)
    for cmd in (["bench", path, "--heads", "logreg", "--fusions", "single", "--cv", "2", "--out", tmp_path / "b"],
                ["train", path, "--backbones", "f", "--out", tmp_path / "m"]):
        r = _cli(*cmd)
        assert r.returncode == 2 and "8-16.h5" in _last_line(r.stderr) and "Traceback" not in r.stderr, r.stderr


def _flip_bit(shard: Path, byte: int) -> None:
    """Bit rot: one bit of the stored feature bytes flipped in place (the file stays valid HDF5)."""
    with h5py.File(shard, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as fh:
        fh.seek(offset + byte)
        b = fh.read(1)[0]
        fh.seek(offset + byte)
        fh.write(bytes([b ^ 0x40]))


def test_bit_rot_is_found_by_verify_and_repaired(tmp_path):
    """(c) One feature value's bytes flipped on disk: ordinary reads cannot tell, `verify`
    names the shard and exits 1, `info` then says corrupt, and a repair rewrites only it."""
    path = tmp_path / "x.h5"
    _, samples, X = _arrays_cache(path)
    gen = generation_dir(path, "f")
    shard = gen / "24-32.h5"
    _flip_bit(shard, 13)
    assert not np.array_equal(open_cache(path).features("f"), X)  # read silently: rot looks like data
    r = _cli("verify", path, "--backbones", "f")
    assert r.returncode == 1 and f"BAD {shard}" in r.stdout and "checksum" in r.stdout
    assert "0 bad" not in r.stdout
    info = open_cache(path).summary()["backbones"][0]
    assert info["state"] == "corrupt" and "24-32.h5" in info["problem"] and info["verified_utc"]
    # repair: re-planning with repair=True deletes exactly the rotten shard
    from featstack.cache import CacheWriter
    others = {p.name: p.stat().st_mtime_ns for p in gen.glob("*-*.h5") if p.name != "24-32.h5"}
    with CacheWriter(path, samples) as w:
        meta = open_cache(path).backbone_info("f")
        assert w.plan_backbone(meta, repair=True) == [(24, 32)]
        w.write_shard("f", 24, 32, X[24:32])
        w.finalize()
    assert {p.name: p.stat().st_mtime_ns for p in gen.glob("*-*.h5") if p.name != "24-32.h5"} == others
    np.testing.assert_array_equal(open_cache(path).features("f"), X)
    assert verify_cache(path) == {"f": []}
    assert open_cache(path).summary()["backbones"][0]["state"] == "complete"


def test_truncated_shard_is_one_line_naming_the_file(tmp_path):
    """(g) A truncated shard: info says corrupt, bench/train/predict end in one line naming it."""
    path = tmp_path / "x.h5"
    _arrays_cache(path)
    assert _cli("train", path, "--backbones", "f", "--out", tmp_path / "m").returncode == 0
    shard = generation_dir(path, "f") / "16-24.h5"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    r = _cli("info", path)
    assert r.returncode == 1 and str(shard) in r.stdout and "unreadable" in r.stdout
    runs = [["bench", path, "--heads", "logreg", "--fusions", "single", "--cv", "2", "--out", tmp_path / "b"],
            ["train", path, "--backbones", "f", "--out", tmp_path / "m2"],
            ["predict", tmp_path / "m", path, "--out", tmp_path / "p.csv"]]
    for cmd in runs:
        r = _cli(*cmd)
        assert r.returncode == 2, (cmd[0], r.stderr)
        assert str(shard) in _last_line(r.stderr) and "Traceback" not in r.stderr, (cmd[0], r.stderr)


def test_extract_repair_rewrites_exactly_the_bad_and_missing_shards(photos, clean_runs, tmp_path):
    """`featstack extract --repair`: a rotten and a deleted shard are re-extracted, nothing else."""
    shutil.copytree(clean_runs["dir"], tmp_path / "c")  # a finished seed-0 extraction
    cache = tmp_path / "c" / "s0.h5"
    gen = generation_dir(cache, "test_resnet")
    rotten, gone = gen / "8-12.h5", gen / "20-24.h5"
    _flip_bit(rotten, 3)
    gone.unlink()
    keep = {p.name: p.stat().st_mtime_ns for p in gen.glob("*-*.h5") if p != rotten}
    r = _cli(*_args(photos, cache, 0), "--repair")
    assert r.returncode == 0, r.stderr
    assert "2 shards written, 10 skipped" in r.stdout and "8-12.h5" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in gen.glob("*-*.h5") if p.name in keep} == keep
    np.testing.assert_array_equal(open_cache(cache).features("test_resnet"), clean_runs[0])
    assert verify_cache(cache) == {"test_resnet": []}


def _bmp_folder(root: Path, n: int = 6) -> Path:
    """BMP files: uncompressed, so two different pictures of one size have the same byte size."""
    rng = np.random.default_rng(3)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            synthetic_photo(rng, 48, 64).save(root / cls / f"{i:03d}.bmp")
    return root


def test_an_image_replaced_by_another_of_the_same_size_is_noticed(tmp_path):
    """(d) Without --refresh the re-run refuses naming the changed id; with it exactly that
    row's shards are extracted again, for every cached backbone; the result equals a fresh run."""
    root = _bmp_folder(tmp_path / "p")
    cache = tmp_path / "x.h5"
    opts = dict(weights="none", input_size=32, shard_rows=4, batch_size=4, workers=0, threads=1,
                device="cpu", progress=False)
    extract(str(root), ["test_resnet", "test_vit"], cache, **opts)
    target = root / "dog" / "002.bmp"
    size = target.stat().st_size
    synthetic_photo(np.random.default_rng(99), 48, 64).save(target)
    assert target.stat().st_size == size
    args = ["extract", "--data", root, "--cache", cache, "--backbones", "test_resnet", "--weights", "none",
            "--input-size", "32", "--shard-rows", "4", "--workers", "0", "--threads", "1", "--no-progress"]
    r = _cli(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "1 input files changed" in r.stderr and "dog/002.bmp" in r.stderr and "--refresh" in r.stderr
    r = _cli(*args, "--refresh")
    assert r.returncode == 0, r.stderr
    assert "1 shards written, 2 skipped" in r.stdout and "backbone 'test_vit' is not in this run" in r.stderr
    c = open_cache(cache)
    assert c.backbones == ["test_resnet"] and c.summary()["backbones"][1]["state"] == "incomplete"
    res = extract(str(root), ["test_resnet", "test_vit"], cache, **opts)
    assert res.shards_written == 1 and res.shards_skipped == 5
    fresh = tmp_path / "fresh.h5"
    extract(str(root), ["test_resnet", "test_vit"], fresh, **opts)
    for key in ("test_resnet", "test_vit"):
        np.testing.assert_array_equal(open_cache(cache).features(key), open_cache(fresh).features(key))
    row = list(c.ids).index("dog/002.bmp")
    with h5py.File(cache, "r") as f:
        assert f["samples/size"][row] == size and f["samples/mtime_ns"][row] == target.stat().st_mtime_ns
        assert f["samples/content_hash"][row] != 0
    # an added file is listed by name (rows are positional: a new cache path is needed)
    synthetic_photo(np.random.default_rng(7), 48, 64).save(root / "cat" / "new.bmp")
    r = _cli(*args, "--refresh")
    assert r.returncode == 2 and "1 added: cat/new.bmp" in _last_line(r.stderr), r.stderr


def test_l_stale_temp_files_of_a_killed_run_are_removed_by_the_next(tmp_path):
    """(l) NAME.h5.<uuid>.tmp (a killed index build) and <shard>.h5.<uuid>.tmp (a killed shard
    write) older than this run are removed when the cache is written again; others' are not."""
    path = tmp_path / "x.h5"
    _, samples, X = _arrays_cache(path)
    gen = generation_dir(path, "f")
    stale = [tmp_path / "x.h5.0123456789abcdef.tmp", gen / "8-16.h5.0123456789abcdef.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
        os.utime(p, (1, 1))  # from long before this run
    (gen / "8-16.h5").unlink()
    other = tmp_path / "y.h5.fedcba9876543210.tmp"  # another cache's temp file
    other.write_bytes(b"")
    os.utime(other, (1, 1))
    write_arrays_cache(path, samples, {"f": X}, dtype="float32", shard_rows=8)
    assert not any(p.exists() for p in stale) and other.exists()
    assert not list(tmp_path.rglob("x.*.tmp")) and not list(gen.glob("*.tmp"))
    np.testing.assert_array_equal(open_cache(path).features("f"), X)


_SLOW_HEAD = '''
import os, threading
from pathlib import Path
from sklearn.linear_model import LogisticRegression
import featstack


class SlowLogReg(LogisticRegression):
    """A head whose fit announces its process and then runs for minutes: a long cell."""

    def fit(self, X, y):
        Path(os.environ["SLOW_DIR"], str(os.getpid())).touch()
        threading.Event().wait(600)
        return super().fit(X, y)


featstack.register_head("slow", lambda seed: SlowLogReg())
'''

_SLOW_BENCH = '''
import sys
import slowhead  # noqa: F401 - registers the head
from featstack.bench import run_bench
run_bench(sys.argv[1], heads="slow", fusions="single", cv=2, n_jobs=2, progress=False)
'''


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an orphan may wait unreaped in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see processes")
def test_l_a_killed_bench_leaves_no_worker_processes(tmp_path):
    """(l) SIGKILL a bench whose loky workers are inside long fits: every worker exits by itself
    (it watches its parent), instead of running on re-parented to init for minutes."""
    rng = np.random.default_rng(0)
    n = 40
    y = np.arange(n) % 2
    samples = SampleTable(ids=[f"s{i}" for i in range(n)], labels=y, splits=["train"] * n, classes=["a", "b"])
    write_arrays_cache(tmp_path / "c.h5", samples, {"A": rng.normal(size=(n, 4)) + y[:, None]},
                       metas={"A": {"weights_sha256": "w"}})
    mods, slow = tmp_path / "mods", tmp_path / "started"
    mods.mkdir()
    slow.mkdir()
    (mods / "slowhead.py").write_text(_SLOW_HEAD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mods), str(REPO)]), "SLOW_DIR": str(slow)}
    p = subprocess.Popen([sys.executable, "-c", _SLOW_BENCH, str(tmp_path / "c.h5")], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(list(slow.iterdir())) >= 2, what="two workers inside a fit", proc=p)
        workers = [int(f.name) for f in slow.iterdir()]
        assert p.pid not in workers and all(_alive(w) for w in workers)
    finally:
        p.kill()
        p.wait()
    wait_until(lambda: not any(_alive(w) for w in workers), what="the killed bench's workers to exit",
               timeout=60)
