"""Typed stage configs: the CLI options, the YAML keys and the Python API defaults all come from
the dataclasses of featstack.config, so they cannot drift apart."""
from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass

import pytest

from featstack import config
from featstack.cli import build_parser, main
from featstack.config import (MISSING, STAGES, BackboneConfig, BenchConfig, PipelineConfig, from_args,
                              settings)
from featstack.errors import ConfigError
from featstack.pipeline import _SECTIONS, load_pipeline

COMMANDS = ["extract", "bench", "train", "export", "finetune", "report"]

MINIMAL = """\
data: demo
cache: {tmp}/c.h5
weights: none
backbones: [test_resnet, test_vit]
"""


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest → action of every option (positionals included, --help excluded)."""
    return {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def _yaml_keys(stage: str) -> dict[str, str]:
    """Every YAML key that sets a field of ``stage``: field → 'section.key', 'top-key' or 'backbones[].key'."""
    out = {}
    top = {s.name for s in settings(PipelineConfig)}
    entry = {s.name for s in settings(BackboneConfig)}
    for s in settings(STAGES[stage]):
        place, key = s.yaml_place
        if place == "section":
            out[s.name] = f"{stage}.{key}"
        elif place == "top":
            assert key in top, f"{stage}.{s.name} names top-level key {key!r}, which PipelineConfig lacks"
            out[s.name] = key
        elif place == "backbone":
            assert key in entry, f"{stage}.{s.name} names backbone key {key!r}, which BackboneConfig lacks"
            out[s.name] = f"backbones[].{key}"
        elif place == "wired":
            out[s.name] = "(wired)"
    return out


@pytest.mark.parametrize("stage", COMMANDS)
def test_every_cli_option_is_a_yaml_key_and_back(stage):
    options = _options(_subparser(stage))
    fields = {s.name: s for s in settings(STAGES[stage])}
    # a positional alias (`extract SRC CACHE`) is another spelling of one field's option
    aliases = {s.alias_dest: s.name for s in fields.values() if s.alias_dest}
    assert set(aliases) <= set(options)
    for dest, name in aliases.items():
        assert not options[dest].option_strings and options[dest].nargs == "?" and name in options
        options.pop(dest)
    # the command's options are exactly the dataclass's fields (none hand-written beside it)
    assert set(options) == {n for n, s in fields.items() if s.meta["cli"] is not None}
    yaml_keys = _yaml_keys(stage)
    for dest, action in options.items():
        assert dest in yaml_keys, f"featstack {stage} {action.option_strings or dest} has no YAML key"
    for name, key in yaml_keys.items():
        assert name in options, f"YAML key {key} has no `featstack {stage}` option"
    # no exceptions: every field has a command-line form (train.model/metric included)
    assert [n for n, s in fields.items() if s.meta["cli"] is None] == []


@pytest.mark.parametrize("stage", COMMANDS)
def test_every_option_shows_help_and_default(stage):
    text = _subparser(stage).format_help()
    for dest, action in _options(_subparser(stage)).items():
        assert action.help, f"{stage} {dest}: no help"
        if action.option_strings:
            # required by argparse, or (an option with a positional alias) by from_args
            required = action.required or "(required: this or " in action.help
            shown = "default" in action.help or (required and "(required" in action.help)
            assert shown, f"featstack {stage} {action.option_strings[0]}: no default shown"
    assert "{choices}" not in text  # registry choices filled in when help is shown


def _all_parsers(parser: argparse.ArgumentParser, name: str = "featstack"):
    """(command line, parser) of every command and subcommand (`featstack weights convert`)."""
    yield name, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for n, p in a.choices.items():
                yield from _all_parsers(p, f"{name} {n}")


def test_every_option_of_every_command_shows_help_and_default():
    """Hand-written commands too (predict, evaluate, run, verify, info, report, weights)."""
    seen = 0
    for name, parser in _all_parsers(build_parser()):
        for a in parser._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            seen += 1
            assert a.help, f"{name} {a.option_strings or a.dest}: no help"
            if a.option_strings and not a.required:
                assert "default" in a.help or "(required" in a.help, f"{name} {a.option_strings[0]}: no default"
    assert seen > 100


def test_registry_choices_are_read_when_used(monkeypatch):
    """A head registered after import is a valid choice on the CLI and in YAML, and shows in help."""
    from featstack import heads

    assert "my-head" not in _subparser("bench").format_help()
    monkeypatch.setitem(heads.HEADS, "my-head", heads.HEADS["logreg"])
    assert "my-head" in _subparser("bench").format_help()
    args = _subparser("bench").parse_args(["c.h5", "--heads", "my-head,logreg"])
    assert from_args(BenchConfig, args).heads == ["my-head", "logreg"]


@pytest.mark.parametrize("stage", _SECTIONS)
def test_yaml_defaults_equal_cli_defaults(stage, tmp_path):
    """One default per setting: a pipeline that leaves a section empty gets the CLI's defaults."""
    extra = {"export": "export: {}\n", "finetune": "export: {}\nfinetune: {}\n"}.get(stage, "")
    path = tmp_path / "p.yaml"
    path.write_text(MINIMAL.format(tmp=tmp_path) + extra)
    cfg = load_pipeline(path).stages[stage]
    for s in settings(STAGES[stage]):
        if s.yaml_place[0] == "section" and not s.required:
            if stage == "train" and s.name == "fusion":
                continue  # a pipeline picks the bench's best fusion
            assert getattr(cfg, s.name) == s.default, f"{stage}.{s.name}"
            action = _options(_subparser(stage)).get(s.name)
            if action is not None and action.default is not None and not s.meta["cli_required"]:
                cli = config.split_list(action.default) if list in s.types else action.default
                assert cli == s.default, f"featstack {stage} {action.option_strings}: default {cli!r}"


STAGE_FUNCTIONS = {
    "extract": ("featstack.extract", "extract"), "bench": ("featstack.bench", "run_bench"),
    "train": ("featstack.models", "train_model"), "export": ("featstack.export", "export_model"),
    "finetune": ("featstack.finetune", "finetune"), "report": ("featstack.report", "build_report"),
}


@pytest.mark.parametrize("stage", COMMANDS)
def test_python_api_uses_the_same_names_and_defaults(stage):
    import importlib

    module, name = STAGE_FUNCTIONS[stage]
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    for s in settings(STAGES[stage]):
        if s.api_name is None:
            continue
        assert s.api_name in params, f"{name}() has no parameter {s.api_name!r} for {stage}.{s.name}"
        default = params[s.api_name].default
        if default is None and s.default in ({}, []):
            continue  # an empty mapping/list by default: None in a signature (no mutable defaults)
        if default is not inspect.Parameter.empty and not s.required and s.default is not None:
            value = default if not isinstance(s.default, list) else config.split_list(default)
            assert value == s.default, f"{name}({s.api_name}={default!r}) but {stage}.{s.name} = {s.default!r}"


def test_shared_constants_are_defined_once():
    from featstack import cache, extract, finetune, preprocess

    assert cache.DEFAULT_SHARD_ROWS is config.DEFAULT_SHARD_ROWS
    assert extract.PRECISIONS is finetune.PRECISIONS is config.PRECISIONS
    assert preprocess.PREPROCESS_MODES is config.PREPROCESS_MODES


@pytest.mark.parametrize("edit,message", [
    ("extract:\n  threads: two\n", r"line 6: extract.threads must be an integer or null, got str 'two'"),
    ("extract:\n  compression: zstd\n", r"line 6: extract.compression: 'zstd' is not one of lzf, gzip"),
    ("extract:\n  shard_rows: 0\n", r"line 6: extract.shard_rows: must be >= 1, got 0"),
    ("bench:\n  cv: 1\n", r"line 6: bench.cv: must be >= 2, got 1"),
    ("bench:\n  progres: false\n", r"line 6: unknown key 'bench.progres' \(did you mean 'progress'\?\)"),
    ("train:\n  model: named\n  backbones: [test_vit]\n  head: logreg\n  fusion: stak\n",
     r"line 9: train.fusion: unknown fusion 'stak' \(did you mean 'stack'\?\)"),
    ("export:\n  head_dtype: float16\n", r"line 6: export.head_dtype: 'float16' is not one of float64, float32"),
    ("export: {}\nfinetune:\n  precision: fp8\n", r"line 7: finetune.precision: 'fp8' is not one of"),
])
def test_new_yaml_keys_are_checked_with_file_and_line(tmp_path, edit, message):
    path = tmp_path / "p.yaml"
    path.write_text(MINIMAL.format(tmp=tmp_path) + edit)
    with pytest.raises(ConfigError, match=message) as e:
        load_pipeline(path)
    assert str(path) in str(e.value)


def test_named_model_without_fusion_takes_the_cli_default(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(MINIMAL.format(tmp=tmp_path) + "train:\n  backbones: [test_vit]\n  head: svm-rbf\n")
    t = load_pipeline(path).stages["train"]
    assert (t.model, t.backbones, t.head, t.fusion) == ("named", ["test_vit"], "svm-rbf", "single")


@pytest.mark.parametrize("argv,message", [
    (["bench", "x.h5", "--cv", "1"], "featstack bench: error: --cv: must be >= 2, got 1"),
    (["bench", "x.h5", "--fusions", "single,stak"], "featstack bench: error: unknown fusion 'stak' "
                                                     "(did you mean 'stack'?)"),
    (["extract", "--data", "demo", "--backbones", "test_vit", "--weights-file", "nope"],
     "featstack extract: error: --weights-file 'nope': expected KEY=PATH"),
    (["train", "x.h5", "--backbones", "a", "--out", "m", "--fusion", "nope"], "featstack train: error: unknown fusion"),
    (["extract", "photos", "c.h5", "--data", "other", "--backbones", "test_vit"],
     "featstack extract: error: SRC 'photos' and --data 'other' disagree; give one of them"),
    (["extract", "photos", "c.h5", "--cache", "d.h5", "--backbones", "test_vit"],
     "featstack extract: error: CACHE 'c.h5' and --cache 'd.h5' disagree; give one of them"),
    (["extract", "--backbones", "test_vit"], "featstack extract: error: --data (or SRC) is required"),
])
def test_cli_values_are_checked_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_extract_takes_src_and_cache_positionally():
    """`featstack extract SRC CACHE` = `--data SRC --cache CACHE`; one positional = SRC; giving a
    flag and its positional with the same value is fine."""
    from featstack.config import ExtractConfig

    def parsed(*argv):
        return from_args(ExtractConfig, _subparser("extract").parse_args([*argv, "--backbones", "test_vit"]))

    flags = parsed("--data", "photos", "--cache", "c.h5")
    assert parsed("photos", "c.h5") == flags == parsed("photos", "--cache", "c.h5") == parsed("photos", "c.h5",
                                                                                             "--data", "photos")
    assert (parsed("photos").data, parsed("photos").cache) == ("photos", None)


def _number_or_auto(text: str) -> float | None:
    return None if text == "auto" else float(text)


def test_a_new_field_becomes_an_option_and_a_key():
    """The mechanism on a made-up stage: every kind of field → argparse → a checked config."""

    @dataclass
    class Toy:
        src: str = config.setting(MISSING, "input", cli="positional")
        names: list[str] = config.setting(["a"], "names", choices=("a", "b"), what="name")
        size: int | None = config.setting(None, "size", minimum=1, default_text="auto")
        rate: float = config.setting(0.5, "rate")
        fast: bool = config.setting(False, "go fast")
        bar: bool = config.setting(True, "progress bar")
        files: dict[str, str] = config.setting({}, "files", pairs=True, metavar="KEY=PATH")
        decay: float | None = config.setting(0.5, "decay", parse=_number_or_auto, default_text="0.5; auto: derived")
        dst: str | None = config.setting(None, "output", positional_alias="DST", default_text="next to src")

    p = argparse.ArgumentParser(formatter_class=config.HelpFormatter)
    config.add_arguments(p, Toy)
    cfg = from_args(Toy, p.parse_args(["in", "--names", "b,a", "--size", "3", "--rate", "1", "--fast",
                                       "--no-bar", "--files", "k=v", "--files", "j=w"]))
    assert cfg == Toy("in", ["b", "a"], 3, 1.0, True, False, {"k": "v", "j": "w"}, 0.5)
    assert from_args(Toy, p.parse_args(["in", "out"])).dst == from_args(Toy, p.parse_args(["in", "--dst", "out"])).dst
    with pytest.raises(ConfigError, match=r"DST 'a' and --dst 'b' disagree"):
        from_args(Toy, p.parse_args(["in", "a", "--dst", "b"]))
    assert from_args(Toy, p.parse_args(["in", "--decay", "auto"])).decay is None
    assert from_args(Toy, p.parse_args(["in", "--decay", "0.25"])).decay == 0.25
    with pytest.raises(SystemExit):
        p.parse_args(["in", "--decay", "lots"])
    assert from_args(Toy, p.parse_args(["in"])) == Toy("in")
    with pytest.raises(ConfigError, match=r"unknown name 'c'; known names: a, b"):
        from_args(Toy, p.parse_args(["in", "--names", "c"]))
    with pytest.raises(ConfigError, match=r"--size: must be >= 1, got 0"):
        from_args(Toy, p.parse_args(["in", "--size", "0"]))
    text = p.format_help()
    assert "(default: auto)" in text and "(default: 0.5)" in text and "--no-bar" in text


def test_keys_that_took_null_still_do(tmp_path):
    """YAML values that were valid before the typed configs stay valid (null = the default)."""
    path = tmp_path / "p.yaml"
    path.write_text(MINIMAL.format(tmp=tmp_path) + "bench:\n  backend: null\n  backbones: null\n"
                    "train:\n  head: null\n  out: null\nextract:\n  workers: null\n  input_size: null\n")
    p = load_pipeline(path)
    assert p.stages["train"].model == "best" and p.stages["bench"].backend is None
