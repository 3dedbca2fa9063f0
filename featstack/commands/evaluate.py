"""`featstack evaluate TARGET (--cache CACHE | --data SRC) [--split test] [--out metrics.json]`:
score a saved model or a network on labelled rows: accuracy, macro-F1, per-class precision /
recall / F1, and a confusion-matrix PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

from .predict import split_or_any


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate", help="score a saved model or a network on a labelled split (metrics.json + confusion PNG)",
        description="Score a saved model (`featstack train`) on a cache, or a network (`featstack export` / "
                    "`featstack finetune`) on images (--data) or on a cache its backbones produced: "
                    "accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.")
    p.add_argument("target", help="saved model folder or network folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", default=None, help="cache index file whose rows to score (default: none)")
    src.add_argument("--data", default=None,
                     help="images for a network: image folder, CSV/JSONL manifest or 'demo' (default: none)")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="labelled rows of this split are scored (default test)")
    p.add_argument("--out", default=None,
                   help="metrics JSON file (a name ending in .json; the confusion matrix goes beside it as "
                        "NAME-confusion.png) or a folder (metrics.json + confusion.png there) "
                        "(default: print only)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch with --data (default 32)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode workers with --data (default: cores - 1, at most 4)")
    p.add_argument("--device", default="auto", help="device for a network: auto, cpu, cuda, ... (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a progress bar on standard error)")
    return p


def output_paths(out: str) -> tuple[Path, Path]:
    """(metrics JSON, confusion PNG) for --out: a .json file name, or a folder."""
    path = Path(out)
    if path.suffix.lower() == ".json":
        return path, path.with_name(f"{path.stem}-confusion.png")
    return path / "metrics.json", path / "confusion.png"


def _no_rows(where: str, split: str):
    from ..errors import DataError

    more = "" if split == "all" else " (pass --split all, train or val to score other rows)"
    return DataError(f"{where}: no labelled rows in split {split!r} to score{more}")


def _model_on_cache(args) -> tuple[list, list, list, str]:
    import numpy as np

    from ..cache import open_cache
    from ..models import load_model

    model = load_model(args.target)
    cache = model.check_cache(open_cache(args.cache))
    rows = cache.rows(split_or_any(args.split))
    if not len(rows):
        raise _no_rows(str(cache.path), args.split)
    pred = model.predict_names(cache, rows=rows)
    true = np.asarray(cache.classes, dtype=object)[cache.labels[rows]]
    what = f"model {model.head} x {model.fusion} over {'+'.join(model.backbones)}"
    return list(true), list(pred), list(cache.classes), what


def _network_on_cache(args) -> tuple[list, list, list, str]:
    import numpy as np

    from ..cache import open_cache
    from ..export import load_network
    from ..inference import predict_cached

    net = load_network(args.target)
    cache = open_cache(args.cache)
    rows = cache.rows(split_or_any(args.split))
    if not len(rows):
        raise _no_rows(str(cache.path), args.split)
    pred = np.asarray(net.classes, dtype=object)[predict_cached(net, cache, rows)]
    true = np.asarray(cache.classes, dtype=object)[cache.labels[rows]]
    return list(true), list(pred), _classes(net.classes, cache.classes), f"network {args.target} (cached features)"


def _network_on_images(args) -> tuple[list, list, list, str]:
    import numpy as np

    from ..data import open_source
    from ..export import load_network
    from ..inference import predict_source
    from .predict import default_workers

    net = load_network(args.target)
    source = open_source(args.data)
    s = source.samples
    rows = s.rows(split_or_any(args.split))
    if not len(rows):
        raise _no_rows(str(args.data), args.split)
    names = np.asarray(s.classes, dtype=object)
    true, pred, failed = [], [], 0
    for batch in predict_source(net, source, rows, batch_size=args.batch_size,
                                workers=default_workers(args.workers), device=args.device,
                                progress=not args.no_progress):
        true += list(names[s.labels[batch.rows]])
        pred += [net.classes[int(i)] for i in batch.pred]
        failed += len(batch.errors)
    what = f"network {args.target} on images"
    if failed:
        what += f" ({failed} images failed to decode and are not scored)"
    return true, pred, _classes(net.classes, s.classes), what


def _classes(network_classes, data_classes) -> list:
    """The network's classes, then any class of the data it does not know (never predicted)."""
    return list(network_classes) + [c for c in data_classes if c not in set(network_classes)]


def run(args) -> int:
    from ..errors import ConfigError
    from ..metrics import classification_metrics, metrics_lines, write_metrics
    from .predict import folder_kind

    kind = folder_kind(args.target)
    if kind == "model":
        if args.data is not None:
            raise ConfigError(f"{args.target} is a saved model, which reads cached features: extract the "
                              "images into a cache and pass --cache, or export the model and evaluate the network")
        true, pred, classes, what = _model_on_cache(args)
    elif args.cache is not None:
        true, pred, classes, what = _network_on_cache(args)
    else:
        true, pred, classes, what = _network_on_images(args)
    metrics = classification_metrics(true, pred, classes)
    metrics.update(target=str(args.target), kind=kind, split=args.split,
                   source=str(args.cache or args.data), what=what)
    print(what)
    for line in metrics_lines(metrics):
        print(line)
    if args.out:
        from .. import plots

        jpath, png = output_paths(args.out)
        index = {c: i for i, c in enumerate(classes)}
        plots.confusion([index[t] for t in true], [index[p] for p in pred], classes, png)
        metrics["confusion_png"] = png.name
        write_metrics(metrics, jpath)
        print(f"wrote        {jpath}, {png}")
    return 0
