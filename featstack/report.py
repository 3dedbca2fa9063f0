"""The run report: ``runs/NAME/report.md`` and a single self-contained ``report.html``.

What a reader wants after a run: what data went in (sizes, classes, errors), what each backbone
is and cost, how every combination scored (ranked), which model was kept and where it is, and how
that model does per class on the test split. The HTML embeds its images as data URIs so it can be
mailed or attached as one file.
"""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

import numpy as np

_TABLE_COLUMNS = ["backbones", "head", "fusion", "cv_accuracy_mean", "cv_accuracy_std", "cv_f1_macro_mean",
                  "test_accuracy", "fit_seconds", "random_init"]


def _fmt(v: Any) -> str:
    if isinstance(v, float) or (isinstance(v, str) and v.replace(".", "", 1).replace("-", "", 1).isdigit()
                                and "." in v):
        try:
            return f"{float(v):.4f}"
        except ValueError:
            return str(v)
    return "" if v is None else str(v)


def _ranked(rows: list[dict] | None, metric: str = "cv_accuracy_mean") -> list[dict]:
    from .bench import rank_rows  # the one ranking rule
    return rank_rows(rows or [], metric)


def _test_predictions(model_dir: str, cache) -> tuple[np.ndarray, np.ndarray] | None:
    """True and predicted labels of the saved model on the cache's labelled test rows."""
    from .models import load_model

    rows = cache.rows("test")
    if not len(rows):
        return None
    saved = load_model(model_dir)
    return cache.labels[rows], np.asarray(saved.predict(cache, rows=rows))


def _figures(p, res, cache, out: Path) -> list[tuple[str, Path]]:
    """(caption, PNG path) for every figure of the report; missing ones are left out."""
    from . import plots

    figs = []
    for caption, name in (("Score by backbone combination and head", "heatmap.png"),
                          ("Best score per combination size", "best_by_size.png")):
        if (out / name).exists():
            figs.append((caption, out / name))
    if res.model:
        pred = _test_predictions(res.model, cache)
        if pred is not None:
            y, yhat = pred
            plots.confusion(y, yhat, cache.classes, out / "confusion.png")
            plots.per_class_f1(y, yhat, cache.classes, out / "per_class_f1.png")
            figs.append(("Confusion matrix of the chosen model on the test split", out / "confusion.png"))
            figs.append(("Per-class F1 of the chosen model on the test split", out / "per_class_f1.png"))
    return figs


def _pretrained_vs_random(backbones: list[dict], rows: list[dict] | None) -> list[list[str]]:
    """One line per backbone: its weights (pretrained or RANDOM INIT) beside its best single-backbone
    scores, so pretrained features and the random-init control read side by side."""
    table = [["backbone", "model", "weights", "best head", "cv accuracy", "test accuracy"]]
    single = [r for r in _ranked(rows) if r.get("fusion") == "single"]
    for b in sorted(backbones, key=lambda b: bool(b.get("random_init"))):
        best = next((r for r in single if r.get("backbones") == b["key"]), {})
        table.append([b["key"], str(b["timm_name"]), "RANDOM INIT" if b.get("random_init") else "pretrained",
                      str(best.get("head", "")), _fmt(best.get("cv_accuracy_mean")), _fmt(best.get("test_accuracy"))])
    return table


def _sections(p, res, cache, rows) -> list[tuple[str, list[list[str]] | str]]:
    """Report content as (title, table rows or paragraph), shared by the Markdown and HTML writers."""
    s = cache.summary()
    splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
    dataset = [["samples", str(s["n_samples"])], ["splits", splits],
               ["classes", f"{len(s['classes'])}: " + ", ".join(s["classes"][:30])
                + (" ..." if len(s["classes"]) > 30 else "")],
               ["errors", str(s["n_errors"])], ["source", str(p.data)], ["cache", str(p.cache)]]
    for e in s["errors"][:5]:
        dataset.append(["error", f"{e['id']}: {e['message']}"])
    backbones = [["key", "timm model", "dim", "dtype", "weights", "weights sha256", "images/s"]]
    for b in s["backbones"]:
        ips = b.get("images_per_second")
        backbones.append([b["key"], str(b["timm_name"]), str(b["dim"]), str(b["dtype"]), str(b["weights"]),
                          str(b["weights_sha256"] or "")[:12], f"{ips:.1f}" if ips else ""])
    ranked = _ranked(rows)
    bench = [["rank"] + _TABLE_COLUMNS] + [[str(i + 1)] + [_fmt(r.get(c)) for c in _TABLE_COLUMNS]
                                           for i, r in enumerate(ranked[:40])]
    stages = [["stage", "status", "seconds"]] + [[k, v, _fmt(res.seconds.get(k))] for k, v in res.stages.items()]
    chosen = "no model was trained"
    if res.model:
        b = res.best or {}
        chosen = (f"Chosen model: backbones {b.get('backbones')}, head {b.get('head')}, fusion {b.get('fusion')}; "
                  f"saved in {res.model}.")
        if res.network:
            chosen += f" Network: {res.network}."
    sections: list[tuple[str, Any]] = [("Dataset", dataset), ("Backbones", backbones), ("Chosen model", chosen)]
    if any(b.get("random_init") for b in s["backbones"]):
        sections.insert(2, ("Pretrained vs random init", _pretrained_vs_random(s["backbones"], rows)))
    if len(bench) > 1:
        sections.append((f"Bench ({len(ranked)} results, ranked by cross-validated accuracy)", bench))
    sections.append(("Stages", stages))
    return sections


def _md_table(rows: list[list[str]], header: bool) -> str:
    if not header:
        rows = [["", ""]] + rows
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def _html_table(rows: list[list[str]], header: bool) -> str:
    out = ["<table>"]
    for i, r in enumerate(rows):
        tag = "th" if header and i == 0 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}"""


def write_report(p, res, cache, rows: list[dict] | None) -> Path:
    """Write report.md and the self-contained report.html into the run folder; returns the HTML path."""
    out = Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = _sections(p, res, cache, rows)
    figs = _figures(p, res, cache, out)
    header = {"Backbones", "Stages", "Pretrained vs random init"}
    title = f"featstack report: {p.name}"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")

    md = [f"# {title}", "", f"Pipeline `{p.path}`, written {stamp}.", ""]
    for name, body in sections:
        md += [f"## {name}", ""]
        md += [body if isinstance(body, str) else _md_table(body, name in header or name.startswith("Bench")), ""]
    if figs:
        md += ["## Figures", ""] + [f"![{c}]({f.name})\n" for c, f in figs]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")

    body = [f"<h1>{html.escape(title)}</h1>", f"<p>Pipeline <code>{html.escape(str(p.path))}</code>, "
                                               f"written {stamp}.</p>"]
    for name, content in sections:
        body.append(f"<h2>{html.escape(name)}</h2>")
        body.append(f"<p>{html.escape(content)}</p>" if isinstance(content, str)
                    else _html_table(content, name in header or name.startswith("Bench")))
    if figs:
        body.append("<h2>Figures</h2>")
        for caption, f in figs:
            data = base64.b64encode(f.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
