"""YAML pipelines: validation errors name key and line; the demo runs end to end; valid stages skip."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featstack.errors import ConfigError
from featstack.pipeline import load_pipeline

from conftest import REPO

SMALL_DEMO = """\
name: mini
data: demo
cache: {tmp}/cache/mini.h5
out: {tmp}/runs/mini
weights: none
backbones:
  - test_resnet
  - name: test_vit
    weights: none
extract:
  batch_size: 128
  progress: false
bench:
  heads: [logreg, gaussian-nb]
  fusions: [single, concat, stack]
  max_size: 2
  cv: 3
  n_jobs: 1
train:
  model: best
  out: {tmp}/models/mini
{export}report: true
"""


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit,message", [
    (("  max_size: 2", "  max_sise: 2"), r"line 16: unknown key 'bench.max_sise' \(did you mean 'max_size'\?\)"),
    (("  cv: 3", "  cv: three"), r"line 17: bench.cv must be an integer, got str 'three'"),
    (("  - test_resnet", "  - resnet5O"), r"line 7: backbones\[0\]: unknown backbone 'resnet5O'"),
    (("[logreg, gaussian-nb]", "[logreg, svm-rbff]"), r"line 14: bench.heads\[1\]: unknown head 'svm-rbff' "
                                                       r"\(did you mean 'svm-rbf'\?\)"),
    (("[single, concat, stack]", "[single, stak]"), r"line 15: bench.fusions\[1\]: unknown fusion 'stak'"),
    (("weights: none\nbackbones", "weights: nonee\nbackbones"), r"line 5: weights must be hub or none"),
    (("data: demo\n", ""), r"missing required key 'data'"),
    (("  batch_size: 128", "  batch_size: 128\n  batch_size: 64"), r"line 12: duplicate key 'extract.batch_size'"),
    (("  model: best", "  model: best\n  head: logreg"), r"train.backbones: a named model needs"),
    (("report: true", "report: 3"), r"line 2\d: report must be true/false, got int 3"),
])
def test_config_errors_name_key_and_line(tmp_path, edit, message):
    text = SMALL_DEMO.format(tmp=tmp_path, export="")
    assert edit[0] in text
    path = _write(tmp_path, text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match=message) as e:
        load_pipeline(path)
    assert str(path) in str(e.value)


def test_invalid_yaml_and_cli_error(tmp_path):
    path = _write(tmp_path, "data: demo\nbackbones: [test_resnet\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(path)
    r = subprocess.run([sys.executable, "-m", "featstack", "run", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "p.yaml" in r.stderr
    assert not (tmp_path / "cache").exists()


def test_shipped_pipelines_are_valid():
    for name in ("demo", "imagefolder", "local-weights"):
        path = REPO / "pipelines" / f"{name}.yaml"
        if name == "local-weights":  # its weight files are the user's: only the file reference fails
            with pytest.raises(ConfigError, match="weights file for 'resnet50' not found"):
                load_pipeline(path)
            continue
        p = load_pipeline(path)
        assert p.stages["extract"] is not None and p.stages["bench"] is not None


def _find_browser() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name) or (shutil.which(name, path="/usr/lib/chromium") if name == "chromium" else None)
        if found:
            return found
    return None


def _render_in_browser(report: Path, tmp_path: Path) -> str:
    """Load the report in a headless browser and return the DOM after a load-time image check."""
    browser = _find_browser()
    if browser is None:
        pytest.skip("no headless Chromium on this machine (.ci/run installs chromium-headless-shell)")
    probe = tmp_path / "probe.html"
    check = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "document.body.dataset.images=im.length+':'+im.filter(i=>i.complete&&i.naturalWidth>0).length;"
             "});</script>")
    probe.write_text(report.read_text().replace("</body>", check + "</body>"))
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                        "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The small demo pipeline (with export) run three times: from scratch, after editing the
    heads, and unchanged; with extract() and run_bench() calls counted."""
    import featstack.bench
    import featstack.extract
    from featstack.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("demo")
    path = _write(tmp, SMALL_DEMO.format(tmp=tmp, export=f"export:\n  out: {tmp}/nets/mini\n"))
    calls = {"extract": 0, "bench": 0}
    real_extract, real_bench = featstack.extract.extract, featstack.bench.run_bench

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(featstack.extract, "extract", counting("extract", real_extract))
        mp.setattr(featstack.bench, "run_bench", counting("bench", real_bench))
        runs["first"] = (run_pipeline(path), dict(calls))
        md = (tmp / "runs" / "mini" / "report.md").read_text()
        # editing the heads re-runs the bench but not the extraction
        path.write_text(path.read_text().replace("[logreg, gaussian-nb]", "[logreg]"))
        runs["edited"] = (run_pipeline(path), dict(calls))
        runs["unchanged"] = (run_pipeline(path), dict(calls))
    return {"tmp": tmp, "path": path, "runs": runs, "first_report_md": md}


def test_demo_pipeline_end_to_end_then_skips(demo_runs):
    tmp, runs = demo_runs["tmp"], demo_runs["runs"]
    res, calls = runs["first"]
    assert res.stages["extract"] == "ran" and res.stages["bench"] == "ran" and res.stages["train"] == "ran"
    assert res.stages["export"] == "ran" and (tmp / "nets" / "mini" / "network.json").exists()
    assert calls == {"extract": 1, "bench": 1}
    out = tmp / "runs" / "mini"
    assert (out / "results.csv").exists() and (out / "report.md").exists()
    assert (tmp / "models" / "mini" / "model.json").exists()
    md = demo_runs["first_report_md"]
    assert "1797" in md and "test_resnet" in md and "## Model" in md and "confusion.png" in md

    res2, calls = runs["edited"]
    assert res2.stages["extract"] == "skipped" and res2.stages["bench"] == "ran"
    assert calls == {"extract": 1, "bench": 2}
    # nothing changed: everything valid is skipped
    res3, calls = runs["unchanged"]
    assert res3.stages["extract"] == "skipped" and res3.stages["bench"] == "skipped"
    assert res3.stages["train"] == "skipped" and res3.stages["export"] == "skipped"
    assert calls == {"extract": 1, "bench": 2}


def test_the_trained_pick_is_the_bench_refit(demo_runs):
    """train: model: best inherits the bench's cv (3 here; train's own default is 5), so the saved
    model scores on the test split exactly what the bench reported for its pick."""
    import csv

    from featstack.cache import open_cache
    from featstack.models import load_model

    tmp = demo_runs["tmp"]
    best = next(csv.DictReader((tmp / "runs" / "mini" / "results.csv").open()))
    model = load_model(tmp / "models" / "mini")
    assert "+".join(model.backbones) == best["backbones"] and model.head == best["head"]
    cache = open_cache(tmp / "cache" / "mini.h5")
    rows = cache.rows(split="test", labelled=True)
    acc = float(np.mean(model.predict(cache, rows) == cache.labels[rows]))
    assert acc == pytest.approx(float(best["test_accuracy"]), abs=1e-6)


def test_report_loads_in_a_browser(demo_runs, tmp_path):
    out = demo_runs["tmp"] / "runs" / "mini"
    dom = _render_in_browser(out / "report.html", tmp_path)
    m = re.search(r'data-images="(\d+):(\d+)"', dom)
    assert m, "the report did not finish loading in the browser"
    assert int(m.group(1)) >= 4 and m.group(1) == m.group(2), f"images loaded: {m.group(2)} of {m.group(1)}"
    assert "<h2>Ranking</h2>" in dom and "test_vit" in dom


_NO_TORCH = ("import sys; from featstack.cli import main; rc = main({argv!r}); "
             "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules); "
             "print('RC', rc, 'HEAVY', heavy)")


def _run_light(argv: list[str], cwd: Path) -> str:
    """Run the featstack CLI in a fresh interpreter; its last line says which heavy modules loaded."""
    r = subprocess.run([sys.executable, "-c", _NO_TORCH.format(argv=argv)], cwd=cwd, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_check_imports_neither_torch_nor_timm(tmp_path):
    assert _run_light(["run", "--check", str(REPO / "pipelines" / "demo.yaml")], tmp_path) == "RC 0 HEAVY []"
    # an unknown backbone is still found at check time (timm's names read from its sources)
    bad = _write(tmp_path, (REPO / "pipelines" / "demo.yaml").read_text().replace("model: mobilenetv2_100", "model: mobilenetv2_1OO", 1))
    line = _run_light(["run", "--check", str(bad)], tmp_path)
    assert line == "RC 2 HEAVY []"


def test_run_with_extraction_skipped_imports_neither_torch_nor_timm(demo_runs):
    """A re-run whose stages are all valid (export included) loads no torch, timm or torchvision."""
    assert _run_light(["run", str(demo_runs["path"])], demo_runs["tmp"]) == "RC 0 HEAVY []"


def test_timm_names_match_timm():
    """The names read from timm's sources are exactly those timm registers (deprecated included)."""
    import timm
    from timm.models import _registry

    from featstack import timm_names

    assert set(timm_names.list_models()) == set(_registry._model_entrypoints)
    assert set(timm.list_models()) <= set(timm_names.list_models())
    assert timm_names.is_model("vit_base_patch16_224.augreg_in21k") and not timm_names.is_model("resnet5O")


FINETUNE_PIPELINE = """\
name: ft
data: {photos}
cache: {tmp}/c.h5
out: {tmp}/runs/ft
weights: none
backbones: [test_resnet-64]
extract:
  progress: false
bench:
  heads: [logreg]
  fusions: [single]
  cv: 2
train:
  out: {tmp}/models/ft
export:
  out: {tmp}/nets/ft
finetune:
  epochs: {epochs}
  freeze: head-only
  batch_size: 16
  workers: 0
  progress: false
report: false
"""


def test_run_stamps_finetune_and_skips_it_when_unchanged(tmp_path, capsys):
    from conftest import write_image_folder
    from featstack.pipeline import run_pipeline

    photos = write_image_folder(tmp_path / "photos", per_class={"train": 4, "test": 1}, sizes=((64, 64),))
    path = _write(tmp_path, FINETUNE_PIPELINE.format(photos=photos, tmp=tmp_path, epochs=1))
    assert run_pipeline(path).stages["finetune"] == "ran"
    assert (tmp_path / "nets" / "ft-ft" / "history.json").exists()
    capsys.readouterr()
    again = run_pipeline(path)
    assert again.stages["finetune"] == "skipped" and "finetune skipped" in capsys.readouterr().err
    assert again.network == str(tmp_path / "nets" / "ft-ft")
    # a changed setting trains again
    path.write_text(FINETUNE_PIPELINE.format(photos=photos, tmp=tmp_path, epochs=2))
    third = run_pipeline(path)
    assert third.stages["finetune"] == "ran"
    history = json.loads((tmp_path / "nets" / "ft-ft" / "history.json").read_text())
    assert len(history["epochs"]) == 3
