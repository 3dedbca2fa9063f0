"""YAML pipelines: one file names every stage of the job, ``featstack run FILE`` runs them.

Stages: extract → bench → train → export → finetune → report. Each stage is skipped when its
output is already valid for the current settings (the cache's fingerprints decide for extraction;
a stamp of settings + fingerprints for the others), so editing the heads and re-running does no
extraction. The whole file is validated first — unknown keys, wrong types, unknown models, heads
or fusions — and each mistake is one error naming the file, line and key, before any work starts.

Relative paths in the file are relative to the current working directory (where ``featstack run``
is started), like every other featstack command.
"""
from __future__ import annotations

import difflib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .bounds import check_key
from .config import (STAGES, BackboneConfig, ExtractConfig, PipelineConfig, api_kwargs, default_fusion, problem, settings,
                     type_names, type_ok)
from .errors import ConfigError, FeatstackError

# The schema is derived from the stage dataclasses of featstack.config: a stage's section
# accepts its "section" fields; top-level keys are PipelineConfig's; a backbone entry's keys are
# BackboneConfig's. key → (allowed python types, default).
_SECTIONS = ("extract", "bench", "train", "export", "finetune")


def _schema(cls, place: str = "section") -> dict[str, tuple]:
    """key → (allowed types, default[, parse]) of the fields of ``cls`` that live at ``place``."""
    return {s.name: (s.types, None if s.required else s.default, s.meta["parse"])
            for s in settings(cls) if s.yaml_place[0] == place}


_BACKBONE_KEYS = _schema(BackboneConfig)
_TOP_KEYS = {**_schema(PipelineConfig), **{s: ((dict, bool, type(None)), None) for s in _SECTIONS}}
_OPTIONAL_STAGES = {"export", "finetune"}  # run only when the file names them


@dataclass
class BackboneEntry:
    """One backbone of a pipeline: ``name`` is its cache key; ``model`` the architecture
    (a backbone key; default: the name itself)."""

    name: str
    weights: str
    weights_file: str | None = None
    input_size: int | None = None
    model: str | None = None
    data_config: dict | None = None

    def spec(self, seed: int, input_size: int | None = None):
        from .backbones import resolve_backbone
        return resolve_backbone(self.model or self.name, name=self.name,
                                weights=self.weights if self.weights != "file" else "hub",
                                weights_file=self.weights_file, input_size=self.input_size or input_size,
                                seed=seed, data_config=self.data_config)


@dataclass
class Pipeline:
    """A validated pipeline file."""

    path: Path
    name: str
    data: str
    cache: str
    out: str
    seed: int
    backbones: list[BackboneEntry]
    stages: dict[str, Any]  # stage → its config (ExtractConfig, BenchConfig, ...; None: stage off)
    report: bool
    lines: dict[str, int] = field(default_factory=dict)  # dotted key → line, for later errors

    def error(self, key: str, message: str) -> ConfigError:
        line = self.lines.get(key)
        where = f"{self.path}, line {line}" if line else str(self.path)
        return ConfigError(f"{where}: {key}: {message}")


def _convert(node: yaml.Node, path: Path, key: str, lines: dict) -> Any:
    """A composed YAML node → python value, recording the line of every key."""
    lines[key] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = {}
        for k, v in node.value:
            name = str(k.value)
            sub = f"{key}.{name}" if key else name
            if name in out:
                raise ConfigError(f"{path}, line {k.start_mark.line + 1}: duplicate key {sub!r}")
            lines[sub] = k.start_mark.line + 1
            out[name] = _convert(v, path, sub, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(v, path, f"{key}[{i}]", lines) for i, v in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def _check_keys(values: dict, schema: dict, path: Path, prefix: str, lines: dict) -> dict:
    out = {}
    for k, v in values.items():
        dotted = f"{prefix}{k}"
        line = lines.get(dotted)
        if k not in schema:
            close = difflib.get_close_matches(k, schema, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(schema)
            raise ConfigError(f"{path}, line {line}: unknown key {dotted!r}{hint}; known keys: {known}")
        types, _, parse = (*schema[k], None)[:3]
        if parse and isinstance(v, str) and str not in types:  # e.g. weight_decay: auto
            try:
                v = parse(v)
            except ValueError as e:
                raise ConfigError(f"{path}, line {line}: {dotted}: {v!r}: {e}") from None
        if not type_ok(v, types):
            raise ConfigError(f"{path}, line {line}: {dotted} must be {type_names(types)}, "
                              f"got {type(v).__name__} {v!r}")
        check_key(dotted, v, f"{path}, line {line}: {dotted}")
        out[k] = v
    for k, spec in schema.items():
        out.setdefault(k, spec[1])
    return out


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """Parse and validate a pipeline file; every mistake is one ConfigError naming key and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}: a pipeline file is a mapping of keys (data, backbones, ...)")
    lines: dict[str, int] = {}
    try:
        raw = _convert(root, path, "", lines)
    except RecursionError:
        raise ConfigError(f"{path}: a YAML alias refers to itself (e.g. `a: &x [*x]`); "
                          "pipeline values cannot be recursive") from None
    top = _check_keys(raw, _TOP_KEYS, path, "", lines)
    for required in ("data", "backbones"):
        if top[required] is None:
            raise ConfigError(f"{path}: missing required key {required!r}")
    name = top["name"] or path.stem
    if top["weights"] not in ("hub", "none"):
        raise ConfigError(f"{path}, line {lines['weights']}: weights must be hub or none "
                          f"(per backbone: weights_file), got {top['weights']!r}")
    backbones = []
    for i, b in enumerate(top["backbones"]):
        key = f"backbones[{i}]"
        if isinstance(b, str):
            b = {"name": b}
        if not isinstance(b, dict):
            raise ConfigError(f"{path}, line {lines[key]}: {key} must be a model name or a mapping "
                              f"with {', '.join(_BACKBONE_KEYS)}")
        b = _check_keys(b, _BACKBONE_KEYS, path, f"{key}.", lines)
        if not b["name"]:
            raise ConfigError(f"{path}, line {lines[key]}: {key} needs a name")
        weights = b["weights"] or ("file" if b["weights_file"] else top["weights"])
        if weights not in ("hub", "none", "file"):
            raise ConfigError(f"{path}, line {lines.get(key + '.weights')}: {key}.weights must be hub, "
                              f"none or file, got {weights!r}")
        if weights == "file" and not b["weights_file"]:
            raise ConfigError(f"{path}, line {lines[key]}: {key}: weights file needs weights_file: PATH")
        data_config = b["data_config"]
        if data_config is not None:
            from .backbones import check_data_config, parse_data_config
            what = f"{path}, line {lines.get(key + '.data_config')}: {key}.data_config"
            data_config = (parse_data_config(data_config, what) if isinstance(data_config, str)
                           else check_data_config(data_config, what))
        backbones.append(BackboneEntry(b["name"], weights, b["weights_file"], b["input_size"], b["model"],
                                       data_config))
    if not backbones:
        raise ConfigError(f"{path}, line {lines['backbones']}: backbones is empty")
    stages: dict[str, Any] = {}
    cache = top["cache"] or f"cache/{name}.h5"
    out = top["out"] or f"runs/{name}"
    shared = {"data": top["data"], "cache": cache, "out": out, "weights": top["weights"], "seed": top["seed"],
              "report": top["report"], "backbones": [b.name for b in backbones],
              "weights_file": {b.name: b.weights_file for b in backbones if b.weights_file},
              "data_config": {b.name: b.data_config for b in backbones if b.data_config}}
    for stage in _SECTIONS:
        v = top[stage]
        on = v is not False and not (v is None and stage in _OPTIONAL_STAGES)
        if not on:
            stages[stage] = None
            continue
        values = _check_keys(v if isinstance(v, dict) else {}, _schema(STAGES[stage]), path, f"{stage}.", lines)
        stages[stage] = _stage_config(stage, values, shared)
    p = Pipeline(path=path, name=name, data=top["data"], cache=cache, out=out, seed=top["seed"],
                 backbones=backbones, stages=stages, report=top["report"], lines=lines)
    _check_values(p)
    _check_names(p)
    return p


def _stage_config(stage: str, values: dict, shared: dict):
    """A stage's config object: its section's values, the top-level keys it shares, and
    placeholders for what the pipeline wires from an earlier stage (set when that stage ran)."""
    kwargs = dict(values)
    for s in settings(STAGES[stage]):
        place, key = s.yaml_place
        if place in ("top", "backbone"):
            kwargs[s.name] = shared[key]
        elif place == "wired":
            kwargs[s.name] = ""
    return STAGES[stage](**kwargs)


def _check_values(p: Pipeline) -> None:
    """Every section value against its field's choices and bounds (registries read now)."""
    for stage, cfg in p.stages.items():
        if cfg is None:
            continue
        for s in settings(type(cfg)):
            bad = s.yaml_place[0] == "section" and problem(s, getattr(cfg, s.name))
            if bad:
                index, message = bad
                raise p.error(f"{stage}.{s.name}" + (f"[{index}]" if index is not None else ""), message)


def _check_names(p: Pipeline) -> None:
    """Unknown models and rules across keys fail here, before any stage runs.

    Backbone names are checked against timm's model names read from its sources
    (featstack.timm_names): this imports neither torch nor timm.
    """
    for i, b in enumerate(p.backbones):
        try:
            b.spec(p.seed)
        except FeatstackError as e:
            raise p.error(f"backbones[{i}]", str(e)) from None
    names = [b.name for b in p.backbones]
    if len(set(names)) != len(names):
        raise p.error("backbones", f"a backbone is listed twice: {names}")

    def backbones_ok(key: str, keys: list | None) -> None:
        for j, k in enumerate(keys or []):
            if k not in names:
                raise p.error(f"{key}[{j}]", f"backbone {k!r} is not among the pipeline's backbones {names}")

    if p.stages["extract"] is None:
        raise p.error("extract", "the extract stage cannot be switched off: every later stage reads the cache")
    bench = p.stages["bench"]
    if bench is not None:
        backbones_ok("bench.backbones", bench.backbones)
    train = p.stages["train"]
    if train is not None:
        if train.model == "named" or ("train.head" in p.lines and train.head):
            train.model = "named"
            for k in ("backbones", "head"):
                if not getattr(train, k) or f"train.{k}" not in p.lines:
                    raise p.error(f"train.{k}", "a named model needs backbones and head (fusion: single for one "
                                                     "backbone, concat otherwise)")
            train.fusion = default_fusion(train)
            backbones_ok("train.backbones", train.backbones)
        elif bench is None:
            raise p.error("train.model", "model: best needs the bench stage (or name the model)")
    ft = p.stages["finetune"]
    if ft is not None:
        if p.stages["export"] is None:
            raise p.error("finetune", "fine-tuning starts from the exported network: add an export section")
        freeze = ft.freeze
        if not (freeze in ("head-only", "none") or (freeze.startswith("top-") and freeze[4:].isdigit())):
            raise p.error("finetune.freeze", f"{freeze!r}: use head-only, top-N or none")


# ----------------------------------------------------------------------------------------------
# running


@dataclass
class PipelineResult:
    """What ``run_pipeline`` did: stage → "ran" / "skipped" / "off", and where things are."""

    stages: dict[str, str] = field(default_factory=dict)
    cache: str = ""
    out: str = ""
    model: str | None = None
    network: str | None = None
    report: str | None = None
    best: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _say(msg: str) -> None:
    print(f"featstack run: {msg}", file=sys.stderr, flush=True)


def _cached_backbone_valid(cache, spec, ex: ExtractConfig, dataset_fp: str) -> bool:
    """True when the cache already holds this exact backbone, complete, for this dataset.

    Weights from a file count as unchanged when the file's sha256 is the one recorded at
    extraction (else they are re-checked by loading); hub and seeded random-init weights are
    named exactly by the spec.
    """
    from .backbones import BackboneSpec
    from .checkpoints import sha256_file
    if spec.key not in cache.backbones or cache.dataset_fingerprint != dataset_fp:
        return False
    from .cache import SETTING_FINGERPRINT_FIELDS
    meta = cache.backbone_info(spec.key)
    if spec.weights == "file" and meta.get("weights_file_sha256") != sha256_file(spec.weights_file):
        return False
    cached = meta.get("spec")
    # every fingerprint field an extraction setting decides, unless left to "auto" (decided
    # by the machine extraction runs on)
    settings = [f for f in SETTING_FINGERPRINT_FIELDS if getattr(ex, f, "auto") != "auto"]
    return (isinstance(cached, dict) and BackboneSpec.from_dict(cached).as_dict() == spec.as_dict()
            and all(meta.get(f) == getattr(ex, f) for f in settings))


def _inputs_changed(cache_path, source) -> bool:
    """Whether input files changed since their rows were extracted (stats only, nothing read)."""
    from .cache import CacheWriter

    return bool(CacheWriter(cache_path, source.samples).input_changes()[1])


def _stage_extract(p: Pipeline, res: PipelineResult) -> None:
    from .cache import open_cache
    from .data import open_source

    ex = p.stages["extract"]
    source = open_source(p.data)
    specs = [b.spec(p.seed, ex.input_size) for b in p.backbones]
    todo = specs
    if Path(p.cache).exists():
        try:
            cache = open_cache(p.cache)
            fp = source.samples.fingerprint()
            todo = [s for s in specs if not _cached_backbone_valid(cache, s, ex, fp)]
            if _inputs_changed(p.cache, source):
                todo = specs  # refresh (the default here) re-extracts their rows for every backbone
        except FeatstackError:
            todo = specs
    if not todo:
        res.stages["extract"] = "skipped"
        _say(f"extract: skipped, {p.cache} already holds {', '.join(s.key for s in specs)} for this dataset")
        return
    from .extract import extract  # torch: only when something is extracted

    Path(p.cache).parent.mkdir(parents=True, exist_ok=True)
    # the specs carry the backbone settings (weights, weights files, input size, seed); changed
    # inputs are always refreshed here
    extract(source, todo, p.cache, **api_kwargs(ex, skip=(*_SPEC_FIELDS, "refresh")), refresh=True)
    res.stages["extract"] = "ran"


_SPEC_FIELDS = ("data", "backbones", "cache", "weights", "weights_file", "data_config", "input_size", "seed")


def _stamp_matches(path: Path, stamp: dict) -> bool:
    try:
        return json.loads(path.read_text()).get("stamp") == stamp
    except (OSError, ValueError):
        return False


def _write_stamp(path: Path, stamp: dict) -> None:
    """Record the settings + fingerprints a stage's output was made from (see _stamp_matches)."""
    path.write_text(json.dumps({"stamp": stamp}, indent=1))


def _fingerprints(cache, keys) -> dict:
    return {k: cache.backbone_info(k).get("fingerprint") for k in keys}


# what decides the bench's numbers (not: where it runs, how many workers, what is printed)
_BENCH_STAMPED = ("heads", "fusions", "backbones", "max_size", "cv", "seed", "tune")


def _stage_bench(p: Pipeline, res: PipelineResult, cache) -> list[dict]:
    from .bench import run_bench

    b = p.stages["bench"]
    keys = b.backbones or [x.name for x in p.backbones]
    stamp = {"settings": {k: getattr(b, k) for k in _BENCH_STAMPED},
             "backbones": keys, "fingerprints": _fingerprints(cache, keys), "dataset": cache.dataset_fingerprint}
    out = Path(p.out)
    stamp_file = out / "bench.stamp.json"
    if _stamp_matches(stamp_file, stamp) and (out / "bench.json").exists():
        res.stages["bench"] = "skipped"
        _say(f"bench: skipped, {out}/results.csv is up to date")
        return json.loads((out / "bench.json").read_text())["rows"]
    result = run_bench(cache, **dict(api_kwargs(b, skip=("cache", "out")), backbones=keys), out=out)
    _write_stamp(stamp_file, stamp)
    res.stages["bench"] = "ran"
    return result.rows


def _choose_model(p: Pipeline, rows: list[dict] | None) -> tuple[list[str], str, str]:
    t = p.stages["train"]
    if t.model == "named":
        return list(t.backbones), t.head, default_fusion(t)
    metric = t.metric
    if not rows:
        raise p.error("train.model", "the bench produced no results to choose from")
    if metric not in rows[0]:
        raise p.error("train.metric", f"{metric!r} is not a bench column ({', '.join(rows[0])})")
    from .models import best_model
    try:
        return best_model(rows, metric)
    except FeatstackError as e:
        raise p.error("train.metric", str(e)) from None


def _train_config(p: Pipeline):
    """The train stage's settings. A model picked from the bench (``model: best``) is trained
    with the bench's ``cv`` and ``tune`` unless the YAML sets them under ``train:``: the saved
    model is then the very refit the bench scored on the test split (the demo's model reported
    test 0.9667 beside the bench's 0.9711 for the same configuration: 5 inner folds, not 3)."""
    import dataclasses

    t, b = p.stages["train"], p.stages.get("bench")
    if t.model != "best" or b is None:
        return t
    inherit = {k: getattr(b, k) for k in ("cv", "tune") if f"train.{k}" not in p.lines}
    return dataclasses.replace(t, **inherit)


def _stage_train(p: Pipeline, res: PipelineResult, cache, rows) -> Path:
    from .models import load_model, train_model

    t = _train_config(p)
    backbones, head, fusion = _choose_model(p, rows)
    out = Path(t.out or f"models/{p.name}")
    stamp = {"backbones": backbones, "head": head, "fusion": fusion, "tune": t.tune, "cv": t.cv,
             "seed": t.seed, "fingerprints": _fingerprints(cache, backbones), "dataset": cache.dataset_fingerprint}
    res.best = {"backbones": "+".join(backbones), "head": head, "fusion": fusion}
    if _stamp_matches(out / "pipeline.stamp.json", stamp):
        try:  # the saved model must still accept this cache (fingerprints), else retrain
            load_model(out).check_cache(cache)
            res.stages["train"] = "skipped"
            _say(f"train: skipped, {out} is up to date")
            return out
        except FeatstackError:
            pass
    _say(f"train: {'+'.join(backbones)} / {head} / {fusion} → {out}")
    train_model(cache, **dict(api_kwargs(t, skip=("cache",)), backbones=backbones, head=head, fusion=fusion,
                              out=out))
    _write_stamp(out / "pipeline.stamp.json", stamp)
    res.stages["train"] = "ran"
    return out


def _stage_export(p: Pipeline, res: PipelineResult, model_dir: Path) -> Path:
    e = p.stages["export"]
    out = Path(e.out or f"nets/{p.name}")
    stamp = {"model": json.loads((model_dir / "model.json").read_text()), "onnx": e.onnx}
    if e.head_dtype != "float64":  # (stamps written before head_dtype existed stay valid)
        stamp["head_dtype"] = e.head_dtype
    if _stamp_matches(out / "pipeline.stamp.json", stamp) and (out / "network.json").exists():
        res.stages["export"] = "skipped"
        _say(f"export: skipped, {out} is up to date")
        return out
    from .export import export_model  # torch: only when the network is (re)built

    export_model(**dict(api_kwargs(e), model_dir=model_dir, out_dir=out))
    _write_stamp(out / "pipeline.stamp.json", stamp)
    res.stages["export"] = "ran"
    return out


#: finetune settings that do not change the network it produces (left out of its stamp)
_FINETUNE_UNSTAMPED = ("progress", "workers", "out")


def _stage_finetune(p: Pipeline, res: PipelineResult, net_dir: Path) -> Path:
    """Fine-tune the exported network, unless ``out`` was fine-tuned from the same network
    (tensors hash), the same data (the source's fingerprint) and the same settings."""
    from .data import open_source

    f = p.stages["finetune"]
    out = Path(f.out or f"{net_dir}-ft")
    data = f.data or p.data
    kwargs = dict(api_kwargs(f), network=net_dir, data=data, out=out, lr=float(f.lr),
                  backbone_lr_scale=float(f.backbone_lr_scale))
    stamp = {"settings": {k: v for k, v in kwargs.items() if k not in _FINETUNE_UNSTAMPED + ("network", "data")},
             "network": json.loads((net_dir / "network.json").read_text()).get("tensors_sha256"),
             "data": open_source(data).samples.fingerprint()}
    stamp = json.loads(json.dumps(stamp, default=str))
    if (_stamp_matches(out / "pipeline.stamp.json", stamp) and (out / "network.json").exists()
            and (out / "history.json").exists()):
        res.stages["finetune"] = "skipped"
        _say(f"finetune skipped: {out} is up to date")
        return out
    from .finetune import finetune  # torch: only when the network is trained

    finetune(**kwargs)
    _write_stamp(out / "pipeline.stamp.json", stamp)
    res.stages["finetune"] = "ran"
    return out


def run_pipeline(path: str | os.PathLike) -> PipelineResult:
    """Validate the file, then run (or skip) every stage it names, in order."""
    from .cache import open_cache

    p = load_pipeline(path)
    res = PipelineResult(cache=p.cache, out=p.out)
    Path(p.out).mkdir(parents=True, exist_ok=True)

    def timed(stage, fn, *args):
        t0 = time.perf_counter()
        value = fn(*args)
        res.seconds[stage] = round(time.perf_counter() - t0, 2)
        return value

    timed("extract", _stage_extract, p, res)
    cache = open_cache(p.cache)
    rows = timed("bench", _stage_bench, p, res, cache) if p.stages["bench"] is not None else None
    model_dir = timed("train", _stage_train, p, res, cache, rows) if p.stages["train"] is not None else None
    if model_dir is not None:
        res.model = str(model_dir)
    if p.stages["export"] is not None and model_dir is not None:
        res.network = str(timed("export", _stage_export, p, res, model_dir))
    if p.stages["finetune"] is not None and res.network:
        res.network = str(timed("finetune", _stage_finetune, p, res, Path(res.network)))
    for stage in ("bench", "train", "export", "finetune"):
        res.stages.setdefault(stage, "off")
    if p.report:
        from .report import write_report
        res.report = str(timed("report", write_report, p, res, cache, rows))
        res.stages["report"] = "ran"
    else:
        res.stages["report"] = "off"
    return res
