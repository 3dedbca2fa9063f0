"""YAML pipelines: validation errors name key and line; the demo runs end to end; valid stages skip."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_demo_pipeline_end_to_end_then_skips(tmp_path, monkeypatch):
    import featstack.bench
    import featstack.extract
    from featstack.pipeline import run_pipeline

    have_export = (REPO / "featstack" / "export.py").exists()
    export = f"export:\n  out: {tmp_path}/nets/mini\n" if have_export else ""
    path = _write(tmp_path, SMALL_DEMO.format(tmp=tmp_path, export=export))
    calls = {"extract": 0, "bench": 0}
    real_extract, real_bench = featstack.extract.extract, featstack.bench.run_bench

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(featstack.extract, "extract", counting("extract", real_extract))
    monkeypatch.setattr(featstack.bench, "run_bench", counting("bench", real_bench))

    res = run_pipeline(path)
    assert res.stages["extract"] == "ran" and res.stages["bench"] == "ran" and res.stages["train"] == "ran"
    assert calls == {"extract": 1, "bench": 1}
    out = tmp_path / "runs" / "mini"
    assert (out / "results.csv").exists() and (out / "report.md").exists()
    assert (tmp_path / "models" / "mini" / "model.json").exists()
    md = (out / "report.md").read_text()
    assert "1797" in md and "test_resnet" in md and "## Model" in md and "confusion.png" in md

    dom = _render_in_browser(out / "report.html", tmp_path)
    m = re.search(r'data-images="(\d+):(\d+)"', dom)
    assert m, "the report did not finish loading in the browser"
    assert int(m.group(1)) >= 4 and m.group(1) == m.group(2), f"images loaded: {m.group(2)} of {m.group(1)}"
    assert "<h2>Ranking</h2>" in dom and "test_vit" in dom

    # editing the heads re-runs the bench but not the extraction
    path.write_text(path.read_text().replace("[logreg, gaussian-nb]", "[logreg]"))
    res2 = run_pipeline(path)
    assert res2.stages["extract"] == "skipped" and res2.stages["bench"] == "ran"
    assert calls == {"extract": 1, "bench": 2}
    # nothing changed: everything valid is skipped
    res3 = run_pipeline(path)
    assert res3.stages["extract"] == "skipped" and res3.stages["bench"] == "skipped"
    assert res3.stages["train"] == "skipped"
    if have_export:
        assert res3.stages["export"] == "skipped"
    assert calls == {"extract": 1, "bench": 2}
