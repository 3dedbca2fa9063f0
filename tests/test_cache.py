"""The HDF5 cache contract: round trips, coverage checks, fingerprints, clear errors."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featstack.cache import (CacheWriter, SampleTable, build_index, generation_dir, open_cache, shard_root,
                             write_arrays_cache)
from featstack.errors import CacheError, CacheMismatchError, DataError


def _samples(n: int, n_classes: int = 3, seed: int = 0) -> SampleTable:
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, n_classes, n)
    splits = rng.choice(["train", "val", "test"], n)
    return SampleTable(ids=[f"img/{i:05d}.jpg" for i in range(n)], labels=labels, splits=splits,
                       classes=[f"c{i}" for i in range(n_classes)])


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 70), dims=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       shard_rows=st.integers(1, 80), dtype=st.sampled_from(["float16", "float32"]), seed=st.integers(0, 10**6))
def test_round_trip_property(tmp_path_factory, n, dims, shard_rows, dtype, seed):
    """Whatever the sizes and shard layout, the cache gives back the rows that went in."""
    path = tmp_path_factory.mktemp("rt") / "x.h5"
    rng = np.random.default_rng(seed)
    samples = _samples(n, seed=seed)
    feats = {f"b{i}": rng.standard_normal((n, d)).astype(np.float32) for i, d in enumerate(dims)}
    c = write_arrays_cache(path, samples, feats, dtype=dtype, shard_rows=shard_rows)
    assert c.backbones == sorted(feats)
    np.testing.assert_array_equal(c.ids, samples.ids)
    np.testing.assert_array_equal(c.labels, samples.labels)
    np.testing.assert_array_equal(c.splits, samples.splits)
    tol = 0 if dtype == "float32" else 1e-3
    expect = np.concatenate([feats[k] for k in sorted(feats)], axis=1)
    got = c.features(sorted(feats))
    np.testing.assert_allclose(got, expect.astype(dtype).astype(np.float32), rtol=tol, atol=0)
    rows = rng.integers(0, n, size=min(n, 7))
    np.testing.assert_array_equal(c.features(sorted(feats), rows=rows), got[rows])
    mask = rng.random(n) < 0.5
    np.testing.assert_array_equal(c.features(sorted(feats), rows=mask), got[mask])
    assert c.dim("b0") == dims[0]
    assert c.summary()["n_samples"] == n


def test_missing_shard_is_an_error_not_nans(tmp_path):
    path = tmp_path / "x.h5"
    write_arrays_cache(path, _samples(20), {"a": np.ones((20, 4))}, shard_rows=8)
    shard = generation_dir(path, "a") / "8-16.h5"
    shard.unlink()
    with pytest.raises(CacheError, match="8-16.h5"):
        open_cache(path).features("a")
    # rebuilding the index from what is on disk marks the backbone incomplete
    build_index(path, _samples(20))
    c = open_cache(path)
    assert c.backbones == [] and c.all_backbones == ["a"]
    assert c.summary()["backbones"][0]["missing"] == [[8, 16]]
    with pytest.raises(CacheError, match="incomplete"):
        c.features("a")


def test_other_dataset_is_refused(tmp_path):
    path = tmp_path / "x.h5"
    write_arrays_cache(path, _samples(10), {"a": np.ones((10, 2))})
    with pytest.raises(CacheMismatchError, match="another dataset"):
        CacheWriter(path, _samples(11))
    with pytest.raises(CacheMismatchError, match="another dataset"):
        CacheWriter(path, _samples(10, seed=1))  # same size, other labels


def test_backbone_fingerprint_mismatch_refused_unless_overwrite(tmp_path):
    path = tmp_path / "x.h5"
    s = _samples(10)
    write_arrays_cache(path, s, {"a": np.ones((10, 2))}, shard_rows=4)
    w = CacheWriter(path, s)
    meta = {"key": "a", "timm_name": "a", "weights_sha256": "other", "data_config": {},
            "preprocess": "arrays", "dtype": "float32", "dim": 2}
    with pytest.raises(CacheMismatchError, match="'a'.*weights_sha256"):
        w.plan_backbone(meta)
    assert len(list((generation_dir(path, "a")).glob("*.h5"))) == 3  # nothing lost
    assert w.plan_backbone(meta, overwrite=True, shard_rows=4) == [(0, 4), (4, 8), (8, 10)]


def test_resume_plans_only_missing_shards(tmp_path):
    path = tmp_path / "x.h5"
    s = _samples(10)
    write_arrays_cache(path, s, {"a": np.ones((10, 2))}, shard_rows=4)
    (generation_dir(path, "a") / "4-8.h5").unlink()
    w = CacheWriter(path, s)
    meta = open_cache(path).backbone_info("a")
    # a different requested shard size is ignored: the existing layout wins
    assert w.plan_backbone(meta, shard_rows=3) == [(4, 8)]


def test_shard_write_is_atomic(tmp_path, monkeypatch):
    """A writer that dies mid-shard leaves no shard file, only a temp file resume removes."""
    path = tmp_path / "x.h5"
    s = _samples(8)
    w = CacheWriter(path, s)
    meta = {"key": "a", "timm_name": "a", "weights_sha256": "x", "data_config": {},
            "preprocess": "arrays", "dtype": "float32", "dim": 2}
    w.plan_backbone(meta, shard_rows=4)

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(RuntimeError):
        w.write_shard("a", 0, 4, np.zeros((4, 2)))
    monkeypatch.undo()
    assert not list((generation_dir(path, "a")).glob("0-4.h5*"))
    assert w.plan_backbone(meta, shard_rows=4) == [(0, 4), (4, 8)]


def test_bad_files_and_tables(tmp_path):
    with pytest.raises(CacheError, match="no such cache"):
        open_cache(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match="junk.h5"):
        open_cache(junk)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(CacheError, match="not a featstack cache"):
        open_cache(tmp_path / "other.h5")
    with pytest.raises(DataError, match="duplicate sample id 'a'"):
        SampleTable(ids=["a", "a"], labels=[0, 0], splits=["train"] * 2, classes=["x"])
    with pytest.raises(DataError, match="unknown split 'dev'"):
        SampleTable(ids=["a"], labels=[0], splits=["dev"], classes=["x"])
    with pytest.raises(DataError, match="label 3 of sample 'b'"):
        SampleTable(ids=["a", "b"], labels=[0, 3], splits=["train"] * 2, classes=["x", "y"])
    c = write_arrays_cache(tmp_path / "ok.h5", _samples(5), {"a": np.ones((5, 2))})
    with pytest.raises(CacheError, match="'zz' is not in this cache"):
        c.features(["a", "zz"])


def _mixed_cache(path, n: int = 37, seed: int = 0):
    """Two backbones; some shards of "b" gzip-compressed (read through HDF5), the rest plain
    (read as views of the file), "a" in float16."""
    rng = np.random.default_rng(seed)
    s = _samples(n, seed=seed)
    X = {"a": rng.standard_normal((n, 5)).astype(np.float32), "b": rng.standard_normal((n, 3)).astype(np.float32)}
    with CacheWriter(path, s) as w:
        for key, dtype in (("a", "float16"), ("b", "float32")):
            meta = {"key": key, "timm_name": key, "weights_sha256": key, "data_config": {},
                    "preprocess": "arrays", "dtype": dtype, "dim": X[key].shape[1]}
            for start, stop in w.plan_backbone(meta, shard_rows=8):
                gz = "gzip" if key == "b" and start % 16 == 0 else None
                w.write_shard(key, start, stop, X[key][start:stop], compression=gz)
        w.finalize()
    want = np.concatenate([X["a"].astype(np.float16).astype(np.float32), X["b"]], axis=1)
    return open_cache(path), want


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.integers(0, 36), max_size=60), dtype=st.sampled_from([np.float32, np.float64]))
def test_reads_of_plain_and_compressed_shards_agree(tmp_path_factory, rows, dtype):
    """Plain shards are read from the file's bytes, compressed ones through HDF5: any rows, in
    any order, repeated or not, give what was written, in the order asked."""
    c, want = _mixed_cache(tmp_path_factory.mktemp("mixed") / "x.h5")
    np.testing.assert_array_equal(c.features(["a", "b"], dtype=dtype), want.astype(dtype))
    got = c.features(["a", "b"], rows=np.asarray(rows, dtype=np.int64), dtype=dtype)
    assert got.dtype == dtype and got.shape == (len(rows), 8)
    np.testing.assert_array_equal(got, want[rows].astype(dtype))
    np.testing.assert_array_equal(c.features("b", rows=sorted(rows)), want[sorted(rows), 5:])


def test_plain_shards_are_one_run_of_rows_in_the_file(tmp_path):
    """The writer's chunks span full rows and lie back to back, so each shard is one run that
    a read maps directly; compressed shards have none (HDF5 decodes them)."""
    from featstack.cache import raw_row_runs

    c, want = _mixed_cache(tmp_path / "x.h5")
    gen_a, gen_b = generation_dir(c.path, "a"), generation_dir(c.path, "b")
    with h5py.File(gen_a / "32-37.h5", "r") as f:
        ds = f["features"]
        assert raw_row_runs(ds) == [(0, 5, ds.id.get_chunk_info(0).byte_offset)]
        raw = np.fromfile(gen_a / "32-37.h5", dtype=np.float16, count=5 * 5,
                          offset=ds.id.get_chunk_info(0).byte_offset).reshape(5, 5)
        np.testing.assert_array_equal(raw.astype(np.float32), want[32:37, :5])
    with h5py.File(gen_b / "0-8.h5", "r") as f:
        assert raw_row_runs(f["features"]) is None
    with h5py.File(gen_b / "8-16.h5", "r") as f:
        assert raw_row_runs(f["features"]) is not None


def test_raw_row_runs_of_other_layouts(tmp_path):
    """Contiguous datasets are one run at their offset; chunks not spanning full rows, unwritten
    chunks and foreign byte order have no raw runs (the reader then goes through HDF5)."""
    from featstack.cache import raw_row_runs

    X = np.arange(60, dtype=np.float32).reshape(12, 5)
    with h5py.File(tmp_path / "l.h5", "w") as f:
        f.create_dataset("contiguous", data=X)
        f.create_dataset("narrow_chunks", data=X, chunks=(4, 2))
        f.create_dataset("big_endian", data=X.astype(">f4"))
        f.create_dataset("unwritten", shape=(12, 5), dtype=np.float32, chunks=(4, 5))
        f["unwritten"][0:4] = X[0:4]
    with h5py.File(tmp_path / "l.h5", "r") as f:
        runs = raw_row_runs(f["contiguous"])
        assert runs == [(0, 12, f["contiguous"].id.get_offset())]
        raw = np.fromfile(tmp_path / "l.h5", dtype=np.float32, count=60, offset=runs[0][2])
        np.testing.assert_array_equal(raw.reshape(12, 5), X)
        assert raw_row_runs(f["narrow_chunks"]) is None
        assert raw_row_runs(f["big_endian"]) is None
        assert raw_row_runs(f["unwritten"]) is None
