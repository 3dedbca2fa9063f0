"""Extraction speed: featstack extract against a naive loop and against the forward-only ceiling.

    python benchmarks/bench_extract.py --backbones test_resnet,test_vit,resnet18 --images 2000
        [--input-size S] [--batch-size B] [--device auto|cpu|cuda] [--workers W] [--threads T]

Generates N photo-like JPEGs (smooth scenes plus sensor-like grain, 500x375 and 375x500, ~50 KB
each like ImageNet photos) in a temporary folder, then, on the same images and backbones (random
init, ``--weights none``), runs three phases, each in its own process so that its peak resident
memory (ru_maxrss) is its own:

  (a) naive: per backbone, a torch DataLoader over the files with timm's ``create_transform``
      (``resolve_model_data_config``), fp32 forward, features appended to a list, ``np.save``;
      every image is decoded once per backbone;
  (b) featstack: ``featstack.extract.extract`` with default settings into a temporary cache;
  (c) ceiling: each model's pure forward throughput on device-resident synthetic batches, at
      featstack's precision, batch size and memory format, on the module featstack runs (its
      BatchNorms folded into the convolutions); for K backbones the ceiling is
      1 / sum_k(1 / throughput_k) images/s. On a CPU it is the best of torch's default thread
      count and featstack's, so it bounds (b) from above.

Prints images/s of each, the ratios (b)/(a) and (b)/(c), and peak memory per phase: the
phase process's ru_maxrss, and the peak PSS of the phase process plus its DataLoader workers
(sampled from /proc every 0.2 s; PSS splits the pages forked workers share with their parent,
so the sum is real memory). ``--json PATH`` saves the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = ((375, 500), (500, 375), (375, 500), (333, 500))
N_CLASSES = 10


# --------------------------------------------------------------------------- images
def _base_images(n: int, seed: int, sizes=SIZES):
    from featstack.data import synthetic_photo

    rng = np.random.default_rng(seed)
    return [np.asarray(synthetic_photo(rng, *sizes[i % len(sizes)], shapes=6), dtype=np.int16)
            for i in range(n)]


def parse_photo_size(text: str) -> tuple[tuple[int, int], ...]:
    """'640x480' (width x height, as photo sizes are written) -> ((480, 640),) in (h, w)."""
    w, h = (int(v) for v in text.lower().split("x"))
    return ((h, w),)


def _write_chunk(args):
    root, lo, hi, seed, sizes = args
    from PIL import Image

    rng = np.random.default_rng(seed + lo)
    bases = _base_images(8, seed + lo, sizes)
    for i in range(lo, hi):
        b = bases[i % len(bases)]
        shift = rng.integers(-30, 30, size=3).astype(np.int16)
        grain = rng.normal(0, 6, size=b.shape).astype(np.int16)  # sensor-like grain: real JPEG sizes
        img = np.clip(b + shift + grain, 0, 255).astype(np.uint8)
        if i % 2:
            img = img[:, ::-1]
        d = Path(root) / "train" / f"class{i % N_CLASSES:02d}"
        Image.fromarray(img).save(d / f"{i:07d}.jpg", quality=90)


def make_images(root: Path, n: int, seed: int = 0, sizes=SIZES) -> Path:
    from multiprocessing import Pool

    for c in range(N_CLASSES):
        (root / "train" / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    step = 250
    chunks = [(str(root), lo, min(lo + step, n), seed, sizes) for lo in range(0, n, step)]
    with Pool(min(4, os.cpu_count() or 1)) as pool:
        pool.map(_write_chunk, chunks)
    return root


# --------------------------------------------------------------------------- phases (subprocesses)
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak proportional set size (PSS) of this process plus its DataLoader workers, sampled
    every 0.2 s: forked workers share the parent's pages, so RSS would count them twice."""

    def __init__(self):
        import threading

        self.peak_kb = 0
        self.ok = os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in _descendants(os.getpid())))
            self._stop.wait(0.2)

    def __enter__(self):
        if self.ok:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.ok:
            self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024.0 if self.ok else float("nan")


def _timm_model(name: str, input_size: int | None):
    import timm
    import torch

    torch.manual_seed(0)
    if input_size:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, img_size=input_size).eval()
        except TypeError:
            pass
    return timm.create_model(name, pretrained=False, num_classes=0).eval()


class _Files:
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def phase_naive(a) -> dict:
    import timm.data
    import torch
    from torch.utils.data import DataLoader

    paths = sorted(str(p) for p in Path(a.root).rglob("*.jpg"))
    out = Path(a.work) / "naive"
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if a.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if a.naive_threads:
        torch.set_num_threads(a.naive_threads)
    t0 = time.perf_counter()
    for name in a.backbones.split(","):
        model = _timm_model(name, a.input_size).to(dev)
        cfg = timm.data.resolve_model_data_config(model)
        if a.input_size:
            cfg["input_size"] = (3, a.input_size, a.input_size)
        tf = timm.data.create_transform(**cfg)
        loader = DataLoader(_Files(paths, tf), batch_size=a.batch_size, num_workers=a.naive_workers,
                            pin_memory=dev.type == "cuda")
        feats = []
        with torch.inference_mode():
            for x in loader:
                feats.append(model(x.to(dev)).float().cpu().numpy())
        np.save(out / f"{name}.npy", np.concatenate(feats))
    secs = time.perf_counter() - t0
    return {"seconds": secs, "images_per_second": len(paths) / secs, "workers": a.naive_workers,
            "threads": torch.get_num_threads()}


def phase_featstack(a) -> dict:
    from featstack.extract import extract

    n = sum(1 for _ in Path(a.root).rglob("*.jpg"))
    t0 = time.perf_counter()
    res = extract(a.root, a.backbones.split(","), Path(a.work) / "cache.h5", weights="none",
                  input_size=a.input_size, batch_size=a.batch_size, device=a.device, progress=False,
                  workers=a.workers, threads=a.threads)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "images_per_second": n / secs, "device": res.device, "precision": res.precision,
            "workers": res.workers, "threads": res.threads, "decode": res.decode,
            "forward_images_per_second": res.images_per_second}


def ceiling_model(key: str, dev, input_size, batch_size: int):
    """(the module featstack runs for ``key`` — BN folded, channels_last — and a device-resident
    random batch at its input size): what the forward-only ceiling times."""
    import torch

    from featstack.backbones import load_backbone, resolve_backbone
    from featstack.extract import inference_model

    lb = load_backbone(resolve_backbone(key, weights="none", input_size=input_size), dev)
    model = inference_model(lb, channels_last=True)
    x = torch.randn((batch_size, *lb.data_config["input_size"]), device=dev).contiguous(
        memory_format=torch.channels_last)
    return model, x


def forward_images_per_second(model, x, dev, prec: str, *, warmup: int, min_batches: int,
                              min_seconds: float, max_images: int | None = None) -> float:
    """Images/s of ``model`` on the batch ``x`` under featstack's autocast: ``warmup`` calls, then
    at least ``min_batches`` batches and more while under ``min_seconds`` (and ``max_images``)."""
    import torch

    from featstack.extract import autocast_context

    n = int(x.shape[0])
    with torch.inference_mode(), autocast_context(dev, prec):
        for _ in range(warmup):
            model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0, done = time.perf_counter(), 0
        while done < min_batches * n or (time.perf_counter() - t0 < min_seconds
                                         and (max_images is None or done < max_images)):
            model(x)
            done += n
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return done / (time.perf_counter() - t0)


def phase_ceiling(a) -> dict:
    import torch

    from featstack.extract import resolve_device, resolve_parallelism, resolve_precision

    dev = resolve_device(a.device)
    prec = resolve_precision("auto", dev)
    _, fs_threads = resolve_parallelism(dev, a.workers, a.threads)
    thread_options = sorted({torch.get_num_threads(), fs_threads or torch.get_num_threads()}) \
        if dev.type == "cpu" else [torch.get_num_threads()]
    n_images = sum(1 for _ in Path(a.root).rglob("*.jpg"))
    per_model = {}
    for key in a.backbones.split(","):
        model, x = ceiling_model(key, dev, a.input_size, a.batch_size)
        best = {}
        for t in thread_options:
            torch.set_num_threads(t)
            best[t] = forward_images_per_second(model, x, dev, prec, warmup=2, min_batches=3, min_seconds=5.0,
                                                max_images=n_images)
        t_best = max(best, key=best.get)
        per_model[key] = {"images_per_second": best[t_best], "threads": t_best, "by_threads": best}
    ceiling = 1.0 / sum(1.0 / m["images_per_second"] for m in per_model.values())
    return {"images_per_second": ceiling, "per_model": per_model, "precision": prec, "device": str(dev)}


PHASES = {"naive": phase_naive, "featstack": phase_featstack, "ceiling": phase_ceiling}


def _run_phase(name: str, a, root: Path, work: Path) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--phase", name, "--root", str(root), "--work", str(work),
           "--backbones", a.backbones, "--batch-size", str(a.batch_size), "--device", a.device,
           "--naive-workers", str(a.naive_workers), "--out", str(out)]
    for opt in ("input_size", "workers", "threads", "naive_threads"):
        if getattr(a, opt) is not None:
            cmd += [f"--{opt.replace('_', '-')}", str(getattr(a, opt))]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    res = json.loads(out.read_text())
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="test_resnet,test_vit,resnet18")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--photo-size", default=None, metavar="WxH",
                   help="every generated JPEG this size, e.g. 640x480 (default: ImageNet-like 500x375 mix)")
    p.add_argument("--input-size", type=int, default=None, help="square input size for every backbone")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="featstack's --workers (default: its own)")
    p.add_argument("--threads", type=int, default=None, help="featstack's --threads (default: its own)")
    p.add_argument("--naive-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers of the naive loop (default: min(4, cores), the usual idiom)")
    p.add_argument("--naive-threads", type=int, default=None,
                   help="torch threads of the naive loop (default: torch's own, all cores)")
    p.add_argument("--phases", default="naive,featstack,ceiling")
    p.add_argument("--images-dir", default=None, help="reuse/keep the generated images here")
    p.add_argument("--json", default=None, help="save the results as JSON")
    # internal: one phase in a subprocess
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.phase:
        with PeakMemory() as mem:
            res = PHASES[a.phase](a)
        res["peak_rss_mb"], res["peak_pss_mb"] = _rss_mb(), mem.peak_mb
        Path(a.out).write_text(json.dumps(res, default=str))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="featstack-bench-"))
    try:
        root = Path(a.images_dir) if a.images_dir else tmp / "images"
        have = sum(1 for _ in root.rglob("*.jpg")) if root.exists() else 0
        if have != a.images:
            if root.exists():
                shutil.rmtree(root)
            t0 = time.perf_counter()
            make_images(root, a.images, sizes=parse_photo_size(a.photo_size) if a.photo_size else SIZES)
            print(f"generated {a.images} JPEGs in {time.perf_counter() - t0:.0f}s "
                  f"({sum(f.stat().st_size for f in root.rglob('*.jpg')) / a.images / 1024:.0f} KB each)",
                  flush=True)
        work = tmp / "work"
        work.mkdir()
        results = {}
        for name in a.phases.split(","):
            results[name] = _run_phase(name, a, root, work)
            print(f"  {name}: {results[name]['images_per_second']:.1f} images/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{a.images} images, backbones {a.backbones}, input size {a.input_size or 'model default'}, "
          f"batch {a.batch_size}, {os.cpu_count()} cores, load average after {load:.2f}")
    print(f"{'phase':<11}{'images/s':>10}{'seconds':>9}{'peak RSS MB':>13}{'peak PSS MB':>13}  settings")
    for name, r in results.items():
        settings = {"naive": lambda r: f"fp32, {r['workers']} workers, {r['threads']} threads",
                    "featstack": lambda r: f"{r['precision']}, {r['workers']} workers, "
                                           f"{r['threads'] or 'default'} threads, decode {r['decode']}",
                    "ceiling": lambda r: ", ".join(f"{k} {m['images_per_second']:.0f}/s@{m['threads']}t"
                                                   for k, m in r["per_model"].items())}[name](r)
        secs = r.get("seconds")
        print(f"{name:<11}{r['images_per_second']:>10.1f}{(f'{secs:.1f}' if secs else '-'):>9}"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_pss_mb']:>13.0f}  {settings}")
    ips = {k: v["images_per_second"] for k, v in results.items()}
    if "featstack" in ips and "naive" in ips:
        print(f"featstack / naive   = {ips['featstack'] / ips['naive']:.2f}x")
    if "featstack" in ips and "ceiling" in ips:
        print(f"featstack / ceiling = {ips['featstack'] / ips['ceiling']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results, "load_average": load},
                                           indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
