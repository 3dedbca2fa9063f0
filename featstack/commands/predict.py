"""`featstack predict MODEL CACHE --out preds.csv`: apply a saved model to a cache;
`featstack predict NETWORK --data SRC --out preds.csv`: run a network on images."""
from __future__ import annotations

import argparse
import csv
import os
import sys
from contextlib import contextmanager
from pathlib import Path

BATCH_ROWS = 8192


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `featstack predict` (options only; nothing heavy is imported here)."""
    p = sub.add_parser(
        "predict", help="predict with a saved model (on a cache) or a network (on images), write a CSV",
        description="Predict every (or one split's) row of a cache with a model saved by `featstack "
                    "train` (the cache's backbones must have been extracted the same way), or every image "
                    "of a data source with a network from `featstack export` / `featstack finetune` "
                    "(--data). Writes id, split, label, pred and one proba_<class> (or score_<class>) "
                    "column per class; with --data also an error column naming images that failed.")
    p.add_argument("model", help="model folder (`featstack train --out`) or network folder "
                                 "(`featstack export` / `featstack finetune`)")
    p.add_argument("cache", nargs="?", default=None,
                   help="cache index file (e.g. cache/y.h5) for a saved model; leave out with --data")
    p.add_argument("--data", default=None,
                   help="images for a network: image folder (class subfolders or loose images), "
                        "CSV/JSONL manifest (label optional) or 'demo' (default: none)")
    p.add_argument("--out", required=True, help="CSV file to write, or - for standard output")
    p.add_argument("--split", default="all", choices=["all", "train", "val", "test", "unlabelled"],
                   help="which rows to predict (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch with --data (default 32)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode workers with --data (default: cores - 1, at most 4)")
    p.add_argument("--device", default="auto", help="device with --data: auto (cuda if available), cpu, "
                                                    "cuda, cuda:1, ... (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a progress bar on standard error)")
    return p


def folder_kind(path: str | os.PathLike) -> str:
    """'model' or 'network' (by the descriptor the folder holds); a ConfigError otherwise. A
    model folder is recognised without importing torch (the CPU side never does)."""
    from ..errors import ConfigError
    from ..models import META_FILE

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such model folder or network folder")
    if (path / META_FILE).is_file():
        return "model"
    from ..export import NETWORK_JSON

    if (path / NETWORK_JSON).is_file() or path.name == NETWORK_JSON:
        return "network"
    raise ConfigError(f"{path}: neither a saved model ({META_FILE}) nor a network ({NETWORK_JSON}) folder")


@contextmanager
def csv_out(out: str):
    """A csv.writer on ``out`` (written to a temporary name and renamed when complete), or on
    standard output for ``-``."""
    if out == "-":
        yield csv.writer(sys.stdout)
        sys.stdout.flush()
        return
    from ..bounds import check_output_file

    path = check_output_file(out)  # not an existing folder, its folder writable: one clear line
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as fh:
            yield csv.writer(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _say(args, line: str) -> None:
    """Summary lines go to stdout, or to stderr when the CSV itself goes to stdout."""
    print(line, file=sys.stderr if args.out == "-" else sys.stdout)


def _finish(args, n_right: int, n_labelled: int, unit: str) -> int:
    """The accuracy and output lines that close both kinds of prediction."""
    _say(args, f"accuracy     {n_right / n_labelled:.4f} on {n_labelled} labelled {unit}" if n_labelled
         else f"accuracy     (no labelled {unit})")
    _say(args, f"wrote        {'standard output' if args.out == '-' else args.out}")
    return 0


def split_or_any(split: str) -> str | None:
    """--split as the one row selection (Cache.rows, SampleTable.rows) takes it: "all" = any."""
    return None if split == "all" else split


def run(args) -> int:
    from ..errors import ConfigError

    if args.out != "-":  # before any long work: a bad --out is one line, not a lost run
        from ..bounds import check_output_file
        check_output_file(args.out)
    kind = folder_kind(args.model)
    if kind == "network":
        if args.data is None:
            raise ConfigError("a network predicts from images: pass --data SRC (image folder, manifest or "
                              "'demo'); a cache is for saved models")
        return _run_network(args)
    if args.data is not None:
        raise ConfigError(f"{args.model} is a saved model, which reads cached features: extract the images "
                          "first (featstack extract --data SRC --cache CACHE ...) and pass CACHE, or export "
                          "the model to a network (featstack export) and predict with that")
    if args.cache is None:
        raise ConfigError("a saved model predicts the rows of a cache: featstack predict MODEL CACHE --out CSV")
    return _run_model(args)


def _run_model(args) -> int:
    """Check the cache against the model, write the CSV atomically, print the accuracy."""
    import numpy as np
    from tqdm.auto import tqdm

    from ..cache import open_cache, select_rows
    from ..models import load_model

    model = load_model(args.model)
    cache = model.check_cache(open_cache(args.cache))
    rows = cache.rows(split_or_any(args.split), labelled=False)
    skipped = len(select_rows(cache.labels, cache.splits, split_or_any(args.split), labelled=False)) - len(rows)
    kind = model.score_kind
    n_right = n_labelled = 0
    with csv_out(args.out) as w:
        w.writerow(["id", "split", "label", "pred", *[f"{kind}_{c}" for c in model.output_classes]])
        batches = range(0, len(rows), BATCH_ROWS)
        for start in tqdm(batches, desc="predict", unit="batch", disable=args.no_progress or len(batches) <= 1):
            idx = rows[start:start + BATCH_ROWS]
            X, _ = model.features(cache, idx)
            scores = model._scores(X)
            pred = model._names(model.estimator.predict(X))
            for r, p, s in zip(idx, pred, scores):
                label = cache.classes[cache.labels[r]] if cache.labels[r] >= 0 else ""
                if label:
                    n_labelled += 1
                    n_right += int(label == p)
                w.writerow([cache.ids[r], cache.splits[r], label, p, *(f"{v:.8g}" for v in s)])
    _say(args, f"model        {model.head} x {model.fusion} over {'+'.join(model.backbones)} ({model.path})")
    _say(args, f"predicted    {len(rows)} rows ({args.split}) of {cache.path}")
    if skipped:
        _say(args, f"skipped      {skipped} rows whose input failed to decode (see `featstack info`)")
    return _finish(args, n_right, n_labelled, "rows")


def default_workers(workers: int | None) -> int:
    return workers if workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))


def _run_network(args) -> int:
    """Decode the images in batches, run the network, one CSV row per image (errors included)."""
    import numpy as np

    from ..data import open_source
    from ..export import load_network
    from ..inference import predict_source

    net = load_network(args.model)
    source = open_source(args.data)
    s = source.samples
    names = list(s.classes)
    rows = s.rows(split_or_any(args.split), labelled=False)
    n_right = n_labelled = n_failed = 0
    with csv_out(args.out) as w:
        w.writerow(["id", "split", "label", "pred", *[f"proba_{c}" for c in net.classes], "error"])
        for batch in predict_source(net, source, rows, batch_size=args.batch_size,
                                    workers=default_workers(args.workers), device=args.device,
                                    progress=not args.no_progress):
            done = {int(r): (net.classes[int(p)], pr) for r, p, pr in zip(batch.rows, batch.pred, batch.proba)}
            for r in sorted(set(done) | set(batch.errors)):
                label = names[s.labels[r]] if s.labels[r] >= 0 else ""
                if r in batch.errors:
                    n_failed += 1
                    w.writerow([s.ids[r], s.splits[r], label, "", *[""] * len(net.classes), batch.errors[r]])
                    continue
                pred, proba = done[r]
                if label:
                    n_labelled += 1
                    n_right += int(label == pred)
                w.writerow([s.ids[r], s.splits[r], label, pred, *(f"{v:.8g}" for v in proba), ""])
    _say(args, f"network      {args.model} ({'+'.join(net.keys)}, {len(net.classes)} classes)")
    _say(args, f"predicted    {len(rows) - n_failed} images ({args.split}) of {getattr(source, 'description', args.data)}")
    if n_failed:
        _say(args, f"failed       {n_failed} images could not be decoded (their error is in the CSV)")
    return _finish(args, n_right, n_labelled, "images")
