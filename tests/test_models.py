"""Saved models: train on the training split, save without pickle, load safely, predict, CLI."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, write_image_folder
from featstack.cache import SampleTable, open_cache, write_arrays_cache
from featstack.cli import main as cli_main
from featstack.errors import CacheError, CacheMismatchError, ConfigError, DataError
from featstack.models import ModelError, SavedModel, load_model, save_model, train_model

CLASSES = ["ant", "bee", "cow"]
METAS = {"A": {"weights_sha256": "weights-a"}, "B": {"weights_sha256": "weights-b"}}


def _features(y: np.ndarray, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    onehot = np.eye(len(CLASSES))[np.maximum(y, 0)]
    return {"A": rng.normal(size=(len(y), 6)) + onehot @ rng.normal(size=(3, 6)) * 1.5,
            "B": rng.normal(size=(len(y), 4)) + onehot @ rng.normal(size=(3, 4))}


def make_cache(path: Path, *, n_train=90, n_val=15, n_test=30, unlabeled_train=4, seed=0,
               features=None, metas=METAS, labels=None, prefix="s") -> Path:
    n = n_train + n_val + n_test
    y = np.arange(n) % 3 if labels is None else np.asarray(labels)
    y = y.copy()
    y[:unlabeled_train] = -1
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    samples = SampleTable(ids=[f"{prefix}{i:03d}" for i in range(n)], labels=y, splits=splits,
                          classes=CLASSES)
    feats = features if features is not None else _features(y, seed)
    write_arrays_cache(path, samples, feats, metas=metas)
    return path


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("syn") / "x.h5")


# ------------------------------------------------------------------ training rows

def test_trains_on_labelled_train_rows_only(syn, tmp_path):
    saved = train_model(syn, "A,B", "logreg", "concat")
    c = open_cache(syn)
    n_train = int(((c.splits == "train") & (c.labels >= 0)).sum())
    assert n_train == 86 and saved.meta["train_rows"] == 86
    assert saved.estimator.named_steps["scale"].n_samples_seen_ == 86
    assert saved.dims == [6, 4] and saved.backbones == ["A", "B"] and saved.classes == CLASSES
    assert saved.meta["test_rows"] == 30 and 0.5 < saved.meta["test_accuracy"] <= 1.0

    # another cache with the same training rows but different val/test rows (features AND
    # labels) gives exactly the same model: those rows never reach the fit
    y = np.arange(135) % 3
    y[:4] = -1
    feats = _features(y, 0)
    rng = np.random.default_rng(9)
    for k in feats:
        feats[k][90:] = rng.normal(size=feats[k][90:].shape) * 5
    other = make_cache(tmp_path / "o.h5", features=feats, labels=np.r_[y[:90], (y[90:] + 1) % 3])
    again = train_model(other, ["A", "B"], "logreg", "concat")
    np.testing.assert_array_equal(again.estimator.named_steps["clf"].coef_,
                                  saved.estimator.named_steps["clf"].coef_)


def test_tune_never_sees_val_or_test_rows(syn):
    saved = train_model(syn, "A", "gaussian-nb", "single", tune=True)
    best = saved.estimator.best_estimator_
    assert best.named_steps["scale"].n_samples_seen_ == 86
    assert saved.meta["params"] == {"cv": 5, "random_state": 0, "tune": True}


def test_classes_absent_from_training_keep_their_names(tmp_path):
    y = np.arange(135) % 3
    y[:90][y[:90] == 1] = 0  # no 'bee' in the training split
    path = make_cache(tmp_path / "x.h5", labels=y, unlabeled_train=0)
    saved = train_model(path, "A,B", "logreg", "vote", out=tmp_path / "m")
    saved = load_model(tmp_path / "m")
    assert saved.classes == CLASSES and saved.output_classes == ["ant", "cow"]
    assert saved.meta["labels"] == [0, 2]
    c = open_cache(path)
    pred = saved.predict(c)
    X = c.features(["A", "B"], rows=np.flatnonzero(c.valid))
    np.testing.assert_array_equal(pred, saved.estimator.predict(X))
    assert set(pred) == {0, 2}  # the cache's own labels, never the missing 'bee' (1)
    np.testing.assert_array_equal(saved.predict_names(c), np.where(pred == 0, "ant", "cow"))
    proba = saved.predict_proba(c)
    assert proba.shape == (len(c), 2)
    np.testing.assert_array_equal(np.array([0, 2])[proba.argmax(1)], pred)


# ------------------------------------------------------------------ save / load

# The save → load (fresh process, no pickle) → identical predictions round trip of every head ×
# fusion is tests/test_conformance.py, generated from the registries.


class Evil:
    """A type no featstack model contains."""

    def __init__(self):
        self.payload = "rm -rf /"


def test_load_refuses_types_outside_the_allowlist(syn, tmp_path):
    import skops.io as sio
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    out = tmp_path / "m"
    train_model(syn, "A", "logreg", "single", out=out)
    load_model(out)  # the genuine file loads

    # an object of an unexpected type (skops itself would not trust it either)
    sio.dump(Evil(), out / "model.skops")
    with pytest.raises(ModelError, match=r"model\.skops: refusing to load type '[\w.]*Evil'"):
        load_model(out)

    # a scikit-learn type skops trusts by default, but that no featstack model contains
    X = np.random.default_rng(0).normal(size=(30, 6))
    rf = Pipeline([("scale", StandardScaler()), ("clf", RandomForestClassifier(3))]).fit(X, np.arange(30) % 3)
    sio.dump(rf, out / "model.skops")
    with pytest.raises(ModelError, match="refusing to load type 'sklearn.ensemble._forest.RandomForestClassifier'"):
        load_model(out)

    # only allowlisted types, but not an estimator at the root
    sio.dump({"classes": [1, 2]}, out / "model.skops")
    with pytest.raises(ModelError, match="holds a builtins.dict, not a featstack head or fusion"):
        load_model(out)

    (out / "model.skops").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a readable skops file"):
        load_model(out)


def test_a_swapped_estimator_file_is_refused_by_the_content_hash(syn, tmp_path):
    """Issue 12 (l): another head's model.skops copied into a model folder used to load and
    report the first head's name; model.json's content hash now refuses it, naming the file."""
    a, b = tmp_path / "a", tmp_path / "b"
    train_model(syn, "A", "logreg", "single", out=a)
    train_model(syn, "A", "gaussian-nb", "single", out=b)
    assert json.loads((a / "model.json").read_text())["estimator_sha256"]
    (a / "model.skops").write_bytes((b / "model.skops").read_bytes())
    with pytest.raises(ModelError, match=r"a[/\\]model\.skops: content hash \w+ differs"):
        load_model(a)
    load_model(b)  # the source folder itself is intact
    r = subprocess.run([sys.executable, "-m", "featstack", "predict", str(a), str(syn),
                        "--out", str(tmp_path / "p.csv")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "content hash" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "p.csv").exists()


def test_load_reports_damaged_metadata(syn, tmp_path):
    out = tmp_path / "m"
    train_model(syn, "A,B", "logreg", "concat", out=out)
    meta = json.loads((out / "model.json").read_text())
    bad = dict(meta)
    del bad["fingerprints"]
    (out / "model.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match=r"model\.json: missing field 'fingerprints'"):
        load_model(out)
    (out / "model.json").write_text(json.dumps(dict(meta, format="something-else")))
    with pytest.raises(ModelError, match="field 'format' is 'something-else'"):
        load_model(out)
    (out / "model.json").write_text(json.dumps(dict(meta, classes=["ant", "bee"])))
    with pytest.raises(ModelError, match=r"estimator predicts labels \[0, 1, 2\] but model.json lists 2 classes"):
        load_model(out)
    with pytest.raises(ModelError, match="no such model folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="folder is not empty and holds no model.json"):
        save_model(tmp_path / "junk", SavedModel(estimator=None, backbones=[], dims=[], head="logreg",
                                                 fusion="single", classes=[], fingerprints={}))


# ------------------------------------------------------------------ fingerprints

def test_predict_refuses_other_extractions_and_accepts_other_datasets(syn, tmp_path):
    saved = train_model(syn, "A,B", "svm-rbf", "stack", out=tmp_path / "m")
    model = load_model(tmp_path / "m")

    # a different dataset extracted the same way: accepted (the dataset is not part of it)
    other = make_cache(tmp_path / "other.h5", seed=0, n_train=30, n_val=0, n_test=60, prefix="o")
    c = open_cache(other)
    assert c.fingerprint("A") != open_cache(syn).fingerprint("A")
    pred = model.predict(c)
    assert len(pred) == len(c)

    # backbone B produced by other weights: refused, naming B
    metas = {"A": METAS["A"], "B": {"weights_sha256": "other-weights"}}
    changed = make_cache(tmp_path / "changed.h5", metas=metas)
    with pytest.raises(CacheMismatchError, match=r"backbone 'B' in \S*changed.h5 was extracted differently "
                                                 r"from the one model \S*m was trained on \(fingerprint "):
        model.predict(changed)
    # same weights, another preprocessing: refused too
    metas = {"A": dict(METAS["A"], preprocess="reference"), "B": METAS["B"]}
    with pytest.raises(CacheMismatchError, match="backbone 'A'"):
        model.check_cache(make_cache(tmp_path / "pre.h5", metas=metas))

    # backbone B missing altogether
    y = np.arange(135) % 3
    only_a = make_cache(tmp_path / "only_a.h5", features={"A": _features(y, 0)["A"]}, metas=METAS)
    with pytest.raises(CacheMismatchError, match=r"backbone 'B' of model \S+ is not in \S*only_a.h5 \(it has: A\)"):
        saved.predict(only_a)


# ------------------------------------------------------------------ clear errors

def test_training_errors_are_clear(syn, tmp_path):
    with pytest.raises(ConfigError, match="unknown head 'svm'"):
        train_model(syn, "A", "svm", "single")
    with pytest.raises(ConfigError, match=r"unknown fusion 'voting' \(did you mean 'vote'\?\)"):
        train_model(syn, "A", "logreg", "voting")
    with pytest.raises(CacheError, match=r"backbone 'C' is not in this cache \(it has: A, B\)"):
        train_model(syn, "A,C", "logreg", "concat")
    with pytest.raises(ConfigError, match="'single' takes exactly one backbone, got 2"):
        train_model(syn, "A,B", "logreg", "single")
    with pytest.raises(ConfigError, match="backbone 'A' is listed twice"):
        train_model(syn, "A,A", "logreg", "concat")
    with pytest.raises(DataError, match=r"class 'ant' has 28, class 'bee' has 29, class 'cow' has 29 row\(s\), fewer than the cv=40"):
        train_model(syn, "A,B", "logreg", "stack", cv=40)

    one = make_cache(tmp_path / "one.h5", labels=np.r_[np.zeros(90, int), np.arange(45) % 3])
    with pytest.raises(DataError, match=r"only one class \('ant', 86 rows\)"):
        train_model(one, "A", "logreg", "single")

    y = np.arange(135) % 3
    y[:4] = -1
    feats = _features(y, 0)
    feats["B"][40, 2] = np.nan
    nan = make_cache(tmp_path / "nan.h5", features=feats)
    with pytest.raises(DataError, match=r"sample 's040' \(row 40\) has non-finite features for backbone 'B'"):
        train_model(nan, "A,B", "logreg", "concat")
    train_model(nan, "A", "logreg", "single")  # backbone A is clean

    none = make_cache(tmp_path / "none.h5", n_train=0, unlabeled_train=0)
    with pytest.raises(DataError, match="no labelled training rows"):
        train_model(none, "A", "logreg", "single")


# ------------------------------------------------------------------ real extracted caches, CLI

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Two small caches extracted by the real extractor (random-init test models)."""
    from featstack.extract import extract

    base = tmp_path_factory.mktemp("real")
    fast = dict(weights="none", workers=0, batch_size=16, progress=False)
    root = write_image_folder(base / "photos", per_class={"train": 8, "test": 3})
    (root / "train" / "dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    extract(str(root), ["test_resnet", "test_vit"], base / "x.h5", **fast)
    other = write_image_folder(base / "photos2", per_class={"test": 4}, seed=5)
    extract(str(other), ["test_resnet", "test_vit"], base / "y.h5", **fast)
    extract(str(other), ["test_resnet"], base / "z.h5", **fast)
    extract(str(other), ["test_vit"], base / "z.h5", seed=1, **fast)  # other weights for test_vit
    return base


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "featstack", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def test_cli_train_and_predict_end_to_end(real, tmp_path, capsys):
    x = real / "x.h5"
    r = _cli("train", x, "--backbones", "test_resnet,test_vit", "--head", "svm-rbf", "--fusion", "stack",
             "--cv", "3", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    c = open_cache(x)
    n_train = int(((c.splits == "train") & c.valid).sum())
    assert n_train == 24 and len(c.errors) == 1  # the corrupt image is not trained on
    assert f"train rows   {n_train} (3 classes)" in r.stdout
    assert "test acc" in r.stdout and f"saved        {tmp_path / 'm'}" in r.stdout
    model = load_model(tmp_path / "m")
    assert model.meta["train_rows"] == n_train and model.fusion == "stack"
    acc = model.meta["train_accuracy"]
    assert f"train acc    {acc:.4f}" in r.stdout

    # predict every row of the training cache: the corrupt one is skipped and reported
    assert cli_main(["predict", str(tmp_path / "m"), str(x), "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["id", "split", "label", "pred", "proba_cat", "proba_dog", "proba_fox"]
    assert len(rows) == len(c) - 1 and "skipped      1 rows" in out
    assert "train/dog/bad.jpg" not in {r["id"] for r in rows}
    np.testing.assert_array_equal([r["pred"] for r in rows], model.predict_names(c))
    np.testing.assert_array_equal([r["label"] for r in rows], np.array(c.classes)[c.labels[c.valid]])
    proba = np.array([[float(r[f"proba_{k}"]) for k in ("cat", "dog", "fox")] for r in rows])
    np.testing.assert_allclose(proba, model.predict_proba(c), rtol=1e-7)
    np.testing.assert_array_equal(np.array(model.classes)[proba.argmax(1)], [r["pred"] for r in rows])
    acc = np.mean([r["label"] == r["pred"] for r in rows])
    assert f"accuracy     {acc:.4f} on {len(rows)} labelled rows" in out

    # another dataset extracted the same way: predicted, one split only
    assert cli_main(["predict", str(tmp_path / "m"), str(real / "y.h5"), "--split", "test",
                     "--out", str(tmp_path / "q.csv")]) == 0
    q = list(csv.DictReader(open(tmp_path / "q.csv")))
    assert len(q) == 12 and {r["split"] for r in q} == {"test"}
    assert all(r["label"] in ("cat", "dog", "fox") for r in q)

    # test_vit extracted with other weights: refused, one line naming the backbone, exit 2
    r = _cli("predict", tmp_path / "m", real / "z.h5", "--out", tmp_path / "r.csv")
    assert r.returncode == 2 and not (tmp_path / "r.csv").exists()
    assert r.stderr.startswith("featstack predict: error: backbone 'test_vit' in ")
    assert "was extracted differently" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_decision_scores_and_errors(real, tmp_path, capsys):
    x = real / "x.h5"
    assert cli_main(["train", str(x), "--backbones", "test_vit", "--head", "linear-svm",
                     "--out", str(tmp_path / "svm")]) == 0
    assert "linear-svm x single over test_vit" in capsys.readouterr().out
    assert cli_main(["predict", str(tmp_path / "svm"), str(x), "--split", "train",
                     "--out", str(tmp_path / "s.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert list(rows[0])[4:] == ["score_cat", "score_dog", "score_fox"]
    assert len(rows) == 24 and {r["split"] for r in rows} == {"train"}
    scores = np.array([[float(r[f"score_{k}"]) for k in ("cat", "dog", "fox")] for r in rows])
    np.testing.assert_array_equal(np.array(["cat", "dog", "fox"])[scores.argmax(1)], [r["pred"] for r in rows])

    assert cli_main(["train", str(x), "--backbones", "test_vit", "--head", "nb", "--out",
                     str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featstack train: error: unknown head 'nb'") and len(err.strip().splitlines()) == 1
    assert cli_main(["train", str(x), "--backbones", "resnet50", "--out", str(tmp_path / "e")]) == 2
    assert "backbone 'resnet50' is not in this cache" in capsys.readouterr().err
    assert cli_main(["predict", str(tmp_path / "missing"), str(x), "--out", str(tmp_path / "e.csv")]) == 2
    assert "no such model folder" in capsys.readouterr().err


def test_cpu_side_never_imports_torch(real, tmp_path):
    train_model(real / "x.h5", "test_resnet,test_vit", "gaussian-nb", "vote", out=tmp_path / "m")
    code = f"""
import sys
import featstack, featstack.heads, featstack.fusion, featstack.models
import featstack.commands.train, featstack.commands.predict
from featstack.cli import main
m = featstack.models.load_model({str(tmp_path / 'm')!r})
assert len(m.predict({str(real / 'y.h5')!r})) == 12
assert main(["predict", {str(tmp_path / 'm')!r}, {str(real / 'y.h5')!r}, "--out", {str(tmp_path / 'p.csv')!r}]) == 0
bad = sorted(k for k in sys.modules if k == "torch" or k.startswith(("torch.", "timm")))
print("LOADED", bad[:5])
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LOADED []" in r.stdout
