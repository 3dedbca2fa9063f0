"""Images to answers: `featstack predict NETWORK --data SRC`, unlabelled sources (loose folder,
manifest without labels), and `featstack evaluate` for saved models and networks."""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import write_image_folder
from featstack.cli import main
from featstack.data import synthetic_photo

BACKBONE = "test_resnet-64"


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny batches: one torch thread (conftest)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """3-class photo folder (train 5, test 3 per class), its cache, a logreg model and its network."""
    from featstack.export import export_model
    from featstack.extract import extract
    from featstack.models import train_model

    root = tmp_path_factory.mktemp("pe")
    photos = write_image_folder(root / "photos", per_class={"train": 5, "test": 3}, sizes=((64, 64), (80, 60)))
    cache = root / "c.h5"
    extract(str(photos), [BACKBONE], cache, weights="none", dtype="float32", workers=0, progress=False)
    model = root / "m"
    train_model(cache, BACKBONE, "logreg", "single", out=model)
    net = export_model(model, root / "net")
    return {"root": root, "photos": photos, "cache": cache, "model": model, "net": net}


def _rows(path):
    return list(csv.DictReader(open(path)))


def test_predict_network_on_an_image_folder_matches_the_model(world, tmp_path, capsys):
    from featstack.cache import open_cache
    from featstack.models import load_model

    out = tmp_path / "preds.csv"
    assert main(["predict", str(world["net"]), "--data", str(world["photos"]), "--out", str(out),
                 "--workers", "0", "--batch-size", "7", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    classes = ["cat", "dog", "fox"]
    assert list(rows[0]) == ["id", "split", "label", "pred", *[f"proba_{c}" for c in classes], "error"]
    assert len(rows) == 24 and not any(r["error"] for r in rows)
    proba = np.array([[float(r[f"proba_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    # the network reproduces the saved model's predictions on the cached features of the same images
    cache = open_cache(world["cache"])
    want = dict(zip(cache.ids, load_model(world["model"]).predict_names(cache)))
    assert {r["id"]: r["pred"] for r in rows} == want
    acc = np.mean([r["label"] == r["pred"] for r in rows])
    assert f"accuracy     {acc:.4f} on 24 labelled images" in printed


def test_predict_loose_folder_lists_failed_images_and_writes_stdout(world, tmp_path, capsys):
    loose = tmp_path / "loose"
    loose.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        synthetic_photo(rng, 70, 90).save(loose / f"new{i}.jpg")
    (loose / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert main(["predict", str(world["net"]), "--data", str(loose), "--out", "-", "--workers", "0",
                 "--no-progress"]) == 0
    cap = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(cap.out)))
    assert [r["id"] for r in rows] == ["broken.jpg", "new0.jpg", "new1.jpg", "new2.jpg"]
    assert {r["split"] for r in rows} == {"unlabelled"} and not any(r["label"] for r in rows)
    bad = rows[0]
    assert bad["pred"] == "" and "broken.jpg" in bad["error"]
    assert all(r["pred"] in ("cat", "dog", "fox") and not r["error"] for r in rows[1:])
    assert "failed       1 images" in cap.err and "no labelled images" in cap.err


def test_predict_manifest_without_labels(world, tmp_path):
    imgs = sorted((world["photos"] / "test" / "dog").iterdir())[:2]
    lines = ["path"] + [str(p) for p in imgs]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    assert main(["predict", str(world["net"]), "--data", str(tmp_path / "m.csv"), "--out",
                 str(tmp_path / "p.csv"), "--workers", "0", "--no-progress"]) == 0
    rows = _rows(tmp_path / "p.csv")
    assert len(rows) == 2 and {r["split"] for r in rows} == {"unlabelled"}


def test_predict_wrong_pairings_are_one_line_errors(world, tmp_path, capsys):
    assert main(["predict", str(world["model"]), "--data", str(world["photos"]), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "saved model" in err and err.count("\n") == 1
    assert main(["predict", str(world["net"]), str(world["cache"]), "--out", str(tmp_path / "x.csv")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--data", "demo", "--out", str(tmp_path / "x.csv")]) == 2
    assert "neither a saved model" in capsys.readouterr().err


def test_evaluate_model_and_network_agree(world, tmp_path, capsys):
    from PIL import Image

    from featstack.cache import open_cache
    from featstack.models import load_model

    assert main(["evaluate", str(world["model"]), "--cache", str(world["cache"]), "--out",
                 str(tmp_path / "model.json")]) == 0
    m = json.loads((tmp_path / "model.json").read_text())
    assert {"accuracy", "f1_macro", "n", "per_class", "confusion"} <= set(m) and m["split"] == "test"
    cache = open_cache(world["cache"])
    rows = np.flatnonzero(cache.split_mask("test"))
    pred = load_model(world["model"]).predict_names(cache, rows=rows)
    true = np.array(cache.classes)[cache.labels[rows]]
    assert m["n"] == 9 and m["accuracy"] == pytest.approx(np.mean(pred == true))
    assert set(m["per_class"]) == {"cat", "dog", "fox"}
    assert sum(v["support"] for v in m["per_class"].values()) == 9 == np.sum(m["confusion"])
    for c, v in m["per_class"].items():
        tp = np.sum((pred == c) & (true == c))
        assert v["recall"] == pytest.approx(tp / np.sum(true == c))
    png = tmp_path / "model-confusion.png"
    assert Image.open(png).size[0] > 100
    assert f"accuracy     {m['accuracy']:.4f}" in capsys.readouterr().out

    # the network on the images themselves, and on the cached features, scores the same
    assert main(["evaluate", str(world["net"]), "--data", str(world["photos"]), "--out", str(tmp_path / "ev"),
                 "--workers", "0", "--no-progress"]) == 0
    n = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (tmp_path / "ev" / "confusion.png").is_file()
    assert n["confusion"] == m["confusion"] and n["f1_macro"] == pytest.approx(m["f1_macro"])
    assert main(["evaluate", str(world["net"]), "--cache", str(world["cache"])]) == 0
    assert f"accuracy     {m['accuracy']:.4f} on 9" in capsys.readouterr().out


def test_evaluate_refusals_name_the_problem(world, tmp_path, capsys):
    from featstack.export import load_network, save_network

    net = load_network(world["net"])
    with torch.no_grad():
        next(net.backbones[0].parameters()).add_(0.01)  # as fine-tuning would
    tuned = save_network(net, tmp_path / "tuned")
    assert main(["evaluate", str(tuned), "--cache", str(world["cache"])]) == 2
    err = capsys.readouterr().err
    assert "differs in: weights_sha256" in err and "--data" in err and err.count("\n") == 1
    from featstack.cache import open_cache
    cached = open_cache(world["cache"]).backbone_info(BACKBONE)["weights_sha256"][:12]
    tuned_sha = load_network(tuned).backbone_info[0]["weights_sha256"][:12]
    assert tuned_sha != cached and f"weights_sha256 (network {tuned_sha}, cache {cached})" in err
    assert main(["evaluate", str(world["model"]), "--data", str(world["photos"])]) == 2
    assert "saved model" in capsys.readouterr().err
    assert main(["evaluate", str(world["model"]), "--cache", str(world["cache"]), "--split", "val"]) == 2
    assert "no labelled rows in split 'val'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(world["model"])])  # one of --cache / --data is required


def test_info_shows_input_size_and_class_counts_per_split(world, capsys):
    assert main(["info", str(world["cache"])]) == 0
    out = capsys.readouterr().out
    assert "  train      cat 5, dog 5, fox 5" in out and "  test       cat 3, dog 3, fox 3" in out
    assert "input 64x64" in out
    assert main(["info", str(world["cache"]), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["split_class_counts"]["test"] == {"cat": 3, "dog": 3, "fox": 3}
    assert js["backbones"][0]["input_size"] == "64x64"


def test_export_shows_progress(world, tmp_path, capsys):
    assert main(["export", str(world["model"]), "--out", str(tmp_path / "net")]) == 0
    err = capsys.readouterr().err
    assert "export" in err and f"rebuilding {BACKBONE} and verifying its weights" in err and "saving" in err
