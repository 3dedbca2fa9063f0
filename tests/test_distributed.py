"""`torchrun -m featstack extract` on a CPU (gloo): ranks split the rows into contiguous
blocks of shards, rank 0 builds the index; a killed rank is completed by a re-run; a missing
rank makes the others fail after the timeout instead of hanging."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, shard_files, wait_until, write_image_folder
from featstack.cache import generation_dir, open_cache, shard_root
from featstack.extract import _rank_slice, extract

ARGS = ["--backbones", "test_resnet,test_vit", "--weights", "none", "--device", "cpu", "--workers", "0",
        "--no-progress"]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("LOCAL_WORLD_SIZE", None)
    return env


def _torchrun(*args, nproc: int = 2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "featstack", "extract", *map(str, args)]
    return cmd, dict(cwd=REPO, env=_env(), **kw)


def _assert_same_cache(a_path: Path, b_path: Path, keys=("test_resnet", "test_vit")) -> None:
    a, b = open_cache(a_path), open_cache(b_path)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.splits, b.splits)
    assert len(set(a.ids)) == len(a.ids)
    for key in keys:
        assert a.backbone_info(key)["complete"]
        np.testing.assert_array_equal(a.features(key), b.features(key))


def test_torchrun_two_ranks_equal_single_process(tmp_path):
    root = write_image_folder(tmp_path / "p", per_class={"train": 10, "test": 4})
    opts = ["--input-size", "64", "--shard-rows", "5", "--batch-size", "4"]
    cmd, kw = _torchrun("--data", root, "--cache", tmp_path / "dist.h5", *ARGS, *opts)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2" in r.stderr and "rank 1/2" in r.stderr
    assert "42 samples, 42 rows extracted, 18 shards written" in r.stdout  # job totals, once
    single = extract(str(root), ["test_resnet", "test_vit"], tmp_path / "single.h5", weights="none",
                     device="cpu", workers=0, threads=1, input_size=64, shard_rows=5, batch_size=4,
                     progress=False)
    assert single.rows_processed == 42
    _assert_same_cache(tmp_path / "dist.h5", tmp_path / "single.h5")
    shards = sorted(p.name for p in (generation_dir(tmp_path / "dist.h5", "test_vit")).glob("*-*.h5"))
    assert len(shards) == 9 and not list(shard_root(tmp_path / "dist.h5").rglob("*.tmp"))


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds rank processes through /proc")
def test_killed_rank_then_rerun_completes(tmp_path):
    """SIGKILL rank 1 mid-run: torchrun stops the job (rank 0 does not hang); re-running the
    same command writes only the missing shards and equals an uninterrupted run, row for row."""
    root = write_image_folder(tmp_path / "p", per_class={"train": 40}, sizes=((160, 200),))
    n, rows = 120, 4
    opts = ["--shard-rows", str(rows), "--batch-size", "2"]
    cache = tmp_path / "killed.h5"
    cmd, kw = _torchrun("--data", root, "--cache", cache, *ARGS, *opts)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)
    shards = [(s, min(s + rows, n)) for s in range(0, n, rows)]
    rank1 = _rank_slice(shards, 1, 2, weights=[2 * (e - s) for s, e in shards])
    try:
        wait_until(lambda: sum(f"{s}-{e}.h5" in {p.name for p in shard_files(cache, "test_vit")}
                               for s, e in rank1) >= 2, what="2 shards of rank 1", proc=proc)
        victims = [c for c in _children(proc.pid) if _rank_of(c) == 1]
        assert victims, "rank 1 process not found"
        os.kill(victims[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)  # the survivor is stopped, not left waiting
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    folder = generation_dir(cache, "test_vit")
    done = {p.name for p in folder.glob("*-*.h5")}
    missing = [f"{s}-{e}.h5" for s, e in rank1 if f"{s}-{e}.h5" not in done]
    assert missing, "rank 1 finished before it was killed; the test proves nothing"
    n_done = len(shard_files(cache, "test_vit")) + len(shard_files(cache, "test_resnet"))

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{n} samples" in r.stdout
    assert f"{2 * len(shards) - n_done} shards written, {n_done} skipped" in r.stdout, r.stdout
    clean = extract(str(root), ["test_resnet", "test_vit"], tmp_path / "clean.h5", weights="none",
                    device="cpu", workers=0, threads=1, shard_rows=rows, batch_size=2, progress=False)
    assert clean.rows_processed == n
    _assert_same_cache(cache, tmp_path / "clean.h5")
    assert len(list(folder.glob("*-*.h5"))) == len(shards)
    assert not list(shard_root(cache).rglob("*.tmp"))


_BARRIER_SCRIPT = """
import os, sys, time
from featstack.distributed import barrier, dist_context
with dist_context() as (rank, world):  # joined with a generous timeout (slow imports under load)
    if rank == 1:
        time.sleep(60)  # never reaches the barrier
        sys.exit(0)
    os.environ["FEATSTACK_DIST_TIMEOUT"] = "4"  # read by barrier() when it is called
    t = time.time()
    try:
        barrier()
    except Exception as e:
        print(f"rank0 barrier raised after {time.time() - t:.1f}s: {type(e).__name__}", flush=True)
        sys.exit(3)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_barrier_times_out_instead_of_hanging():
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2", FEATSTACK_DIST_TIMEOUT="120")
    procs = [subprocess.Popen([sys.executable, "-c", _BARRIER_SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=150)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 3, err[-2000:]
    secs = float(out.split("raised after ")[1].split("s")[0])
    assert 3.0 <= secs < 30, out


def test_rank_slices_are_contiguous_and_cover():
    items = list(range(37))
    for world in (1, 2, 3, 8):
        for weights in (None, [1 + (i % 3) for i in items]):
            parts = [_rank_slice(items, r, world, weights) for r in range(world)]
            assert sum(parts, []) == items  # disjoint, contiguous, in order, nothing padded
            if weights is not None and world <= 3:
                loads = [sum(weights[i] for i in p) for p in parts]
                assert max(loads) - min(loads) <= 2 * max(weights)
