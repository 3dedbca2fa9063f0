"""The report of a bench or a run: ``DIR/report.html`` (self-contained: images as data URIs, so it
can be mailed as one file) and ``DIR/report.md``.

Written by `featstack bench --out DIR`, by `featstack run` (which adds the extraction, model and
network sections), and rebuilt from the folder alone by `featstack report DIR`: everything it
shows is read from files (``bench.json``, the cache, the saved model, the network's
``history.json``), and ``report.json`` remembers where they are.

What a reader wants, in order: can I trust these numbers (a banner when a backbone has random
weights), what won and by how much (ranked table with the uncertainty of each mean, ties marked),
what it costs, whether combining backbones paid, how the classes sit in each embedding, which test
images the chosen model gets wrong, how fine-tuning went, and what to do next.

CPU side: never imports torch.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPORT_JSON = "report.json"
MAX_TABLE_ROWS = 15
MAX_MAP_POINTS = 1500
MAX_THUMBNAILS = 24


# --------------------------------------------------------------------------------------------
# Content model: sections of blocks, rendered to HTML and Markdown
# --------------------------------------------------------------------------------------------

@dataclass
class Table:
    header: list
    rows: list
    numeric: set = field(default_factory=set)   # column indices aligned right
    marked: set = field(default_factory=set)    # row indices highlighted (ties)


@dataclass
class Figure:
    caption: str
    path: Path


@dataclass
class Thumbs:
    items: list   # (PNG bytes, caption)


@dataclass
class Section:
    title: str
    blocks: list


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _open_cache(path):
    from .cache import open_cache

    if not path or not Path(path).exists():
        return None
    try:
        return open_cache(path)
    except Exception:  # noqa: BLE001 - a report shows what it can; the cache section says it is missing
        return None


def bench_rows(bench: dict) -> list[dict]:
    """The bench rows in the bench's rank order (featstack.bench.rank_rows: standard errors,
    ties and the pick are the bench's columns). A bench.json written before the tie rule gets
    them here, from its per-fold scores, by the same functions."""
    rows = [dict(r) for r in bench.get("rows", [])]
    if not rows or "tied_with_best" in rows[0]:
        return rows
    from .bench import rank_rows, standard_error

    folds = {(f["backbones"], f["head"], f["fusion"]): f for f in bench.get("folds", [])}
    for r in rows:
        f = folds.get((r["backbones"], r["head"], r["fusion"]), {})
        for name in ("accuracy", "f1_macro"):
            if name in f:
                r[f"cv_{name}_folds"], r[f"cv_{name}_se"] = f[name], standard_error(f[name])
    return rank_rows(rows)


def scored_rows(rows: list[dict]) -> list[dict]:
    """The rows with a CV score (a failed cell is listed in the ranking table only)."""
    return [r for r in rows if r.get("cv_accuracy_mean") is not None]


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

def random_init_banner(cache) -> str | None:
    """The warning a reader must see first: backbones without pretrained weights."""
    if cache is None:
        return None
    keys = [b["key"] for b in cache.summary()["backbones"] if _is_random(b)]
    if not keys:
        return None
    return (f"Random-init backbone{'s' if len(keys) > 1 else ''}: {', '.join(keys)} "
            f"{'have' if len(keys) > 1 else 'has'} random weights (--weights none), not pretrained ones. "
            "Their scores say nothing about transfer learning; use them for smoke tests only.")


def _is_random(b: dict) -> bool:
    return bool(b.get("random_init")) or str(b.get("weights")) == "none"


def pretrained_vs_random(cache, rows: list[dict]) -> Table | None:
    """One line per backbone: pretrained or RANDOM INIT beside its best single-backbone scores, so
    pretrained features and a random-init control read side by side (None without a random one)."""
    backbones = cache.summary()["backbones"]
    if not any(_is_random(b) for b in backbones):
        return None
    single = [r for r in rows if r.get("fusion") == "single"]
    out = []
    for b in sorted(backbones, key=_is_random):
        best = max((r for r in single if r.get("backbones") == b["key"]),
                   key=lambda r: r["cv_accuracy_mean"], default={})
        out.append([b["key"], str(b["timm_name"]), "RANDOM INIT" if _is_random(b) else "pretrained",
                    str(best.get("head", "–")), _fmt(best.get("cv_accuracy_mean")), _fmt(best.get("test_accuracy"))])
    return Table(["Backbone", "timm model", "Weights", "Best head", "CV accuracy", "Test accuracy"], out,
                 numeric={4, 5})


def _dataset_section(cache, ctx: dict) -> Section:
    s = cache.summary()
    split_names = [k for k, v in s["splits"].items() if v]
    per_split = []
    for i, c in enumerate(s["classes"][:30]):
        mask = cache.labels == i
        per_split.append([c] + [str(int(np.sum(mask & (cache.splits == sp)))) for sp in split_names])
    rows = [["Samples", str(s["n_samples"])],
            ["Splits", ", ".join(f"{k} {v}" for k, v in s["splits"].items() if v)],
            ["Classes", str(len(s["classes"]))],
            ["Decode errors", str(s["n_errors"])]]
    if ctx.get("data"):
        rows.append(["Source", str(ctx["data"])])
    rows.append(["Cache", str(cache.path)])
    blocks: list = [Table(["", ""], rows)]
    if per_split:
        more = len(s["classes"]) - len(per_split)
        blocks.append(Table(["Class"] + [f"{sp} images" for sp in split_names], per_split,
                            numeric=set(range(1, 1 + len(split_names)))))
        if more > 0:
            blocks.append(f"... and {more} more classes.")
    return Section("Dataset", blocks)


def weights_label(weights: str) -> str:
    """A weights source short enough for a table cell: a file by its name (and the installed
    package that ships it), not by a 120-character site-packages path; `featstack info` has it whole."""
    if not weights.startswith("file:"):
        return weights
    path = Path(weights[len("file:"):])
    parts = path.parts
    if "site-packages" in parts and parts.index("site-packages") + 1 < len(parts) - 1:
        return f"{path.name} (package {parts[parts.index('site-packages') + 1]})"
    return f"file {path.name}"


def _backbone_section(cache, ctx: dict) -> Section:
    rows = []
    for b in cache.summary()["backbones"]:
        ips = b.get("images_per_second")
        info = cache.backbone_info(b["key"])
        size = (info.get("data_config") or {}).get("input_size")
        rows.append([b["key"], str(b["timm_name"]), str(b["dim"]),
                     "x".join(str(v) for v in size[1:]) if size else "–",
                     "random init" if _is_random(b) else weights_label(str(b["weights"])),
                     f"{ips:.1f}" if ips else "–"])
    blocks: list = [Table(["Backbone", "timm model", "Embedding size", "Input size", "Weights",
                           "Extraction (images/s)"], rows, numeric={2, 5})]
    stages = ctx.get("seconds") or {}
    if "extract" in stages:
        blocks.append(f"Extraction stage: {ctx.get('stages', {}).get('extract', 'ran')}, "
                      f"{_fmt(stages['extract'], 1)} s.")
    return Section("Backbones" if "extract" not in stages else "Extraction", blocks)


def _ranking_section(rows: list[dict], bench: dict, out: Path) -> Section:
    from . import plots
    from .bench import stack_folds_note

    s = bench.get("settings", {})
    k = s.get("cv", "?")
    intro = (f"{len(rows)} configurations (backbone combination x head x fusion), {k}-fold stratified "
             f"cross-validation on {bench.get('n_train', '?')} training images"
             + (f", test accuracy after a refit on all of them ({bench.get('n_test')} test images)."
                if bench.get("n_test") else ", no labelled test split.")
             + stack_folds_note(s)
             + " ± is the standard error of the CV mean (how precisely the mean is known); the spread is the "
               "standard deviation over folds (how much one fold varies).")
    ties = any("tied_with_best" in r for r in rows)
    if ties:
        intro += (" Rows marked tied are within noise of the best (within two standard errors of the paired "
                  "difference over the same folds); the pick, rank 1, is the cheapest of them (see the README's "
                  "tie rule).")
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        intro += f" {len(failed)} configuration{'s' if len(failed) > 1 else ''} failed to fit (listed last)."
    table_rows, marked = [], set()
    for i, r in enumerate(rows[:MAX_TABLE_ROWS]):
        se = r.get("cv_accuracy_se")
        table_rows.append([str(r.get("rank", i + 1)), r["backbones"].replace("+", " + "), r["head"], r["fusion"],
                           f"{_fmt(r['cv_accuracy_mean'])} ± {_fmt(se)}" if se is not None else _fmt(r["cv_accuracy_mean"]),
                           _fmt(r.get("cv_accuracy_std")), _fmt(r.get("cv_f1_macro_mean")),
                           _fmt(r.get("test_accuracy")), _fmt(r.get("fit_seconds"), 3)]
                          + (["tied" if r.get("tied_with_best") else ""] if ties else [])
                          + (["failed: " + str(r.get("error")) if r.get("status") == "failed" else ""]
                             if failed else []))
        if r.get("tied_with_best"):
            marked.add(i)
    header = ["#", "Backbones", "Head", "Fusion", "CV accuracy", "Spread (std)", "CV macro-F1", "Test accuracy",
              "Fit time (s)"] + (["Tied with best"] if ties else []) + (["Error"] if failed else [])
    blocks: list = [intro, Table(header, table_rows, numeric={0, 4, 5, 6, 7, 8}, marked=marked)]
    if len(rows) > MAX_TABLE_ROWS:
        blocks.append(f"{len(rows) - MAX_TABLE_ROWS} more rows in results.csv.")
    blocks.append(Figure("CV accuracy of the top configurations with error bars",
                         plots.ranking_errorbars(scored_rows(rows), out / "ranking.png")))
    for caption, name in (("Best CV accuracy by backbone combination and head", "heatmap.png"),
                          ("Best CV accuracy per number of backbones combined", "best_by_size.png")):
        if (out / name).exists():
            blocks.append(Figure(caption, out / name))
    return Section("Ranking", blocks)


def fusion_gains(rows: list[dict]) -> list[dict]:
    """Per head and fusion (over 2+ backbones): best CV accuracy minus the best single backbone's."""
    gains = []
    for h in dict.fromkeys(r["head"] for r in rows):
        single = [r["cv_accuracy_mean"] for r in rows if r["head"] == h and int(r["size"]) == 1]
        if not single:
            continue
        for fu in dict.fromkeys(r["fusion"] for r in rows if int(r["size"]) > 1):
            cand = [r for r in rows if r["head"] == h and r["fusion"] == fu and int(r["size"]) > 1]
            if cand:
                best = max(cand, key=lambda r: r["cv_accuracy_mean"])
                gains.append({"head": h, "fusion": fu, "backbones": best["backbones"],
                              "gain": best["cv_accuracy_mean"] - max(single)})
    return gains


def _cost_section(rows: list[dict], cache, out: Path) -> Section:
    from . import plots

    speeds = {}
    if cache is not None:
        speeds = {b["key"]: b.get("images_per_second") for b in cache.summary()["backbones"]}
    blocks: list = [Figure("Accuracy against cost: head fit time (left), backbone extraction speed (right)",
                           plots.accuracy_vs_cost(rows, speeds, out / "cost.png"))]
    gains = fusion_gains(rows)
    if gains:
        blocks.append(Table(["Head", "Fusion", "Best combination", "Gain over best single backbone"],
                            [[g["head"], g["fusion"], g["backbones"].replace("+", " + "), f"{g['gain']:+.4f}"]
                             for g in gains], numeric={3}))
        blocks.append(Figure("Gain of each fusion over the best single backbone",
                             plots.fusion_gain(gains, out / "fusion_gain.png")))
    return Section("Cost and fusion", blocks)


def _embedding_section(cache, out: Path) -> Section | None:
    """2-D PCA of each backbone's embeddings of the labelled rows, coloured by class."""
    from sklearn.decomposition import PCA

    from . import plots

    rows = cache.rows()
    if len(rows) < 3 or not cache.backbones:
        return None
    if len(rows) > MAX_MAP_POINTS:
        rows = np.sort(np.random.default_rng(0).choice(rows, MAX_MAP_POINTS, replace=False))
    maps = []
    for key in cache.backbones[:9]:
        X = cache.features([key], rows=rows, dtype=np.float32).astype(np.float64)
        X = X - X.mean(0)
        if not np.any(X):  # constant features: no direction to project on (PCA would divide 0 by 0)
            maps.append((f"{key} (constant features: nothing to map)", np.zeros((len(X), 2)), cache.labels[rows]))
            continue
        pca = PCA(n_components=2, random_state=0).fit(X)
        ev = pca.explained_variance_ratio_
        maps.append((f"{key} (PCA: {ev[0]:.0%} + {ev[1]:.0%} of variance)", pca.transform(X), cache.labels[rows]))
    fig = plots.embedding_maps(maps, cache.classes, out / "embeddings.png")
    return Section("Embeddings", [f"Each backbone's embeddings of {len(rows)} labelled images projected on their two "
                                  "principal components, coloured by class: classes already apart here are easy for "
                                  "a linear head.", Figure("2-D PCA map of each backbone's embeddings", fig)])


def _thumbnail(img: np.ndarray, side: int = 96) -> bytes:
    from PIL import Image

    im = Image.fromarray(img)
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _misclassified(cache, ids, true, pred, data) -> Thumbs | str:
    """Thumbnails of misclassified test images, read from the data source when it is known."""
    wrong = [(i, t, p) for i, t, p in zip(ids, true, pred) if t != p]
    if not wrong:
        return "Every test image is classified correctly."
    if not data:
        return (f"{len(wrong)} test images are misclassified; pass the data source (--data) to see them "
                "as thumbnails.")
    try:
        from .data import open_source

        source = open_source(data)
    except Exception as e:  # noqa: BLE001
        return f"{len(wrong)} test images are misclassified; the data source {data} cannot be opened ({e})."
    index = {sid: r for r, sid in enumerate(source.samples.ids)}
    items = []
    for sid, t, p in wrong[:MAX_THUMBNAILS]:
        if sid not in index:
            continue
        try:
            items.append((_thumbnail(source.load(index[sid])), f"{sid}: true {t}, predicted {p}"))
        except Exception:  # noqa: BLE001 - an unreadable image is left out of the gallery
            continue
    if not items:
        return f"{len(wrong)} test images are misclassified; none of them is in {data}."
    return Thumbs(items)


def _model_predictions(cache, model_dir: str | None, best: dict | None):
    """(model name, ids, true names, predicted names) on the labelled test rows: the saved model,
    else the bench's best configuration refitted on the training split."""
    from .models import labelled_rows, load_model, train_model

    rows = labelled_rows(cache, "test")
    if not len(rows):
        return None
    if model_dir and Path(model_dir).is_dir():
        saved = load_model(model_dir)
        name = f"saved model {model_dir}"
    elif best:
        saved = train_model(cache, best["backbones"].split("+"), best["head"], best["fusion"],
                            cv=int(best.get("cv") or 5))
        name = "best configuration (refitted on the training split)"
    else:
        return None
    pred = list(saved.predict_names(cache, rows=rows))
    true = list(np.asarray(cache.classes, dtype=object)[cache.labels[rows]])
    label = f"{saved.head} x {saved.fusion} over {' + '.join(saved.backbones)}"
    return f"{name}: {label}", list(cache.ids[rows]), true, pred


def _model_section(cache, ctx: dict, best: dict | None, out: Path) -> Section | None:
    from . import plots
    from .metrics import classification_metrics

    got = _model_predictions(cache, ctx.get("model"), best)
    if got is None:
        return None
    name, ids, true, pred = got
    m = classification_metrics(true, pred, cache.classes)
    idx = {c: i for i, c in enumerate(cache.classes)}
    yt, yp = [idx[t] for t in true], [idx[p] for p in pred]
    blocks: list = [f"{name}. Test accuracy {m['accuracy']:.4f}, macro-F1 {m['f1_macro']:.4f} on {m['n']} images.",
                    Figure("Confusion matrix on the test split", plots.confusion(yt, yp, cache.classes,
                                                                                out / "confusion.png")),
                    Figure("Per-class F1 on the test split", plots.per_class_f1(yt, yp, cache.classes,
                                                                               out / "per_class_f1.png")),
                    "Misclassified test images:",
                    _misclassified(cache, ids, true, pred, ctx.get("data"))]
    return Section("Model", blocks)


def _network_section(ctx: dict, out: Path) -> Section | None:
    from . import plots

    net = ctx.get("network")
    if not net or not Path(net).is_dir():
        return None
    hist = _read_json(Path(net) / "history.json")
    cfg = _read_json(Path(net) / "network.json") or {}
    if hist is None:
        meta = cfg.get("meta", {})
        return Section("Network", [f"Exported network {net} (not fine-tuned): test accuracy "
                                   f"{_fmt(meta.get('test_accuracy'))}, as the saved model's."])
    sel = hist.get("selected_epoch")
    h0 = hist["epochs"][0]
    hs = hist["epochs"][sel] if sel is not None else hist["epochs"][-1]
    text = (f"Fine-tuned network {net}: {hist.get('epochs') and len(hist['epochs']) - 1} epochs, freeze "
            f"{hist.get('freeze')}, lr {hist.get('lr')}, augment {hist.get('augment')}, weight decay "
            f"{_fmt(hist.get('weight_decay'), 4)}. Val accuracy {_fmt(h0['val_accuracy'])} before fine-tuning, "
            f"{_fmt(hs['val_accuracy'])} at the kept epoch {sel} ({hist.get('selected')}) on "
            f"{hist.get('val_rows')} val images.")
    if hist.get("test_accuracy") is not None:
        text += f" Test accuracy of the kept network: {_fmt(hist['test_accuracy'])}."
    blocks: list = [text]
    blocks += [f"Warning: {w}" for w in hist.get("warnings", [])]
    blocks.append(Figure("Fine-tuning curves", plots.finetune_curves(hist["epochs"], sel, out / "finetune.png")))
    tm = hist.get("test_metrics")
    if tm and tm.get("confusion"):
        blocks.append(Figure("Confusion matrix of the fine-tuned network on the test split",
                             plots.confusion_from_matrix(tm["confusion"], tm["classes"], out / "network_confusion.png",
                                                         title="network on test")))
    return Section("Network", blocks)


def _stages_section(ctx: dict) -> Section | None:
    stages = ctx.get("stages")
    if not stages:
        return None
    secs = ctx.get("seconds") or {}
    return Section("Stages", [Table(["Stage", "Status", "Seconds"],
                                    [[k, v, _fmt(secs.get(k), 1)] for k, v in stages.items()], numeric={2})])


def _summary(rows: list[dict], best: dict | None, ctx: dict) -> str:
    if not best:
        return "No bench results in this folder."
    se = best.get("cv_accuracy_se")
    text = (f"Best: {best['backbones'].replace('+', ' + ')} / {best['head']} / {best['fusion']}, CV accuracy "
            f"{_fmt(best['cv_accuracy_mean'])}" + (f" ± {_fmt(se)} (standard error)" if se is not None else "")
            + (f", test accuracy {_fmt(best['test_accuracy'])}" if best.get("test_accuracy") is not None else "")
            + ".")
    tied = [r for r in rows if r.get("tied_with_best")]
    if len(tied) > 1:
        text += (f" {len(tied)} configurations are tied within noise; this is the cheapest of them"
                 " (fewer backbones, then faster head, then simpler fusion).")
    if ctx.get("model"):
        text += f" Saved model: {ctx['model']}."
    if ctx.get("network"):
        text += f" Network: {ctx['network']}."
    return text


def pick_best(rows: list[dict]) -> dict | None:
    """The picked configuration: rank 1 of the bench's ranking (featstack.bench.rank_rows)."""
    scored = scored_rows(rows)
    return scored[0] if scored else None


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_CSS = """*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:960px;margin:1.5em auto;padding:0 16px;
color:#222;line-height:1.45;overflow-wrap:anywhere}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.85em}.summary{background:#f4f8ff;border:1px solid #cfe0ff;padding:.6em .9em;border-radius:6px}
.banner{background:#fff3cd;border:1px solid #e0b000;color:#5c4500;padding:.6em .9em;border-radius:6px;font-weight:600}
.scroll{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em;max-width:100%;overflow-wrap:normal}
td,th{border:1px solid #d6d6d6;padding:3px 7px;vertical-align:top}th{background:#f3f3f3;text-align:left;word-break:normal}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}tr.tied td{background:#fff1e0}
img{max-width:100%;height:auto;border:1px solid #eee}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}.thumbs figure{margin:0;width:112px}.thumbs figcaption{font-size:.7em}
.rec{background:#eef8ee;border:1px solid #9c9;padding:.6em .9em;border-radius:6px}
code,pre{font-size:.85em}pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap;overflow-wrap:anywhere}"""


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _html_block(b) -> str:
    if isinstance(b, str):
        cls = ' class="rec"' if b.startswith("Recommendation") else ""
        return f"<p{cls}>{html.escape(b)}</p>"
    if isinstance(b, Table):
        head = "" if not any(b.header) else "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.header) + "</tr>"
        body = []
        for i, r in enumerate(b.rows):
            cells = "".join(f'<td{" class=n" if j in b.numeric else ""}>{html.escape(str(c))}</td>' for j, c in enumerate(r))
            body.append(f'<tr{" class=tied" if i in b.marked else ""}>{cells}</tr>')
        return f'<div class="scroll"><table>{head}{"".join(body)}</table></div>'
    if isinstance(b, Figure):
        return (f'<figure><img alt="{html.escape(b.caption)}" src="{_data_uri(Path(b.path).read_bytes())}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    if isinstance(b, Thumbs):
        return '<div class="thumbs">' + "".join(
            f'<figure><img alt="{html.escape(c)}" src="{_data_uri(d)}"><figcaption>{html.escape(c)}</figcaption></figure>'
            for d, c in b.items) + "</div>"
    if isinstance(b, Pre):
        return f"<pre>{html.escape(b.text)}</pre>"
    raise TypeError(type(b))


@dataclass
class Pre:
    text: str


def _md_block(b, out: Path) -> str:
    if isinstance(b, str):
        return b
    if isinstance(b, Table):
        header = b.header if any(b.header) else [""] * len(b.rows[0])
        lines = ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in [header] + b.rows]
        lines.insert(1, "|" + "|".join("---:" if j in b.numeric else "---" for j in range(len(header))) + "|")
        return "\n".join(lines)
    if isinstance(b, Figure):
        return f"![{b.caption}]({Path(b.path).name})"
    if isinstance(b, Thumbs):
        folder = out / "misclassified"
        folder.mkdir(exist_ok=True)
        parts = []
        for i, (d, c) in enumerate(b.items):
            (folder / f"{i:03d}.png").write_bytes(d)
            parts.append(f"![{c}](misclassified/{i:03d}.png)")
        return " ".join(parts)
    if isinstance(b, Pre):
        return "```\n" + b.text + "\n```"
    raise TypeError(type(b))


def render(out: Path, title: str, subtitle: str, banner: str | None, summary: str,
           sections: list[Section]) -> Path:
    """Write report.html and report.md; returns the HTML path."""
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="meta">{html.escape(subtitle)}</p>']
    md = [f"# {title}", "", subtitle, ""]
    if banner:
        body.append(f'<p class="banner">⚠ {html.escape(banner)}</p>')
        md += [f"> **Warning:** {banner}", ""]
    body.append(f'<p class="summary">{html.escape(summary)}</p>')
    md += [summary, ""]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        md += [f"## {s.title}", ""]
        for b in s.blocks:
            body.append(_html_block(b))
            md += [_md_block(b, out), ""]
    page = (f'<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    from .atomic import atomic_paths

    with atomic_paths(out / "report.html", out / "report.md") as (th, tm):
        th.write_text(page, encoding="utf-8")
        tm.write_text("\n".join(md), encoding="utf-8")
    return out / "report.html"


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def build_report(folder, *, context: dict | None = None, cache=None) -> Path:
    """(Re)write ``folder/report.html`` and ``report.md`` from what the folder holds.

    ``context`` adds to (and is saved with) ``folder/report.json``: ``cache``, ``data`` (the
    image source, for thumbnails), ``model``, ``network``, ``name``, ``stages``, ``seconds``.
    """
    from .recommend import recommendation_section

    out = Path(folder)
    if not out.is_dir():
        from .errors import ConfigError
        raise ConfigError(f"{out}: no such report folder (run `featstack bench --out {out}` first)")
    ctx = dict(_read_json(out / REPORT_JSON) or {})
    ctx.update({k: v for k, v in (context or {}).items() if v is not None})
    bench = _read_json(out / "bench.json") or {}
    if "cache" not in ctx and bench.get("cache"):
        ctx["cache"] = bench["cache"]
    if cache is None:
        cache = _open_cache(ctx.get("cache"))
    elif "cache" not in ctx:
        ctx["cache"] = str(cache.path)
    (out / REPORT_JSON).write_text(json.dumps(ctx, indent=1, default=str) + "\n")

    listed = bench_rows(bench)
    rows = scored_rows(listed)
    best = pick_best(rows)
    if best is not None:
        best = dict(best, cv=bench.get("settings", {}).get("cv"))
    sections: list[Section] = []
    if cache is not None:
        sections += [_dataset_section(cache, ctx), _backbone_section(cache, ctx)]
    if cache is not None and rows:
        table = pretrained_vs_random(cache, rows)
        if table is not None:
            sections.append(Section("Pretrained vs random init", [table]))
    if rows:
        sections += [_ranking_section(listed, bench, out), _cost_section(rows, cache, out)]
    if cache is not None:
        for make in (lambda: _embedding_section(cache, out), lambda: _model_section(cache, ctx, best, out)):
            sec = make()
            if sec is not None:
                sections.append(sec)
    sec = _network_section(ctx, out)
    if sec is not None:
        sections.append(sec)
    if cache is not None and rows:
        sections.append(recommendation_section(cache, rows, ctx))
    sec = _stages_section(ctx)
    if sec is not None:
        sections.append(sec)
    name = ctx.get("name") or out.name
    subtitle = (f"{'Pipeline ' + str(ctx['pipeline']) + ', ' if ctx.get('pipeline') else ''}"
                f"written {time.strftime('%Y-%m-%d %H:%M:%S')}.")
    return render(out, f"featstack report: {name}", subtitle, random_init_banner(cache), _summary(rows, best, ctx),
                  sections)


def write_report(p, res, cache, rows: list[dict] | None = None) -> Path:
    """The report of a `featstack run` (the pipeline's report stage): the bench folder's report
    plus the extraction, model and network sections of this run."""
    ctx = {"name": p.name, "pipeline": str(p.path), "data": str(p.data) if p.data else None,
           "model": res.model, "network": res.network, "stages": dict(res.stages),
           "seconds": {k: round(float(v), 3) for k, v in res.seconds.items()}}
    return build_report(p.out, context=ctx, cache=cache)
