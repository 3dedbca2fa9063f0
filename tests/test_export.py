"""Export: every head and fusion → a trainable torch module equal to scikit-learn on the cached
features (property tests on random fits), then FeatstackNet on real images against the saved
model's predictions on the cache (demo digits, tiny random-init timm backbones)."""
from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featstack.errors import BackboneError, ConfigError, FeatstackError
from featstack.export import (NETWORK_JSON, NETWORK_TENSORS, ExportError, GaussianNBHead, LinearHead,
                              StackHead, SVCHead, VoteHead, export_head, export_model, load_network,
                              read_network_config, rebuild_backbone)
from featstack.fusion import block_proba, block_scores, build_model
from featstack.heads import create_head, list_heads
from featstack.torch_heads import NystroemHead, head_from_config

HEADS = list_heads()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors and batches of 60 images: one intra-op thread is about as fast, and it does
    not stall at OpenMP barriers when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------ helpers

def _data(n_classes: int, n_features: int, per_class: int, seed: int, offset: float, spread: float):
    """Labelled training rows around random class centres, and test rows drawn wider (so they
    fall outside the training range too: MinMaxScaler clipping, far-away SVC points)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    rng.shuffle(y)
    centres = rng.normal(0, 1.5, (n_classes, n_features))
    X = offset + spread * (centres[y] + rng.normal(0, 1, (len(y), n_features)))
    Xt = offset + spread * rng.normal(0, 2.5, (40, n_features))
    return X, y, np.vstack([Xt, X[:10]])


def _top2_gap(out: np.ndarray) -> np.ndarray:
    if out.ndim == 1:
        return np.abs(out)
    s = np.sort(out, axis=1)
    return s[:, -1] - s[:, -2]


def _jump(m, x: torch.Tensor) -> np.ndarray:
    """Per row, distance to a discontinuity of a head's outputs: multiclass SVC outputs jump when
    a one-vote-one decision changes sign (votes); everything else is continuous (inf)."""
    if isinstance(m, (VoteHead, StackHead)):
        parts = torch.split(x, m.dims, dim=1)
        out = [_jump(b, p) for b, p in zip(m.blocks, parts)]
        if isinstance(m, StackHead):
            out.append(_jump(m.final, m.meta_features(x)))
        return np.minimum.reduce(out)
    if isinstance(m, SVCHead) and m.n_classes > 2:
        return torch.abs(m.ovo_decision(x)).min(dim=1).values.numpy()
    return np.full(len(x), np.inf)


def _margin(m, x: torch.Tensor) -> np.ndarray:
    """Per row, how far a (float64) exported head is from changing its prediction: the top-2 gap
    of what its predict reads (decision values, joint log-likelihoods, the vote's mean
    probabilities, the meta-learner's decisions), the smallest |one-vs-one decision| of an SVC
    (its votes flip there), and the blocks' distance to a jump in their outputs."""
    with torch.no_grad():
        if isinstance(m, VoteHead):
            return np.minimum(_top2_gap(m.sklearn_outputs(x).numpy()), _jump(m, x))
        if isinstance(m, StackHead):
            return np.minimum(_margin(m.final, m.meta_features(x)), _jump(m, x))
        if isinstance(m, SVCHead):
            return torch.abs(m.ovo_decision(x)).min(dim=1).values.numpy()
        if isinstance(m, LinearHead):
            return _top2_gap(m.decision_function(x).numpy())
        return _top2_gap(m(x).numpy())


def _sklearn_outputs(est, X):
    method = "predict_proba" if hasattr(est, "predict_proba") else "decision_function"
    return method, np.asarray(getattr(est, method)(X), dtype=np.float64)


def check_equal(est, X: np.ndarray, dims=None, float32: bool = True) -> dict:
    """The exported module reproduces ``est`` on X: outputs (≤ 1e-6 relative in float64,
    ≤ 1e-4 in float32), predictions, the logits' softmax/argmax and the stacking/vote views.
    Returns the measured worst relative errors."""
    method, ref = _sklearn_outputs(est, X)
    pred = est.predict(X)
    scale = max(1.0, float(np.max(np.abs(ref))))
    m64 = export_head(est, dims, torch.float64)
    margin = _margin(m64, torch.from_numpy(X))
    worst = {}
    for dtype, rtol, near in ((torch.float64, 1e-6, None), (torch.float32, 1e-4, 1e-4))[:2 if float32 else 1]:
        m = m64 if dtype == torch.float64 else export_head(est, dims, dtype)
        x = torch.from_numpy(X.astype(np.float64 if dtype == torch.float64 else np.float32))
        with torch.no_grad():
            got = m.sklearn_outputs(x).numpy()
            logits = m(x)
            idx = m.predict_index(x).numpy()
        assert got.shape == ref.shape and logits.shape == (len(X), len(est.classes_))
        err = np.abs(got - ref)
        assert np.all(err <= rtol * np.abs(ref) + rtol * scale), \
            f"{dtype}: {method} off by {err.max():.3g} (scale {scale:.3g})"
        worst[str(dtype)] = float(err.max() / scale)
        # float64: every prediction, near-ties included (a soft vote of saturated naive Bayes
        # blocks ties at 0.5/0.5 up to 1e-16; the export mirrors scikit-learn's arithmetic there).
        # float32: rows within float32 rounding of a decision boundary may go either way.
        clear = np.ones(len(X), bool) if near is None else (margin > near * scale) | (margin == 0)
        np.testing.assert_array_equal(np.asarray(m.classes)[idx][clear], pred[clear])
        # the logits are what training sees: softmax = the vote's probabilities (an "ovo"
        # SVC has no per-class decision values to vote with; its logits are the ovr ones)
        if getattr(est, "decision_function_shape", "ovr") == "ovr":
            np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), block_proba(est, X),
                                       rtol=rtol, atol=rtol)
        with torch.no_grad():
            np.testing.assert_allclose(m.scores(x).numpy(), block_scores(est, X), rtol=rtol,
                                       atol=rtol * scale)
        # trainable: every number is a parameter; nothing else is saved
        state = m.state_dict()
        params = dict(m.named_parameters())
        assert set(state) == set(params) and all(p.requires_grad for p in params.values())
        assert all(p.dtype == dtype for p in params.values())
    return worst


def _fit(est, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on tiny random problems
        return est.fit(X, y)


# ------------------------------------------------------------------------------------ heads

problem = st.fixed_dictionaries({
    "n_features": st.integers(1, 9),
    "per_class": st.integers(4, 14),
    "seed": st.integers(0, 2**16),
    "offset": st.sampled_from([0.0, -3.0, 7.5]),
    "spread": st.sampled_from([0.05, 1.0, 20.0]),
})


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "multiclass"])
@pytest.mark.parametrize("head", [*HEADS, "svm-rbf@nystroem"])
@SETTINGS
@given(p=problem, n_multi=st.integers(3, 5))
def test_head_equals_sklearn(head, binary, p, n_multi):
    n_classes = 2 if binary else n_multi
    X, y, Xt = _data(n_classes, p["n_features"], p["per_class"], p["seed"], p["offset"], p["spread"])
    est = create_head(head.split("@")[0], random_state=p["seed"])
    if head == "svm-rbf@nystroem":  # past the size switch: kernel layer over landmarks + linear layer
        est.set_params(clf__exact_below=0, clf__n_components=len(X) // 2)
    est = _fit(est, X, y)
    # Nystroem's normalization is the inverse square root of the landmarks' kernel matrix: on
    # these tiny, low-dimensional problems it is near-singular (entries up to 1e6), and float32
    # cannot carry it; float32 is checked on a realistic shape in test_nystroem_head_float32
    check_equal(est, Xt, float32=head != "svm-rbf@nystroem")
    if head == "svm-rbf@nystroem":
        m = export_head(est, dtype=torch.float64)
        assert isinstance(m, NystroemHead) and m.landmarks.shape == (len(X) // 2, p["n_features"])
        again = head_from_config(m.config(), torch.float64)
        again.load_state_dict(m.state_dict())
        x = torch.from_numpy(Xt)
        with torch.no_grad():
            np.testing.assert_array_equal(again(x).numpy(), m(x).numpy())
        torch.nn.functional.cross_entropy(m(x), torch.from_numpy(np.searchsorted(est.classes_, est.predict(Xt)))).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_nystroem_head_float32():
    """svm-rbf past its size switch on embedding-like rows (64 columns, 300 landmarks): the
    float32 export is within the float32 tolerance too."""
    X, y, Xt = _data(4, 64, 150, 0, 0.0, 1.0)
    est = create_head("svm-rbf", random_state=0).set_params(clf__exact_below=0, clf__n_components=300)
    check_equal(_fit(est, X, y), Xt)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "multiclass"])
@pytest.mark.parametrize("fusion", ["vote", "stack"])
@SETTINGS
@given(p=problem, head=st.sampled_from(HEADS), n_multi=st.integers(3, 4),
       dims=st.lists(st.integers(1, 4), min_size=2, max_size=3))
def test_fusion_equals_sklearn(fusion, binary, p, head, n_multi, dims):
    n_classes = 2 if binary else n_multi
    X, y, Xt = _data(n_classes, sum(dims), p["per_class"], p["seed"], p["offset"], p["spread"])
    est = _fit(build_model(head, fusion, dims, cv=3, random_state=p["seed"]), X, y)
    check_equal(est, Xt, dims)


def test_tuned_head_and_class_labels():
    """GridSearchCV exports its best estimator; string class labels are kept in order."""
    X, y, Xt = _data(3, 5, 12, 3, 0.0, 1.0)
    labels = np.array(["cat", "dog", "fox"])[y]
    est = _fit(create_head("logreg", tune=True), X, labels)
    check_equal(est, Xt)
    assert export_head(est).classes == ["cat", "dog", "fox"]


def _ties_problem():
    """Three classes around a circle: the three pairwise boundaries are not concurrent, so near
    the centre there is a small region where one-vs-one votes go 1-1-1 (a cyclic tie)."""
    rng = np.random.default_rng(0)
    ang = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    y = np.repeat(np.arange(3), 15)
    X = np.c_[np.cos(ang[y]), np.sin(ang[y])] * 2 + rng.normal(0, 0.4, (45, 2))
    g = np.linspace(-0.7, 0.7, 161)
    Xt = np.array(np.meshgrid(g, g)).reshape(2, -1).T
    return X, y, Xt


@pytest.mark.parametrize("kwargs", [
    {}, {"break_ties": True}, {"decision_function_shape": "ovo"},
    {"kernel": "linear"}, {"kernel": "poly", "degree": 3, "coef0": 0.5}, {"kernel": "sigmoid", "gamma": 0.1},
], ids=["rbf", "break_ties", "ovo", "linear", "poly", "sigmoid"])
def test_svc_votes_and_ties_like_libsvm(kwargs):
    from sklearn.svm import SVC

    X, y, Xt = _ties_problem()
    est = SVC(**kwargs).fit(X, y)
    check_equal(est, Xt)
    m = export_head(est)
    with torch.no_grad():
        dec = m.ovo_decision(torch.from_numpy(Xt)).numpy()
    # pairs (0,1), (0,2), (1,2): a cyclic outcome is a 1-1-1 tie
    wins = np.stack([np.where(dec[:, 0] > 0, 0, 1), np.where(dec[:, 1] > 0, 0, 2),
                     np.where(dec[:, 2] > 0, 1, 2)], axis=1)
    votes = np.stack([(wins == c).sum(1) for c in range(3)], axis=1)
    tied = (votes == 1).all(axis=1)
    assert tied.sum() >= 3, "the problem should produce vote ties"
    if not kwargs.get("break_ties"):  # libsvm: the lowest class index wins a tie
        assert (est.predict(Xt[tied]) == 0).all()
    else:  # break_ties: the ovr confidences decide, so ties go several ways
        assert len(set(est.predict(Xt[tied]))) > 1
    np.testing.assert_array_equal(m.predict_index(torch.from_numpy(Xt)).numpy(), est.predict(Xt))


def test_gaussian_nb_and_nb_logits_are_joint_log_likelihoods():
    X, y, Xt = _data(4, 6, 10, 5, 2.0, 3.0)
    for name in ("gaussian-nb", "multinomial-nb", "complement-nb"):
        est = _fit(create_head(name), X, y)
        m = export_head(est)
        with torch.no_grad():
            jll = m(torch.from_numpy(Xt)).numpy()
        np.testing.assert_allclose(jll, est[-1].predict_joint_log_proba(est[:-1].transform(Xt)),
                                   rtol=1e-9)
        np.testing.assert_allclose(torch.log_softmax(torch.from_numpy(jll), 1).numpy(),
                                   est.predict_log_proba(Xt), rtol=1e-9, atol=1e-9)
    # MinMaxScaler(clip=True) stays an affine + clamp layer in front; StandardScaler is folded
    assert isinstance(export_head(_fit(create_head("multinomial-nb"), X, y)).pre[0].clip, tuple)
    assert len(export_head(_fit(create_head("logreg"), X, y)).pre) == 0
    assert isinstance(export_head(_fit(create_head("gaussian-nb"), X, y)), GaussianNBHead)


def test_every_parameter_trains():
    """Gradients reach every parameter of a stack of RBF SVMs, and a step changes the outputs."""
    X, y, Xt = _data(3, 6, 10, 1, 0.0, 1.0)
    est = _fit(build_model("svm-rbf", "stack", [2, 4], cv=3), X, y)
    m = export_head(est, [2, 4])
    x = torch.from_numpy(X)
    loss = torch.nn.functional.cross_entropy(m(x), torch.from_numpy(y))
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    before = m(x).detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    opt.step()
    assert not torch.allclose(m(x).detach(), before)


def test_export_errors_are_clear():
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.svm import SVC

    X, y, _ = _data(3, 4, 8, 0, 0.0, 1.0)
    with pytest.raises(ExportError, match="not fitted"):
        export_head(create_head("logreg"))
    with pytest.raises(ExportError, match="RandomForestClassifier cannot be exported"):
        export_head(RandomForestClassifier(n_estimators=2).fit(X, y))
    with pytest.raises(ExportError, match="probability=True"):
        export_head(_fit(SVC(probability=True), X, y))
    with pytest.raises(ExportError, match="differ from the fusion's own block widths"):
        export_head(_fit(build_model("logreg", "vote", [2, 2]), X, y), [1, 3])
    with pytest.raises(ConfigError, match=r"shape \(N, 4\)"):
        export_head(_fit(create_head("logreg"), X, y))(torch.zeros(3, 5))
    assert issubclass(ExportError, FeatstackError)


# ------------------------------------------------------------------------------------ network

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A real cache of 260 demo digits (float32 storage for a tight comparison) and models."""
    from featstack.data import ArraySource, DemoSource
    from featstack.extract import extract
    from featstack.models import train_model

    root = tmp_path_factory.mktemp("demo")
    full = DemoSource()
    splits = np.asarray(full.samples.splits)
    rows = np.r_[np.flatnonzero(splits == "train")[:200], np.flatnonzero(splits == "test")[:60]]
    src = ArraySource(full.images[rows], full.samples.labels[rows], splits=list(splits[rows]),
                      classes=full.samples.classes, ids=list(full.samples.ids[rows]))
    cache = root / "demo.h5"
    extract(src, ["test_resnet", "test_vit"], cache, weights="none", dtype="float32", workers=0,
            batch_size=64, progress=False)
    models = {}
    for head, fusion in (("logreg", "concat"), ("svm-rbf", "stack"), ("gaussian-nb", "vote")):
        out = root / f"{head}-{fusion}"
        train_model(cache, "test_resnet,test_vit", head, fusion, out=out, cv=3)
        models[(head, fusion)] = out
    return {"root": root, "source": src, "cache": cache, "models": models, "rows": rows}


def _test_rows(cache):
    from featstack.cache import open_cache
    c = open_cache(cache)
    return c, np.flatnonzero(c.split_mask("test"))


@pytest.mark.parametrize("head,fusion", [("logreg", "concat"), ("svm-rbf", "stack"), ("gaussian-nb", "vote")])
def test_network_equals_saved_model_on_real_images(demo, tmp_path, monkeypatch, head, fusion):
    from featstack.export import decode_squares
    from featstack.models import load_model

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")
    monkeypatch.setattr(pickle, "dump", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(torch, "save", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)

    out = export_model(demo["models"][(head, fusion)], tmp_path / "net")
    assert sorted(p.name for p in out.iterdir()) == [NETWORK_JSON, NETWORK_TENSORS]
    net = load_network(out)
    saved = load_model(demo["models"][(head, fusion)])
    cache, rows = _test_rows(demo["cache"])
    X, _ = saved.features(cache, rows=rows)
    # the model reads float32 features, and some heads (GaussianNB) then compute in float32;
    # the network's float64 head reproduces the model in float64 on the same features
    X64 = X.astype(np.float64)
    want = [cache.classes[int(c)] for c in saved.estimator.predict(X64)]
    squares = decode_squares(demo["source"], rows, net.input_side)
    assert squares.dtype == torch.uint8 and squares.shape[-1] == net.input_side == 169
    with torch.no_grad():
        f = net.features(squares)
        got = [net.classes[i] for i in net.head.predict_index(f).tolist()]
        out_net = net.head.sklearn_outputs(f).numpy()
        # the image-level API is the same computation (on the same batch)
        assert net.predict_names(squares[:3]) == got[:3]
        # same rows in the same batch: a different batch size picks other float32 conv kernels,
        # which moves features by ~1e-6 relative (seen under load), so compare batch to batch
        f3 = net.features(squares[:3])
        np.testing.assert_allclose(net.sklearn_outputs(squares[:3]).numpy(), net.head.sklearn_outputs(f3).numpy(),
                                   rtol=1e-6, atol=1e-9)
        # the head is the saved model: on the cached features, the same outputs and predictions
        x_cached = torch.from_numpy(X64).to(f.dtype)
        out_cached = net.head.sklearn_outputs(x_cached).numpy()
        got_cached = [net.classes[i] for i in net.head.predict_index(x_cached).tolist()]
    assert got_cached == list(want)
    method = "predict_proba" if hasattr(saved.estimator, "predict_proba") else "decision_function"
    ref = getattr(saved.estimator, method)(X64)
    np.testing.assert_allclose(out_cached, ref, rtol=1e-4, atol=1e-4 * max(1, np.abs(ref).max()))
    # from the pixels: the network's square input approximates extraction, which gives every
    # backbone timm's own transform of the full image (featstack.preprocess)
    feats = f.numpy()
    cos = (feats * X).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(X, axis=1)
    assert cos.min() >= 0.99, cos.min()
    assert np.mean(np.asarray(got) == np.asarray(want)) >= 0.9
    # every tensor came back: a second load is bit-identical, parameters are trainable
    again = load_network(out)
    for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(p.requires_grad for p in net.parameters())
    cfg = json.loads((out / NETWORK_JSON).read_text())
    assert [b["key"] for b in cfg["backbones"]] == ["test_resnet", "test_vit"]
    assert cfg["head"]["type"] == {"concat": "linear", "stack": "stack", "vote": "vote"}[fusion]
    assert cfg["classes"] == [cache.classes[int(c)] for c in saved.estimator.classes_]
    assert cfg["dims"] == saved.dims
    assert cfg["backbones"][0]["data_config"]["input_size"] == [3, 160, 160]


def test_network_input_forms(demo, tmp_path):
    """Raw 32x32 digits (resized by the network), floats in [0, 1] and uint8 give the same
    answers; the raw images agree with the cache-side predictions for almost every sample."""
    from featstack.export import decode_squares
    from featstack.models import load_model

    out = export_model(demo["models"][("logreg", "concat")], tmp_path / "net")
    net = load_network(out)
    cache, rows = _test_rows(demo["cache"])
    raw = torch.from_numpy(demo["source"].images[rows]).permute(0, 3, 1, 2).contiguous()
    squares = decode_squares(demo["source"], rows[:4], net.input_side)
    with torch.no_grad():
        p_raw = net.predict(raw)
        p_raw_float = net.predict(raw[:20].float() / 255.0)
        assert torch.equal(net.features(squares[:4]), net.features(squares[:4].float() / 255.0))
    saved = load_model(demo["models"][("logreg", "concat")])
    X, _ = saved.features(cache, rows=rows)
    want = np.asarray([cache.classes[int(c)] for c in saved.estimator.predict(X.astype(np.float64))])
    names = np.asarray(net.classes)
    agree = np.mean(names[p_raw.numpy()] == want)
    assert agree >= 0.95, agree
    assert np.mean(p_raw[:20].numpy() == p_raw_float.numpy()) >= 0.9
    with pytest.raises(ConfigError, match=r"\(N, 3, H, W\)"):
        net(torch.zeros(2, 32, 32, 3, dtype=torch.uint8).permute(0, 3, 1, 2)[:, :1])


def test_backbone_weights_are_verified(demo, tmp_path):
    from featstack.cache import open_cache

    info = open_cache(demo["cache"]).backbone_info("test_vit")
    model = rebuild_backbone(info)
    assert sum(p.numel() for p in model.parameters()) > 0
    bad = dict(info, spec=dict(info["spec"], seed=1))  # another seed → other random weights
    with pytest.raises(BackboneError, match="'test_vit'.*sha256"):
        rebuild_backbone(bad)
    arrays = {"key": "emb", "weights_source": "arrays", "spec": None}
    with pytest.raises(BackboneError, match="'emb'.*no timm model spec"):
        rebuild_backbone(arrays)


def test_load_network_refuses_mismatched_files(demo, tmp_path):
    out = export_model(demo["models"][("logreg", "concat")], tmp_path / "net")
    other = export_model(demo["models"][("gaussian-nb", "vote")], tmp_path / "other")
    (out / NETWORK_TENSORS).write_bytes((other / NETWORK_TENSORS).read_bytes())
    with pytest.raises(ExportError, match="sha256 differs"):
        load_network(out)
    with pytest.raises(ExportError, match="does not fit"):
        load_network(out, verify=False)
    with pytest.raises(ExportError, match="no network.json"):
        load_network(tmp_path)
    _, cfg = read_network_config(other)
    assert cfg["format"] == "featstack-network"


def test_cli_export(demo, tmp_path, capsys):
    from featstack.cli import main

    model = demo["models"][("svm-rbf", "stack")]
    out = tmp_path / "nets" / "m"
    assert main(["export", str(model), "--out", str(out), "--cache", str(demo["cache"])]) == 0
    printed = capsys.readouterr().out
    assert "test_resnet" in printed and "network.safetensors" in printed and "stack" in printed
    assert isinstance(load_network(out).head, StackHead)
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featstack export: error:") and "nope" in err and err.count("\n") == 1


def test_onnx_export(demo, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    out = export_model(demo["models"][("logreg", "concat")], tmp_path / "net", onnx=True)
    model = onnx.load(str(out / "network.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["images"]


def test_onnx_without_the_package_is_one_clear_error(demo, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *a, **k):
        if name in ("onnx", "onnxscript"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_onnx)
    from featstack.export import export_onnx
    with pytest.raises(ConfigError, match=r"featstack\[onnx\]"):
        export_onnx(load_network(export_model(demo["models"][("logreg", "concat")], tmp_path / "net")),
                    tmp_path / "x.onnx")


def test_linear_head_shapes():
    X, y, _ = _data(2, 3, 6, 0, 0.0, 1.0)
    m = export_head(_fit(create_head("logreg"), X, y))
    assert isinstance(m, LinearHead) and m.binary and m.weight.shape == (1, 3)
    assert m(torch.from_numpy(X)).shape == (len(X), 2)
    assert torch.all(m(torch.from_numpy(X))[:, 0] == 0)
