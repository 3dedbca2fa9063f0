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
from .errors import ConfigError, FeatstackError

# key → (allowed python types, default).  A dict value is a nested section.
_EXTRACT_KEYS = {
    "batch_size": ((int,), 64), "workers": ((int, type(None)), None), "device": ((str,), "auto"),
    "precision": ((str,), "auto"), "preprocess": ((str,), "fast"), "dtype": ((str,), "float16"),
    "shard_rows": ((int,), 1024), "input_size": ((int, type(None)), None), "overwrite": ((bool,), False),
    "progress": ((bool,), True),
}
_BENCH_KEYS = {
    "heads": ((list,), ["logreg", "linear-svm", "svm-rbf", "gaussian-nb"]),
    "fusions": ((list,), ["single", "concat", "vote", "stack"]),
    "backbones": ((list, type(None)), None), "max_size": ((int,), 3), "cv": ((int,), 5),
    "n_jobs": ((int,), 1), "tune": ((bool,), False), "seed": ((int,), 0),
    "backend": ((str, type(None)), None), "scheduler": ((str, type(None)), None),
}
_TRAIN_KEYS = {
    "model": ((str,), "best"), "metric": ((str,), "cv_accuracy_mean"),
    "backbones": ((list, type(None)), None), "head": ((str, type(None)), None),
    "fusion": ((str, type(None)), None), "tune": ((bool,), False), "cv": ((int,), 5),
    "seed": ((int,), 0), "out": ((str, type(None)), None),
}
_EXPORT_KEYS = {"out": ((str, type(None)), None), "onnx": ((bool,), False)}
_FINETUNE_KEYS = {
    "data": ((str, type(None)), None), "epochs": ((int,), 5), "freeze": ((str,), "top-2"),
    "lr": ((float, int), 1e-3), "backbone_lr_scale": ((float, int), 0.1), "batch_size": ((int,), 32),
    "device": ((str,), "auto"), "out": ((str, type(None)), None), "seed": ((int,), 0),
}
_BACKBONE_KEYS = {
    "name": ((str,), None), "weights": ((str,), None), "weights_file": ((str, type(None)), None),
    "input_size": ((int, type(None)), None),
}
_SECTIONS = {"extract": _EXTRACT_KEYS, "bench": _BENCH_KEYS, "train": _TRAIN_KEYS,
             "export": _EXPORT_KEYS, "finetune": _FINETUNE_KEYS}
_TOP_KEYS = {
    "name": ((str,), None), "data": ((str,), None), "cache": ((str, type(None)), None),
    "out": ((str, type(None)), None), "weights": ((str,), "hub"), "seed": ((int,), 0),
    "backbones": ((list,), None), "report": ((bool,), True),
    **{s: ((dict, bool, type(None)), None) for s in _SECTIONS},
}
_OPTIONAL_STAGES = {"export", "finetune"}  # run only when the file names them


@dataclass
class BackboneEntry:
    name: str
    weights: str
    weights_file: str | None = None
    input_size: int | None = None


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
    stages: dict[str, dict | None]  # stage → settings (None: stage off)
    report: bool
    lines: dict[str, int] = field(default_factory=dict)  # dotted key → line, for later errors

    def error(self, key: str, message: str) -> ConfigError:
        line = self.lines.get(key)
        where = f"{self.path}, line {line}" if line else str(self.path)
        return ConfigError(f"{where}: {key}: {message}")


def _type_names(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(names[t] for t in types)


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
        types, _ = schema[k]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok:
            raise ConfigError(f"{path}, line {line}: {dotted} must be {_type_names(types)}, "
                              f"got {type(v).__name__} {v!r}")
        check_key(dotted, v, f"{path}, line {line}: {dotted}")
        out[k] = v
    for k, (_, default) in schema.items():
        out.setdefault(k, default)
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
                              f"with name, weights, weights_file, input_size")
        b = _check_keys(b, _BACKBONE_KEYS, path, f"{key}.", lines)
        if not b["name"]:
            raise ConfigError(f"{path}, line {lines[key]}: {key} needs a name")
        weights = b["weights"] or ("file" if b["weights_file"] else top["weights"])
        if weights not in ("hub", "none", "file"):
            raise ConfigError(f"{path}, line {lines.get(key + '.weights')}: {key}.weights must be hub, "
                              f"none or file, got {weights!r}")
        if weights == "file" and not b["weights_file"]:
            raise ConfigError(f"{path}, line {lines[key]}: {key}: weights file needs weights_file: PATH")
        backbones.append(BackboneEntry(b["name"], weights, b["weights_file"], b["input_size"]))
    if not backbones:
        raise ConfigError(f"{path}, line {lines['backbones']}: backbones is empty")
    stages: dict[str, dict | None] = {}
    for stage, schema in _SECTIONS.items():
        v = top[stage]
        on = v is not False and not (v is None and stage in _OPTIONAL_STAGES)
        stages[stage] = _check_keys(v if isinstance(v, dict) else {}, schema, path, f"{stage}.", lines) \
            if on else None
    p = Pipeline(path=path, name=name, data=top["data"], cache=top["cache"] or f"cache/{name}.h5",
                 out=top["out"] or f"runs/{name}", seed=top["seed"], backbones=backbones, stages=stages,
                 report=top["report"], lines=lines)
    _check_names(p)
    return p


def _check_names(p: Pipeline) -> None:
    """Unknown models, heads, fusions and choices fail here, before any stage runs."""
    from .backbones import resolve_backbone
    from .fusion import FUSIONS
    from .heads import head_spec

    for i, b in enumerate(p.backbones):
        try:
            resolve_backbone(b.name, weights=b.weights if b.weights != "file" else "hub",
                             weights_file=b.weights_file, input_size=b.input_size, seed=p.seed)
        except FeatstackError as e:
            raise p.error(f"backbones[{i}]", str(e)) from None
    names = [b.name for b in p.backbones]
    if len(set(names)) != len(names):
        raise p.error("backbones", f"a backbone is listed twice: {names}")

    def heads_ok(key: str, heads: list) -> None:
        for j, h in enumerate(heads):
            try:
                head_spec(h)
            except FeatstackError as e:
                raise p.error(f"{key}[{j}]", str(e)) from None

    def fusions_ok(key: str, fusions: list) -> None:
        for j, f in enumerate(fusions):
            if f not in FUSIONS:
                close = difflib.get_close_matches(str(f), FUSIONS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise p.error(f"{key}[{j}]", f"unknown fusion {f!r}{hint}; known: {', '.join(FUSIONS)}")

    def backbones_ok(key: str, keys: list | None) -> None:
        for j, k in enumerate(keys or []):
            if k not in names:
                raise p.error(f"{key}[{j}]", f"backbone {k!r} is not among the pipeline's backbones {names}")

    choices = {"extract.precision": ("auto", "fp32", "bf16", "fp16"), "extract.preprocess": ("fast", "reference"),
               "extract.dtype": ("float16", "float32")}
    ex = p.stages["extract"]
    if ex is None:
        raise p.error("extract", "the extract stage cannot be switched off: every later stage reads the cache")
    for dotted, allowed in choices.items():
        v = ex[dotted.split(".")[1]]
        if v not in allowed:
            raise p.error(dotted, f"{v!r} is not one of {', '.join(allowed)}")
    bench = p.stages["bench"]
    if bench is not None:
        heads_ok("bench.heads", bench["heads"])
        fusions_ok("bench.fusions", bench["fusions"])
        backbones_ok("bench.backbones", bench["backbones"])
        if bench["max_size"] < 1 or bench["cv"] < 2:
            raise p.error("bench", "max_size must be >= 1 and cv >= 2")
        if bench["backend"] not in (None, "loky", "threading", "dask"):
            raise p.error("bench.backend", f"{bench['backend']!r}: use loky, threading or dask")
    train = p.stages["train"]
    if train is not None:
        if train["model"] not in ("best", "named"):
            raise p.error("train.model", f"{train['model']!r}: use best (from the bench) or named "
                                         "(with train.backbones, train.head, train.fusion)")
        if train["model"] == "named" or train["head"]:
            train["model"] = "named"
            for k in ("backbones", "head", "fusion"):
                if not train[k]:
                    raise p.error(f"train.{k}", "a named model needs backbones, head and fusion")
            heads_ok("train.head", [train["head"]])
            fusions_ok("train.fusion", [train["fusion"]])
            backbones_ok("train.backbones", train["backbones"])
        elif bench is None:
            raise p.error("train.model", "model: best needs the bench stage (or name the model)")
    ft = p.stages["finetune"]
    if ft is not None:
        if p.stages["export"] is None:
            raise p.error("finetune", "fine-tuning starts from the exported network: add an export section")
        freeze = ft["freeze"]
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


def _spec(p: Pipeline, b: BackboneEntry, input_size: int | None):
    from .backbones import resolve_backbone
    return resolve_backbone(b.name, weights=b.weights if b.weights != "file" else "hub",
                            weights_file=b.weights_file, input_size=b.input_size or input_size, seed=p.seed)


def _cached_backbone_valid(cache, spec, ex: dict, dataset_fp: str) -> bool:
    """True when the cache already holds this exact backbone, complete, for this dataset.

    Weights from a file are always re-checked by loading (the file may have changed in place);
    hub and seeded random-init weights are named exactly by the spec.
    """
    from dataclasses import asdict
    if spec.weights == "file" or spec.key not in cache.backbones or cache.dataset_fingerprint != dataset_fp:
        return False
    meta = cache.backbone_info(spec.key)
    return (meta.get("spec") == json.loads(json.dumps(asdict(spec)))
            and meta.get("preprocess") == ex["preprocess"] and meta.get("dtype") == ex["dtype"])


def _inputs_changed(cache_path, source) -> bool:
    """Whether input files changed since their rows were extracted (stats only, nothing read)."""
    from .cache import CacheWriter

    return bool(CacheWriter(cache_path, source.samples).input_changes()[1])


def _stage_extract(p: Pipeline, res: PipelineResult) -> None:
    from .cache import open_cache
    from .data import open_source
    from .extract import extract

    ex = p.stages["extract"]
    source = open_source(p.data)
    specs = [_spec(p, b, ex["input_size"]) for b in p.backbones]
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
    Path(p.cache).parent.mkdir(parents=True, exist_ok=True)
    extract(source, todo, p.cache, device=ex["device"], precision=ex["precision"],
            batch_size=ex["batch_size"], workers=ex["workers"], preprocess=ex["preprocess"],
            dtype=ex["dtype"], shard_rows=ex["shard_rows"], overwrite=ex["overwrite"],
            refresh=True, progress=ex["progress"])
    res.stages["extract"] = "ran"


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


def _stage_bench(p: Pipeline, res: PipelineResult, cache) -> list[dict]:
    from .bench import run_bench

    b = p.stages["bench"]
    keys = b["backbones"] or [x.name for x in p.backbones]
    stamp = {"settings": {k: v for k, v in b.items() if k not in ("n_jobs", "backend", "scheduler")},
             "backbones": keys, "fingerprints": _fingerprints(cache, keys), "dataset": cache.dataset_fingerprint}
    out = Path(p.out)
    stamp_file = out / "bench.stamp.json"
    if _stamp_matches(stamp_file, stamp) and (out / "bench.json").exists():
        res.stages["bench"] = "skipped"
        _say(f"bench: skipped, {out}/results.csv is up to date")
        return json.loads((out / "bench.json").read_text())["rows"]
    result = run_bench(cache, heads=b["heads"], fusions=b["fusions"], backbones=keys, max_size=b["max_size"],
                       cv=b["cv"], n_jobs=b["n_jobs"], random_state=b["seed"], tune=b["tune"], out=out,
                       backend=b["backend"], scheduler=b["scheduler"])
    _write_stamp(stamp_file, stamp)
    res.stages["bench"] = "ran"
    return result.rows


def _choose_model(p: Pipeline, rows: list[dict] | None) -> tuple[list[str], str, str]:
    t = p.stages["train"]
    if t["model"] == "named":
        return list(t["backbones"]), t["head"], t["fusion"]
    metric = t["metric"]
    if not rows:
        raise p.error("train.model", "the bench produced no results to choose from")
    if metric not in rows[0]:
        raise p.error("train.metric", f"{metric!r} is not a bench column ({', '.join(rows[0])})")
    best = max(rows, key=lambda r: (float(r[metric]), -int(r.get("size", 1))))
    return str(best["backbones"]).split("+"), str(best["head"]), str(best["fusion"])


def _stage_train(p: Pipeline, res: PipelineResult, cache, rows) -> Path:
    from .models import load_model, train_model

    t = p.stages["train"]
    backbones, head, fusion = _choose_model(p, rows)
    out = Path(t["out"] or f"models/{p.name}")
    stamp = {"backbones": backbones, "head": head, "fusion": fusion, "tune": t["tune"], "cv": t["cv"],
             "seed": t["seed"], "fingerprints": _fingerprints(cache, backbones), "dataset": cache.dataset_fingerprint}
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
    train_model(cache, backbones, head, fusion, out=out, tune=t["tune"], cv=t["cv"], random_state=t["seed"])
    _write_stamp(out / "pipeline.stamp.json", stamp)
    res.stages["train"] = "ran"
    return out


def _stage_export(p: Pipeline, res: PipelineResult, model_dir: Path) -> Path:
    from .export import export_model

    e = p.stages["export"]
    out = Path(e["out"] or f"nets/{p.name}")
    stamp = {"model": json.loads((model_dir / "model.json").read_text()), "onnx": e["onnx"]}
    if _stamp_matches(out / "pipeline.stamp.json", stamp) and (out / "network.json").exists():
        res.stages["export"] = "skipped"
        _say(f"export: skipped, {out} is up to date")
        return out
    kwargs = {"onnx": True} if e["onnx"] else {}
    export_model(model_dir, out, cache=p.cache, **kwargs)
    _write_stamp(out / "pipeline.stamp.json", stamp)
    res.stages["export"] = "ran"
    return out


def _stage_finetune(p: Pipeline, res: PipelineResult, net_dir: Path) -> Path:
    from .finetune import finetune

    f = p.stages["finetune"]
    out = Path(f["out"] or f"{net_dir}-ft")
    finetune(net_dir, data=f["data"] or p.data, out=out, epochs=f["epochs"], freeze=f["freeze"],
             lr=float(f["lr"]), backbone_lr_scale=float(f["backbone_lr_scale"]), batch_size=f["batch_size"],
             device=f["device"], seed=f["seed"])
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
