"""Every fingerprint refusal names the backbone and each differing field with both values
(issue 15, Deliver 6), command by command through the CLI on real caches of a real timm model."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import write_image_folder
from featstack.cache import FINGERPRINT_FIELDS, fingerprint_differences, open_cache
from featstack.cli import main

BACKBONE = "test_resnet-64"
EXTRACT = ["--backbones", BACKBONE, "--weights", "none", "--workers", "0", "--dtype", "float32", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A photo folder, its cache (seed 0), a second cache of other random weights (seed 1) and a
    model trained on the first; all made with the CLI."""
    root = tmp_path_factory.mktemp("fp")
    photos = write_image_folder(root / "photos", per_class={"train": 4, "test": 2}, sizes=((64, 64),))
    # both spellings of extract: flags, and the positional `featstack extract SRC CACHE`
    assert main(["extract", "--data", str(photos), "--cache", str(root / "c.h5"), "--seed", "0", *EXTRACT]) == 0
    assert main(["extract", str(photos), str(root / "other.h5"), "--seed", "1", *EXTRACT]) == 0
    assert main(["train", str(root / "c.h5"), "--backbones", BACKBONE, "--out", str(root / "m")]) == 0
    sha = {n: open_cache(root / f"{n}.h5").backbone_info(BACKBONE)["weights_sha256"][:12] for n in ("c", "other")}
    return {"root": root, "photos": photos, "sha": sha}


def _refusal(capsys, argv: list[str]) -> str:
    """Run a command that must be refused: exit 2 and one error line, returned."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"featstack {argv[0]}: error: ") and err.count("\n") == 1, err
    return err


def test_extract_names_field_and_values(world, capsys):
    root, sha = world["root"], world["sha"]
    err = _refusal(capsys, ["extract", "--data", str(world["photos"]), "--cache", str(root / "c.h5"),
                            "--seed", "1", *EXTRACT])
    assert f"backbone {BACKBONE!r}" in err and "--overwrite" in err
    assert f"weights_sha256 (cached {sha['c']}, now {sha['other']})" in err
    err = _refusal(capsys, ["extract", "--data", str(world["photos"]), "--cache", str(root / "c.h5"),
                            "--preprocess", "reference", *EXTRACT])
    assert "differs in: preprocess (cached 'fast', now 'reference')" in err


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_model_commands_name_field_and_values(world, command, capsys, tmp_path):
    root, sha = world["root"], world["sha"]
    model, other = str(root / "m"), str(root / "other.h5")
    argv = {"predict": ["predict", model, other, "--out", str(tmp_path / "p.csv")],
            "evaluate": ["evaluate", model, "--cache", other, "--out", str(tmp_path / "m.json")],
            "export": ["export", model, "--out", str(tmp_path / "net"), "--cache", other]}[command]  # export with its progress bar on: still one line
    err = _refusal(capsys, argv)
    assert f"backbone {BACKBONE!r}" in err
    assert f"differs in: weights_sha256 (model {sha['c']}, cache {sha['other']})" in err
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_model_saved_before_fields_were_recorded_still_explains(world, capsys, tmp_path):
    """An older model.json (hashes only) is still refused, saying the fields are unknown."""
    import shutil

    old = shutil.copytree(world["root"] / "m", tmp_path / "old")
    meta = json.loads((old / "model.json").read_text())
    del meta["feature_fields"]
    (old / "model.json").write_text(json.dumps(meta))
    err = _refusal(capsys, ["predict", str(old), str(world["root"] / "other.h5"), "--out", str(tmp_path / "p.csv")])
    assert f"backbone {BACKBONE!r}" in err and "records no fingerprint fields" in err


def test_data_config_differences_name_the_entry(world, capsys, tmp_path):
    """A mapping field names the entry that differs (data_config.input_size), not the whole dict."""
    cache = tmp_path / "big.h5"
    assert main(["extract", "--data", str(world["photos"]), "--cache", str(cache), "--input-size", "48",
                 *EXTRACT]) == 0
    err = _refusal(capsys, ["predict", str(world["root"] / "m"), str(cache), "--out", str(tmp_path / "p.csv")])
    assert "data_config.input_size (model [3, 64, 64], cache [3, 48, 48])" in err


def test_run_names_field_and_values(world, capsys, tmp_path):
    """`featstack run` refuses a changed extraction setting on an existing cache the same way."""
    root = world["root"]
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"data: {world['photos']}\ncache: {root / 'c.h5'}\nout: {tmp_path / 'run'}\nweights: none\n"
                    f"backbones: [{BACKBONE}]\nextract: {{preprocess: reference, dtype: float32, workers: 0}}\n")
    err = _refusal(capsys, ["run", str(pipe)])
    assert f"backbone {BACKBONE!r}" in err and "preprocess (cached 'fast', now 'reference')" in err


_VALUES = st.one_of(st.none(), st.sampled_from(["fast", "reference", "a" * 64, "b" * 64]), st.integers(1, 4096),
                    st.dictionaries(st.sampled_from(["input_size", "mean", "crop_pct"]), st.integers(0, 3),
                                    max_size=3))


@given(saved=st.fixed_dictionaries({f: _VALUES for f in FINGERPRINT_FIELDS}),
       found=st.fixed_dictionaries({f: _VALUES for f in FINGERPRINT_FIELDS}))
def test_differences_name_exactly_the_fields_that_differ(saved, found):
    """Each differing field (or mapping entry) is named once with both values; equal ones never."""
    text = fingerprint_differences(saved, found)
    assert text.startswith("differs in: ")
    for f in FINGERPRINT_FIELDS:
        a, b = saved[f], found[f]
        if a == b:
            assert f"{f} (" not in text and f"{f}." not in text
        elif isinstance(a, dict) and isinstance(b, dict):
            for k in set(a) | set(b):
                assert (f"{f}.{k} (saved " in text) == (a.get(k) != b.get(k))
        else:
            assert text.count(f"{f} (saved ") == 1
            if isinstance(a, str) and len(a) == 64:  # a hash: its first 12 characters
                assert f"{f} (saved {a[:12]}, found " in text
    if saved == found:
        assert text == "differs in: the fingerprint format"
