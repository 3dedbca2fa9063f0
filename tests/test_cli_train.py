"""`featstack train` on the command line: the bench's best row (`--model best --bench DIR
--metric`, the YAML keys train.model/train.metric), and fusions refused for too few backbones
by the rule the bench plans with (FusionSpec.min_backbones)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from featstack.cache import SampleTable, write_arrays_cache
from featstack.cli import main
from featstack.fusion import backbone_sizes, fusion_spec
from featstack.models import best_model, load_model


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """3 classes, 60 train + 30 test rows, backbone A informative, B weak."""
    root = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(0)
    n = 90
    y = np.arange(n) % 3
    centres = rng.normal(size=(3, 5)) * 2
    feats = {"A": centres[y] + rng.normal(size=(n, 5)), "B": rng.normal(size=(n, 3)) + 0.3 * y[:, None]}
    samples = SampleTable(ids=[f"s{i}" for i in range(n)], labels=y, splits=["train"] * 60 + ["test"] * 30,
                          classes=["a", "b", "c"])
    path = root / "x.h5"
    write_arrays_cache(path, samples, feats, metas={"A": {"weights_sha256": "wa"}, "B": {"weights_sha256": "wb"}})
    return path


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"featstack {argv[0]}: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("fusion", ["stack", "vote", "concat"])
def test_fusion_of_several_backbones_refused_for_one_as_bench_does(cache, tmp_path, capsys, fusion):
    needs = backbone_sizes(fusion_spec(fusion))  # "2+ backbones": the spec's bound, in words
    err = _error(capsys, ["train", str(cache), "--backbones", "A", "--fusion", fusion, "--out", str(tmp_path / "m")])
    assert f"fusion {fusion!r} needs {needs}, got 1 (A); use single" in err
    assert not (tmp_path / "m").exists()
    err = _error(capsys, ["bench", str(cache), "--backbones", "A", "--fusions", fusion, "--out", str(tmp_path / "b"),
                          "--no-progress"])
    assert f"{fusion!r} needs {needs}" in err  # the bench's refusal, in the same words


def test_train_the_best_row_of_a_bench_folder(cache, tmp_path, capsys):
    bench = tmp_path / "run"
    assert main(["bench", str(cache), "--heads", "logreg,gaussian-nb", "--fusions", "single,concat,vote",
                 "--cv", "3", "--out", str(bench), "--no-progress", "--no-report"]) == 0
    rows = json.loads((bench / "bench.json").read_text())["rows"]
    backbones, head, fusion = best_model(rows, "cv_accuracy_mean")
    capsys.readouterr()
    assert main(["train", str(cache), "--bench", str(bench), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert f"best row     of {bench} by cv_accuracy_mean: {'+'.join(backbones)} / {head} / {fusion}" in out
    m = load_model(tmp_path / "m")
    assert (m.backbones, m.head, m.fusion) == (backbones, head, fusion)
    # --model best is the default; naming it changes nothing; --metric picks another column
    assert main(["train", str(cache), "--model", "best", "--bench", str(bench), "--metric", "cv_f1_macro_mean",
                 "--out", str(tmp_path / "m2")]) == 0
    m2 = load_model(tmp_path / "m2")
    assert (m2.backbones, m2.head, m2.fusion) == best_model(rows, "cv_f1_macro_mean")


def test_train_model_choice_errors(cache, tmp_path, capsys):
    bench = tmp_path / "nobench"
    bench.mkdir()
    m = str(tmp_path / "m")
    assert "no such file; run `featstack bench CACHE --out" in _error(
        capsys, ["train", str(cache), "--bench", str(bench), "--out", m])
    assert "--bench picks the model (--model best); do not also name --backbones, --head" in _error(
        capsys, ["train", str(cache), "--bench", str(bench), "--backbones", "A", "--head", "svm-rbf", "--out", m])
    assert "name the model with --backbones" in _error(capsys, ["train", str(cache), "--out", m])
    assert "--model named needs --backbones" in _error(capsys, ["train", str(cache), "--model", "named", "--out", m])
    assert not any(p.name == "m" for p in tmp_path.iterdir())


def test_named_model_is_what_it_was(cache, tmp_path, capsys):
    """`--backbones` alone trains that model, as before --model existed."""
    assert main(["train", str(cache), "--backbones", "A,B", "--head", "gaussian-nb", "--out", str(tmp_path / "m")]) == 0
    m = load_model(tmp_path / "m")
    assert (m.backbones, m.head, m.fusion) == (["A", "B"], "gaussian-nb", "concat")
