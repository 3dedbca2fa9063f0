"""Fine-tuning an exported network: freeze policies, frozen BatchNorm statistics, learning-rate
groups, checkpoints without pickle, a short real fine-tune on demo digits, head rows from the
backbone's own classifier."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import timm
import torch
from torch import nn

from conftest import write_image_folder
from featstack.data import open_source
from featstack.errors import BackboneError, ConfigError, DataError
from featstack.export import NETWORK_JSON, NETWORK_TENSORS, decode_squares, export_model, load_network, save_network
from featstack.finetune import (apply_freeze, backbone_groups, evaluate, finetune, init_from_source_classifier,
                                make_optimizer, parse_freeze, set_train_mode, split_rows, train_steps)

BACKBONES = ["test_resnet-64", "test_vit-64"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny batches: one torch thread (conftest)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """160 demo digits (120 train, 40 val) at 64 px, a linear-SVM head on both backbones and a
    logistic head on one, exported as networks."""
    from featstack.data import ArraySource, DemoSource
    from featstack.extract import extract
    from featstack.models import train_model

    root = tmp_path_factory.mktemp("ft")
    full = DemoSource()
    rows = np.flatnonzero(np.asarray(full.samples.splits) == "train")[:160]
    src = ArraySource(full.images[rows], full.samples.labels[rows], splits=["train"] * 120 + ["val"] * 40,
                      classes=full.samples.classes)
    cache = root / "c.h5"
    extract(src, BACKBONES, cache, weights="none", dtype="float32", workers=0, progress=False)
    train_model(cache, ",".join(BACKBONES), "linear-svm", "concat", out=root / "m")
    train_model(cache, BACKBONES[0], "logreg", "single", out=root / "m1")
    return {"root": root, "source": src, "cache": cache, "net": export_model(root / "m", root / "net"),
            "net1": export_model(root / "m1", root / "net1")}


def _batches(src, net, rows, size=16):
    x = decode_squares(src, rows, net.input_side)
    y = torch.from_numpy(src.samples.labels[rows])
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(rows), size)]


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bn_buffers(model: nn.Module) -> dict:
    return {f"{n}.{b}": getattr(m, b).clone() for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in ("running_mean", "running_var")}


def test_freeze_policy_parsing_and_groups():
    assert parse_freeze("head-only") == 0 and parse_freeze("top-3") == 3 and parse_freeze("none") is None
    for bad in ("top", "top-x", "all", "top--1"):
        with pytest.raises(ConfigError, match="head-only, top-N"):
            parse_freeze(bad)
    resnet = timm.create_model("test_resnet", num_classes=0)
    groups = backbone_groups(resnet)
    assert [g[0].split(".")[0] for g in groups] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    vit = timm.create_model("test_vit", num_classes=0)
    vg = backbone_groups(vit)
    assert "norm.weight" in vg[-1] and any(n.startswith("blocks.") for n in vg[-1])  # final norm goes with the top block
    assert sum(len(g) for g in vg) == len(list(vit.parameters()))


@pytest.mark.parametrize("policy,bn", [("top-1", "frozen"), ("top-1", "train"), ("head-only", "train")])
def test_frozen_parts_and_batchnorm_stats_stay_put(demo, policy, bn):
    net = load_network(demo["net"])
    summary = apply_freeze(net, policy)
    resnet, vit = net.backbones
    before = {k: _state(m) for k, m in (("resnet", resnet), ("vit", vit), ("head", net.head))}
    bn_before = _bn_buffers(resnet)
    opt = make_optimizer(net, lr=1e-3, backbone_lr_scale=0.1)
    train_steps(net, _batches(demo["source"], net, np.arange(16), size=8), opt, bn=bn)
    after = {k: _state(m) for k, m in (("resnet", resnet), ("vit", vit), ("head", net.head))}
    trainable = {f"{k}:{n}" for k, m in (("resnet", resnet), ("vit", vit)) for n, p in m.named_parameters()
                 if p.requires_grad}
    if policy == "head-only":
        assert not trainable and summary["test_resnet-64"]["trainable_params"] == 0
    else:
        assert trainable and all(n.startswith("resnet:layer4.") or n.startswith("vit:blocks.") or
                                 n.startswith("vit:norm.") for n in trainable)
        assert summary["test_resnet-64"]["trainable_groups"] == [4]
    for part in ("resnet", "vit"):
        for name, t in before[part].items():
            changed = not torch.equal(t, after[part][name])
            is_param = name in dict(net.backbones[0 if part == "resnet" else 1].named_parameters())
            if is_param:
                assert changed == (f"{part}:{name}" in trainable), name
    # every head parameter moved
    assert all(not torch.equal(before["head"][k], after["head"][k]) for k in before["head"])
    # BatchNorm running statistics: frozen layers never change; trainable ones only with bn="train"
    bn_after = _bn_buffers(resnet)
    assert bn_before
    for name, t in bn_before.items():
        in_trainable = name.startswith("layer4.") and policy != "head-only"
        assert torch.equal(t, bn_after[name]) != (in_trainable and bn == "train"), name


def test_train_mode_keeps_frozen_modules_in_eval(demo):
    net = load_network(demo["net"])
    apply_freeze(net, "top-1")
    set_train_mode(net, bn="train")
    resnet = net.backbones[0]
    assert not resnet.layer1.training and not resnet.bn1.training and resnet.layer4.training
    assert resnet.layer4[0].bn1.training and net.head.training
    set_train_mode(net, bn="frozen")
    assert not resnet.layer4[0].bn1.training and resnet.layer4[0].conv1.training
    with pytest.raises(ConfigError, match="--bn"):
        set_train_mode(net, bn="sometimes")


def test_learning_rate_groups_and_cosine_schedule(demo):
    net = load_network(demo["net"])
    apply_freeze(net, "top-2")
    opt = make_optimizer(net, lr=2e-3, backbone_lr_scale=0.05, weight_decay=0.01)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"head", "backbone:test_resnet-64", "backbone:test_vit-64"}
    assert groups["head"]["lr"] == 2e-3 and groups["backbone:test_resnet-64"]["lr"] == pytest.approx(1e-4)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["head"]["params"]) == ids(net.head.parameters())
    for key, model in zip(net.keys, net.backbones):
        assert ids(groups[f"backbone:{key}"]["params"]) == ids(p for p in model.parameters() if p.requires_grad)
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["backbone:test_resnet-64"]["lr"] == pytest.approx(5e-5)
    apply_freeze(net, "head-only")
    assert [g["name"] for g in make_optimizer(net, 1e-3).param_groups] == ["head"]
    with pytest.raises(ConfigError, match="--lr"):
        make_optimizer(net, 0)


def test_short_finetune_lowers_loss_and_keeps_best(demo, tmp_path, monkeypatch):
    def no_pickle(*a, **k):
        raise AssertionError("pickle used")
    for mod, name in ((pickle, "dump"), (pickle, "load"), (torch, "save"), (torch, "load")):
        monkeypatch.setattr(mod, name, no_pickle)

    src = demo["source"]
    before = load_network(demo["net"])
    res = finetune(demo["net"], src, out=tmp_path / "ft", epochs=3, freeze="top-1", lr=3e-4, batch_size=32,
                   device="cpu", progress=False)
    out = res.out
    assert sorted(p.name for p in out.iterdir()) == ["best", "history.json", "last", NETWORK_JSON, NETWORK_TENSORS]
    for sub in ("best", "last"):
        assert sorted(p.name for p in (out / sub).iterdir()) == [NETWORK_JSON, NETWORK_TENSORS]
    train, val, _, where = split_rows(src, before.classes)
    assert where == "val split" and len(train) == 120 and len(val) == 40
    # training loss (eval mode, all training rows) went down
    tb = _batches(src, before, train, 60)
    loss0 = evaluate(before, tb)["loss"]
    loss1 = evaluate(res.net, tb)["loss"]
    assert loss1 < loss0, (loss0, loss1)
    hist = res.history
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert hist[3]["train_loss"] < hist[2]["train_loss"] < hist[1]["train_loss"]
    # the saved checkpoint is the best epoch's network, and the JSON says so
    cfg = json.loads((out / NETWORK_JSON).read_text())["finetune"]
    accs = [h["val_accuracy"] for h in cfg["history"]]
    assert cfg["best_val_accuracy"] == max(accs) and accs[cfg["best_epoch"]] == max(accs)
    assert cfg["best_epoch"] == res.best_epoch and cfg["freeze"] == "top-1" and cfg["val"] == "val split"
    assert cfg["history"][1]["lr"]["head"] == 3e-4
    assert cfg["history"][1]["lr"]["backbone:test_vit-64"] == pytest.approx(3e-5)
    best = load_network(out)
    vb = _batches(src, best, val, 60)
    assert evaluate(best, vb)["accuracy"] == pytest.approx(cfg["best_val_accuracy"])
    if res.best_epoch == 0:  # nothing beat the exported head: the checkpoint is the input network
        assert all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), before.state_dict().values()))
    # a re-save of the loaded network round-trips bit for bit, finetune record included
    again = load_network(save_network(best, tmp_path / "again"))
    assert all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), again.state_dict().values()))
    assert json.loads((tmp_path / "again" / NETWORK_JSON).read_text())["finetune"]["best_epoch"] == res.best_epoch


def test_held_out_val_when_no_val_split(demo):
    from featstack.data import ArraySource

    src = demo["source"]
    only_train = ArraySource(src.images[:100], src.samples.labels[:100], classes=src.samples.classes)
    net = load_network(demo["net1"])
    tr, va, targets, where = split_rows(only_train, net.classes, 0.1, seed=3)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va) and "10%" in where
    assert np.array_equal(split_rows(only_train, net.classes, 0.1, seed=3)[1], va)
    assert not np.array_equal(split_rows(only_train, net.classes, 0.1, seed=4)[1], va)
    other = ArraySource(src.images[:4], [0, 1, 0, 1], classes=["cat", "1"])
    with pytest.raises(DataError, match="'cat'"):
        split_rows(other, net.classes)


@pytest.fixture(scope="module")
def fish(tmp_path_factory):
    """A checkpoint with its ImageNet classifier, extracted through --weights-file, and a
    logistic head on classes of which two are ImageNet names."""
    from safetensors.torch import save_file

    from featstack.extract import extract
    from featstack.models import train_model

    root = tmp_path_factory.mktemp("fish")
    torch.manual_seed(7)
    full = timm.create_model("test_resnet", pretrained=False)
    ckpt = root / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(ckpt))
    photos = write_image_folder(root / "photos", classes=("Goldfish", "tench", "unicorn"),
                                per_class={"train": 5, "val": 2}, sizes=((64, 64),))
    cache = root / "c.h5"
    extract(str(photos), ["test_resnet-64"], cache, weights_files={"test_resnet-64": ckpt}, workers=0,
            progress=False)
    train_model(cache, "test_resnet-64", "logreg", "single", out=root / "m")
    return {"photos": photos, "net": export_model(root / "m", root / "net"), "full": full}


def test_init_from_source_classifier(fish, demo):
    net = load_network(fish["net"])
    assert net.classes == ["Goldfish", "tench", "unicorn"]
    w0 = net.head.weight.detach().clone()
    info = init_from_source_classifier(net)
    assert info["label_set"] == "imagenet-1k" and info["unmatched"] == ["unicorn"]
    assert {c: m["index"] for c, m in info["matched"].items()} == {"Goldfish": 1, "tench": 0}
    fc = fish["full"].get_classifier()
    # copied rows, rescaled to the head's scale: the median row norm of the fitted head
    s = info["scale"]
    assert s == pytest.approx(float(w0.float().norm(dim=1).median() / fc.weight.detach()[[1, 0]].norm(dim=1).median()))
    torch.testing.assert_close(net.head.weight[0].float(), fc.weight[1] * s)
    torch.testing.assert_close(net.head.bias[1].float() - net.head.bias[0].float(), (fc.bias[0] - fc.bias[1]) * s)
    assert torch.equal(net.head.weight[2], w0[2])
    # the rows act on the same vectors as the pretrained classifier: its logits for those classes, scaled
    x = decode_squares(open_source(fish["photos"]), [0, 1], net.input_side)
    with torch.no_grad():
        feats = net.features(x)
        fish["full"].eval()
        want = fish["full"](net._prep[0](net.squares(x)))
    got = net.head(feats)[:, :2].float()
    torch.testing.assert_close(got[:, 0] - got[:, 1], (want[:, 1] - want[:, 0]) * s, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="single-backbone"):
        init_from_source_classifier(load_network(demo["net"]))
    with pytest.raises(BackboneError, match="random-initialised"):
        init_from_source_classifier(load_network(demo["net1"]))


def test_cli_finetune(fish, tmp_path, capsys):
    from featstack.cli import main

    out = tmp_path / "ft"
    assert main(["finetune", str(fish["net"]), "--data", str(fish["photos"]), "--epochs", "1", "--freeze", "top-1",
                 "--init-from-source-classifier", "--out", str(out), "--workers", "0", "--no-progress",
                 "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "tench -> tench" in printed and "best epoch" in printed
    cfg = json.loads((out / NETWORK_JSON).read_text())["finetune"]
    assert cfg["init_from_source_classifier"]["unmatched"] == ["unicorn"] and len(cfg["history"]) == 2
    assert main(["finetune", str(fish["net"]), "--data", str(fish["photos"]), "--freeze", "top-x"]) == 2
    err = capsys.readouterr().err
    assert "top-N" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------
# Keeping the gains: selection rule, best and last, history.json, augmentation, weight decay
# --------------------------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from featstack.finetune import (AUGMENTS, HISTORY_JSON, _Squares, derived_weight_decay,  # noqa: E402
                                head_regularization, select_epoch)


def test_select_epoch_rule():
    assert select_epoch([1.0, 1.0, 1.0, 1.0]) == 3            # saturated val: ties go to the later epoch
    assert select_epoch([0.855, 0.85, 0.859]) == 2           # a small gain beats the export
    assert select_epoch([0.855, 0.85, 0.859], min_improvement=0.01) == 0
    assert select_epoch([0.9, 0.8, 0.95, 0.95, 0.7]) == 3
    assert select_epoch([0.9, 0.8, 0.7], select="last") == 2
    assert select_epoch([0.5]) == 0
    with pytest.raises(ConfigError, match="--select"):
        select_epoch([0.5, 0.6], select="first")
    with pytest.raises(ConfigError, match="--min-improvement"):
        select_epoch([0.5, 0.6], min_improvement=-0.1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=1, max_size=8),
       st.sampled_from([0.0, 0.25, 0.5]))
def test_select_epoch_properties(accs, margin):
    e = select_epoch(accs, "best", margin)
    if e == 0:   # the export is kept only when no fine-tuned epoch reaches it plus the margin
        assert all(a < accs[0] + margin for a in accs[1:]) or len(accs) == 1
    else:        # else the LAST epoch with the highest fine-tuned accuracy
        assert accs[e] == max(accs[1:]) and accs[e] >= accs[0] + margin
        assert all(a < accs[e] for a in accs[e + 1:])
    # the online rule finetune applies epoch by epoch ends on the same choice
    online = 0
    for k in range(1, len(accs)):
        if select_epoch(accs[:k + 1], "best", margin) == k:
            online = k
    assert online == e


def test_best_last_selected_and_history(demo, tmp_path, capsys):
    from featstack.data import ArraySource

    src = demo["source"]
    # 120 train, 30 val, 10 test rows: a test split, and a val split below the warning size
    splits = ["train"] * 120 + ["val"] * 30 + ["test"] * 10
    data = ArraySource(src.images, src.samples.labels, splits=splits, classes=src.samples.classes)
    res = finetune(demo["net1"], data, out=tmp_path / "ft", epochs=2, freeze="head-only", lr=3e-3,
                   batch_size=40, device="cpu", progress=False, select="last")
    err = capsys.readouterr().err
    assert "warning: val has 30 images" in err
    out = res.out
    hist = json.loads((out / HISTORY_JSON).read_text())
    assert [h["epoch"] for h in hist["epochs"]] == [0, 1, 2]
    assert all(h["train_loss"] > 0 and 0 <= h["val_accuracy"] <= 1 for h in hist["epochs"][1:])
    assert hist["epochs"][1]["lr"]["head"] == pytest.approx(3e-3)
    assert hist["selected"] == "last" and hist["selected_epoch"] == 2 == res.selected_epoch
    assert hist["best_epoch"] == select_epoch([h["val_accuracy"] for h in hist["epochs"]])
    assert hist["test_rows"] == 10 and hist["warnings"] and "val has 30" in hist["warnings"][0]
    # OUT holds the last epoch (select=last), byte for byte the same tensors as OUT/last
    assert (out / NETWORK_TENSORS).read_bytes() == (out / "last" / NETWORK_TENSORS).read_bytes()
    chosen, last, best = load_network(out), load_network(out / "last"), load_network(out / "best")
    assert all(torch.equal(a, b) for a, b in zip(chosen.state_dict().values(), last.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(res.net.state_dict().values(), last.state_dict().values()))
    # the recorded test accuracy is the selected network's on the test rows
    test = np.arange(150, 160)
    acc = evaluate(chosen, _batches(data, chosen, test, 10))["accuracy"]
    assert hist["test_accuracy"] == pytest.approx(acc) == res.test_accuracy
    assert np.sum(hist["test_metrics"]["confusion"]) == 10 and hist["test_metrics"]["n"] == 10
    # OUT/best holds the network of the best epoch: its val accuracy is the recorded one
    val = np.arange(120, 150)
    assert evaluate(best, _batches(data, best, val, 30))["accuracy"] == pytest.approx(
        hist["epochs"][hist["best_epoch"]]["val_accuracy"])
    assert json.loads((out / NETWORK_JSON).read_text())["finetune"]["selected_epoch"] == 2


def test_weight_decay_from_head_regularisation(demo):
    net = load_network(demo["net1"])  # logreg, C = 1
    assert head_regularization(net) == 1.0 and net.meta["head_C"] == 1.0
    wd, why = derived_weight_decay(net, 200)
    assert wd == pytest.approx(1 / 200) and "C" in why
    net.meta["head_C"] = 0.25
    assert derived_weight_decay(net, 200)[0] == pytest.approx(1 / 50)
    net.meta["head_C"] = None  # naive Bayes: no weight penalty
    assert derived_weight_decay(net, 200)[0] == 0.0
    del net.meta["head_C"]      # a network exported before head_C was recorded: from the saved model
    assert head_regularization(net) == 1.0
    # linear-svm: a solver that rescales C records the C it used, which is the one that counts
    from featstack.models import load_model
    clf = load_model(demo["root"] / "m").estimator.steps[-1][1]
    assert head_regularization(load_network(demo["net"])) == pytest.approx(getattr(clf, "C_effective_", clf.C))


@pytest.mark.parametrize("name", [n for n in AUGMENTS if n != "none"])
def test_augmentation_gives_varied_squares_of_the_input_size(demo, name):
    side = 48
    ds = _Squares(demo["source"], np.arange(4), np.zeros(4, dtype=np.int64), side, augment=name)
    torch.manual_seed(0)
    import random
    random.seed(0)
    a, b = ds[0][0], ds[0][0]
    assert a.dtype == torch.uint8 and a.shape == (3, side, side)
    assert not torch.equal(a, b)  # random crops differ between two draws of the same image
    plain = _Squares(demo["source"], np.arange(4), np.zeros(4, dtype=np.int64), side)
    assert torch.equal(plain[0][0], plain[0][0])
    with pytest.raises(ConfigError, match="--augment"):
        _Squares(demo["source"], np.arange(4), np.zeros(4, dtype=np.int64), side, augment="heavy")


def test_finetune_with_augmentation_runs_and_trains(demo, tmp_path):
    res = finetune(demo["net1"], demo["source"], out=tmp_path / "aug", epochs=1, freeze="head-only", lr=1e-3,
                   batch_size=60, device="cpu", progress=False, augment="light", weight_decay=0.0)
    hist = json.loads((res.out / HISTORY_JSON).read_text())
    assert hist["augment"] == "light" and hist["weight_decay"] == 0.0 and hist["epochs"][1]["train_loss"] > 0
