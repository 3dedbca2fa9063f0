"""Conformance of every registered head × fusion, generated from the registries: fit on a cache →
save → load in a fresh process (no pickle) → identical predictions and scores → export to torch
equal to scikit-learn (or a clear refusal, before anything is written). Then the same for a head
registered from a user's own module, and a fusion added to the registry."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from featstack.cache import SampleTable, open_cache, write_arrays_cache
from featstack.fusion import fusion_spec, list_fusions
from featstack.heads import head_spec, list_heads
from featstack.models import feature_fingerprint, load_model, train_model

CLASSES = ["ant", "bee", "cow"]
CV = 3
# Heads whose fitted form depends on the training size get a variant trained past the switch:
# svm-rbf is an exact SVC on these few rows, "svm-rbf@nystroem" the Nystroem + linear SVM path.
VARIANTS = {"svm-rbf@nystroem": {"RBF_EXACT_BELOW": 0}}
COMBOS = [(h, f) for h in [*list_heads(), *VARIANTS] for f in list_fusions()]


def _backbones(fusion: str) -> list[str]:
    """Backbones a fusion is tried on: as many as it takes, up to two, in a non-sorted order."""
    spec = fusion_spec(fusion)
    n = 1 if spec.max_backbones == 1 else max(2, spec.min_backbones)
    return ["B", "A", "C"][:n]


def make_cache(path: Path, seed: int = 0) -> Path:
    """45 training rows (3 unlabelled), 12 validation and 18 test rows, three backbones."""
    rng = np.random.default_rng(seed)
    n_train, n_val, n_test = 45, 12, 18
    n = n_train + n_val + n_test
    y = np.arange(n) % 3
    onehot = np.eye(3)[y]
    feats = {k: rng.normal(size=(n, d)) + onehot @ rng.normal(size=(3, d)) * 1.2
             for k, d in (("A", 5), ("B", 4), ("C", 3))}
    y[:3] = -1
    samples = SampleTable(ids=[f"s{i:03d}" for i in range(n)], labels=y,
                          splits=["train"] * n_train + ["val"] * n_val + ["test"] * n_test, classes=CLASSES)
    metas = {k: {"weights_sha256": f"weights-{k}"} for k in feats}
    write_arrays_cache(path, samples, feats, metas=metas)
    return path


# One subprocess loads every saved model: it blocks pickle, loads, predicts and exports, and
# writes what it got to one .npz per model.
_LOADER = """
import json, pickle, sys
import numpy as np

def no_pickle(*a, **k):
    raise AssertionError("load_model must not unpickle")
pickle.loads = pickle.load = pickle.Unpickler = no_pickle

from featstack.models import load_model
from featstack.export import ExportError, model_converter

cache, jobs = sys.argv[1], json.loads(sys.argv[2])
for model_dir, out in jobs:
    m = load_model(model_dir)
    res = {"pred": m.predict(cache), "names": m.predict_names(cache).astype(str),
           "scores": m.scores(cache), "proba": m.predict_proba(cache)}
    try:
        convert = model_converter(m.head, m.fusion)
    except ExportError as e:
        res["refused"] = np.array(str(e))
    else:
        import torch
        X, _ = m.features(cache)
        module = convert(m.estimator, m.dims, torch.float64)
        with torch.no_grad():
            x = torch.from_numpy(X.astype(np.float64))
            res["export_outputs"] = module.sklearn_outputs(x).numpy()
            res["export_pred"] = module.predict_index(x).numpy()
    np.savez(out, **res)
print("LOADED", len(jobs))
"""


def _run_python(code: str, *args, cwd=REPO) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env={"PYTHONPATH": f"{REPO}", "PATH": "/usr/bin:/bin",
                                     "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Every head × fusion trained and saved, then loaded by ONE fresh process."""
    root = tmp_path_factory.mktemp("conformance")
    cache = make_cache(root / "x.h5")
    saved, jobs = {}, []
    for head, fusion in COMBOS:
        out = root / f"{head}__{fusion}"
        with pytest.MonkeyPatch.context() as mp:
            for name, value in VARIANTS.get(head, {}).items():
                mp.setattr(f"featstack.heads.{name}", value)
            model = train_model(cache, _backbones(fusion), head.split("@")[0], fusion, out=out, cv=CV)
        saved[(head, fusion)] = (model, out)
        jobs.append((str(out), str(out) + ".npz"))
    _run_python(_LOADER, cache, json.dumps(jobs))
    return {"cache": cache, "saved": saved}


@pytest.mark.parametrize("head,fusion", COMBOS)
def test_fit_save_load_predict_export(fitted, head, fusion):
    cache = open_cache(fitted["cache"])
    saved, out = fitted["saved"][(head, fusion)]
    keys = _backbones(fusion)
    schema = zipfile.ZipFile(out / "model.skops").read("schema.json").decode()
    assert ("sklearn.kernel_approximation" in schema) == (head == "svm-rbf@nystroem")  # the path taken
    head = head.split("@")[0]

    # trained on the labelled training rows only, saved as two files, no pickle
    assert saved.meta["train_rows"] == len(cache.rows("train")) == 42
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.skops"]
    assert zipfile.is_zipfile(out / "model.skops")
    meta = json.loads((out / "model.json").read_text())
    assert meta["backbones"] == keys and meta["head"] == head and meta["fusion"] == fusion
    assert meta["dims"] == [cache.dim(k) for k in keys]
    assert meta["fingerprints"] == {k: feature_fingerprint(cache.backbone_info(k)) for k in keys}
    assert meta["cache_fingerprint"] == cache.dataset_fingerprint
    assert {"sklearn_version", "featstack_version", "params", "train_rows", "train_accuracy"} <= set(meta)

    # what the model predicts here is what the estimator predicts on the cached features
    X = cache.features(keys, rows=np.flatnonzero(cache.valid), dtype=np.float32)
    pred = saved.predict(cache)
    np.testing.assert_array_equal(pred, saved.estimator.predict(X))
    assert saved.meta["train_accuracy"] > 0.5

    # a fresh process (pickle blocked) loads it and gets exactly the same numbers
    got = np.load(str(out) + ".npz")
    np.testing.assert_array_equal(got["pred"], pred)
    np.testing.assert_array_equal(got["names"], np.array(CLASSES)[pred])
    np.testing.assert_array_equal(got["scores"], saved.scores(cache))
    np.testing.assert_array_equal(got["proba"], saved.predict_proba(cache))
    loaded = load_model(out)
    assert type(loaded.estimator) is type(saved.estimator) and loaded.path == out and loaded.classes == CLASSES
    assert loaded.score_kind == ("proba" if hasattr(saved.estimator, "predict_proba") else "score")

    # export: equal to scikit-learn when the specs name converters, else a refusal naming them
    if head_spec(head).converter is None or fusion_spec(fusion).converter is None:
        assert "export_outputs" not in got.files and (head in str(got["refused"]) or fusion in str(got["refused"]))
        return
    method = "predict_proba" if hasattr(saved.estimator, "predict_proba") else "decision_function"
    ref = np.asarray(getattr(saved.estimator, method)(X.astype(np.float64)), dtype=np.float64)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got["export_outputs"], ref, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_array_equal(saved.estimator.classes_[got["export_pred"]],
                                  saved.estimator.predict(X.astype(np.float64)))


def test_every_fusion_is_benched(fitted):
    """The bench evaluates every registered fusion on the subset sizes its spec allows."""
    from featstack.bench import run_bench

    res = run_bench(fitted["cache"], heads=list_heads()[:1], fusions=list_fusions(), max_size=2, cv=CV,
                    progress=False)
    for fusion in list_fusions():
        spec = fusion_spec(fusion)
        sizes = {r["size"] for r in res.rows if r["fusion"] == fusion}
        want = {s for s in (1, 2) if spec.min_backbones <= s <= (spec.max_backbones or s)}
        assert sizes == want, (fusion, sizes)


# ------------------------------------------------------------------ a user's own head and fusion

_USER_MODULE = '''
"""A user's own heads and fusion, registered with one call each; featstack is not edited."""
import featstack
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler


def ridge(seed):
    return Pipeline([("scale", StandardScaler()), ("clf", RidgeClassifier(alpha=3.0))])


def soft_logreg(seed):
    return Pipeline([("scale", StandardScaler()),
                     ("clf", LogisticRegression(C=0.2, max_iter=500, random_state=seed))])


def wide(head, dims, *, cv, random_state, tune, n_jobs):
    return featstack.create_head(head, tune=tune, random_state=random_state)


def register(with_types=True):
    # a fitted RidgeClassifier holds a LabelBinarizer: named, so saved models load
    types = ("sklearn.preprocessing._label.LabelBinarizer",) if with_types else ()
    featstack.register_head("ridge", ridge, tune_param="clf__alpha", tune_grid=(0.3, 3.0), allowed_types=types)
    featstack.register_head("soft-logreg", soft_logreg, converter="sklearn")
    featstack.register_fusion("wide", wide, min_backbones=2, description="concat, registered by a user")
'''

_USER_TRAIN = """
import os, sys, numpy as np
sys.path.insert(0, sys.argv[3])
import featstack, userheads
from featstack.export import ExportError
cache, root = sys.argv[1], sys.argv[2]

userheads.register(with_types=False)
try:  # a type outside the spec's allowlist: refused when saving, not when loading later
    featstack.train_model(cache, "A,B", "ridge", "stack", out=root + "/bad", cv=3)
    raise SystemExit("saved a model that cannot be loaded")
except featstack.models.ModelError as e:
    assert "LabelBinarizer" in str(e) and "ridge" in str(e), e
    assert not os.path.exists(root + "/bad")
import featstack.heads, featstack.fusion
for name in ("ridge", "soft-logreg"):
    del featstack.heads.HEADS[name]
del featstack.fusion.FUSION_SPECS["wide"]

userheads.register()
assert featstack.list_heads()[-2:] == ["ridge", "soft-logreg"] and featstack.list_fusions()[-1] == "wide"
for head, fusion, keys in (("ridge", "stack", "A,B"), ("ridge", "single", "A"), ("soft-logreg", "vote", "B,C")):
    m = featstack.train_model(cache, keys, head, fusion, out=f"{root}/{head}-{fusion}", cv=3)
    np.save(f"{root}/{head}-{fusion}.npy", m.scores(cache))

res = featstack.run_bench(cache, heads=["ridge", "soft-logreg"], fusions=featstack.list_fusions(),
                          backbones="A,B", max_size=2, cv=3, progress=False)
seen = {(r["head"], r["fusion"]) for r in res.rows}
assert seen == {(h, f) for h in ("ridge", "soft-logreg") for f in featstack.list_fusions()}, seen
wide = {(r["backbones"], r["head"]): r["cv_accuracy_mean"] for r in res.rows if r["fusion"] == "wide"}
concat = {(r["backbones"], r["head"]): r["cv_accuracy_mean"] for r in res.rows if r["fusion"] == "concat"}
assert wide == concat and len(wide) == 2, (wide, concat)

try:  # no converter in the spec: refused before anything is written, naming the head
    featstack.export_model(root + "/ridge-stack", root + "/net", cache=cache)
    raise SystemExit("exported a head without a converter")
except ExportError as e:
    assert "'ridge'" in str(e), e
assert not os.path.exists(root + "/net")
print("TRAINED")
"""

_USER_LOAD = """
import sys, numpy as np
sys.path.insert(0, sys.argv[3])
import featstack, userheads
cache, root = sys.argv[1], sys.argv[2]
try:  # not registered in this process yet: one clear error naming the head
    featstack.load_model(root + "/ridge-stack")
    raise SystemExit("loaded a model of an unregistered head")
except featstack.models.ModelError as e:
    assert "head 'ridge' is not registered" in str(e), e

userheads.register()
for name in ("ridge-stack", "ridge-single", "soft-logreg-vote"):
    m = featstack.load_model(f"{root}/{name}")
    np.testing.assert_array_equal(m.scores(cache), np.load(f"{root}/{name}.npy"))

import torch
from featstack.export import model_converter
m = featstack.load_model(root + "/soft-logreg-vote")
X, _ = m.features(cache)
module = model_converter(m.head, m.fusion)(m.estimator, m.dims, torch.float64)
with torch.no_grad():
    got = module.sklearn_outputs(torch.from_numpy(X.astype(np.float64))).numpy()
np.testing.assert_allclose(got, m.estimator.predict_proba(X.astype(np.float64)), rtol=1e-9, atol=1e-12)
print("LOADED")
"""


def test_head_registered_outside_the_package_round_trips(tmp_path):
    """A head in the user's own module: trains, benches, saves, loads in a new process after
    registering again, predicts identically; export converts it when its spec names a converter
    and otherwise refuses before writing anything. An added fusion is benched."""
    cache = make_cache(tmp_path / "x.h5", seed=1)
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "userheads.py").write_text(textwrap.dedent(_USER_MODULE))
    assert "TRAINED" in _run_python(_USER_TRAIN, cache, tmp_path, mods, cwd=tmp_path).stdout
    assert "LOADED" in _run_python(_USER_LOAD, cache, tmp_path, mods, cwd=tmp_path).stdout
