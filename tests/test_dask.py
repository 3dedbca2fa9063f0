"""The bench grid on a dask.distributed cluster (joblib's dask backend) equals the local grid."""
from __future__ import annotations

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from featstack import bench  # noqa: E402
from featstack.bench import run_bench  # noqa: E402
from featstack.cache import SampleTable, write_arrays_cache  # noqa: E402

GRID = dict(heads=["logreg", "linear-svm"], fusions=["single", "concat", "vote", "stack"], max_size=3,
            cv=3, random_state=0, progress=False)
SCORES = ("backbones", "head", "fusion", "size", "cv_accuracy_mean", "cv_accuracy_std",
          "cv_f1_macro_mean", "cv_f1_macro_std", "test_accuracy", "test_f1_macro", "n_train", "n_test")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    rng = np.random.default_rng(7)
    n_train, n_test = 60, 15
    n = n_train + n_test
    y = np.arange(n) % 3
    feats = {f"b{i}": rng.normal(size=(n, d)) * (1 + 0.5 * i) + np.eye(3)[y] @ rng.normal(size=(3, d))
             for i, d in enumerate((5, 4, 3))}
    samples = SampleTable(ids=[f"s{i}" for i in range(n)], labels=y,
                          splits=["train"] * n_train + ["test"] * n_test, classes=["a", "b", "c"])
    path = tmp_path_factory.mktemp("dask") / "x.h5"
    write_arrays_cache(path, samples, feats)
    return path


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as c:
        yield c


def _scores(res):
    return sorted(tuple(r[k] for k in SCORES) for r in res.rows)


@pytest.mark.parametrize("share_fs", [True, False], ids=["read-by-path", "scattered"])
def test_dask_grid_equals_local_grid(cache, cluster, share_fs):
    local = run_bench(cache, n_jobs=1, **GRID)
    remote = run_bench(cache, backend="dask", scheduler=cluster.scheduler_address, share_fs=share_fs, **GRID)
    assert remote.settings["backend"] == "dask" and remote.settings["share_fs"] is share_fs
    assert len(local.rows) == len(remote.rows) == 2 * (3 + 4 * 3)  # 3 singles; 3 pairs + 1 triple x 3 fusions
    assert _scores(remote) == _scores(local)
    assert remote.folds == local.folds
    assert remote.n_base_fits == local.n_base_fits and remote.n_meta_fits == local.n_meta_fits
    # the work really went through the cluster: the scheduler saw the bench's task batches
    with distributed.Client(cluster.scheduler_address) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: [str(p) for p in dask_scheduler.task_prefixes])
    assert any("_base_task" in p for p in prefixes) and any("_combine_task" in p for p in prefixes), prefixes
    if share_fs:  # tasks read the features from the cache file themselves
        assert any(key[0] == str(cache.resolve()) for key in bench._BLOCK_MEMO)


def test_scheduler_from_environment(cache, cluster, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
    res = run_bench(cache, backend="dask", **(GRID | {"fusions": ["single", "stack"]}))
    assert res.settings["scheduler"] == cluster.scheduler_address
    local = run_bench(cache, n_jobs=1, **(GRID | {"fusions": ["single", "stack"]}))
    assert _scores(res) == _scores(local)


def test_dask_shared_stack_folds_equal_local(cache, cluster):
    """The shared fits (one task per fit, assembled by the client) go through the cluster too."""
    grid = GRID | {"fusions": ["single", "stack"], "stack_folds": "shared"}
    local = run_bench(cache, n_jobs=1, **grid)
    remote = run_bench(cache, backend="dask", scheduler=cluster.scheduler_address, share_fs=True, **grid)
    assert remote.folds == local.folds and _scores(remote) == _scores(local)
    assert remote.n_base_fits == local.n_base_fits == 3 * 2 * (3 + 3 + 1)  # pairs + outer + refit, cv 3
    with distributed.Client(cluster.scheduler_address) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: [str(p) for p in dask_scheduler.task_prefixes])
    assert any("_model_task" in p for p in prefixes), prefixes
