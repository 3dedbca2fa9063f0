"""Shared fixtures: real image files on disk, natural-looking rather than noise."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featstack.data import synthetic_photo  # noqa: F401  (re-exported for the tests)

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One BLAS thread per test process: on a busy 2-core machine OpenBLAS threads spin against each
# other and a 0.2 s logistic regression fit can take 20 s. Subprocesses inherit the variable.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from threadpoolctl import threadpool_limits  # noqa: E402  (after the variable, before any fit)

threadpool_limits(1, user_api="blas")
REPO = Path(__file__).resolve().parents[1]


def write_image_folder(root: Path, *, classes=("cat", "dog", "fox"), per_class: dict | None = None,
                       seed: int = 0, sizes=((96, 128), (120, 90), (64, 64))) -> Path:
    """train/ and test/ folders with JPEG and PNG files in several modes (RGB, L, RGBA, P)."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 6, "test": 2}
    modes = ["RGB", "L", "RGBA", "P", "RGB"]
    for split, n in per_class.items():
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = sizes[i % len(sizes)]
                img = synthetic_photo(rng, h, w, hue=ci * 2)
                mode = modes[i % len(modes)]
                if mode == "RGBA":
                    img = img.convert("RGBA")
                    img.putalpha(200)
                    img.save(d / f"{i:03d}.png")
                elif mode == "P":
                    img.convert("P", palette=Image.ADAPTIVE).save(d / f"{i:03d}.png")
                elif mode == "L":
                    img.convert("L").save(d / f"{i:03d}.jpg", quality=90)
                else:
                    img.save(d / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "photos")


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op torch thread for a module of tiny-batch network tests: as fast, and it does not
    stall at OpenMP barriers when other processes share the cores (measured: the short fine-tune
    took 1 s with one thread, 3-45 s with two on a loaded 2-core machine). Torch is imported only
    by the modules that use it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wait_until(cond, *, what: str, timeout: float = 180.0, proc: subprocess.Popen | None = None,
               poll: float = 0.02) -> None:
    """Wait for ``cond()`` to become true: no fixed sleep that guesses how long work takes.

    Fails at once when ``proc`` exits before the condition holds (its stderr tail is shown),
    and after ``timeout`` seconds otherwise."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not cond():
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read()[-2000:] if proc.stderr is not None else ""
            raise AssertionError(f"process exited with {proc.returncode} before {what}: {err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        tick.wait(poll)


def shard_files(cache: Path, key: str) -> list[Path]:
    """The finished shard files of a backbone's current generation (none before it exists)."""
    from featstack.cache import generation_dir

    try:
        gen = generation_dir(cache, key)
    except Exception:  # noqa: BLE001 - a pointer being replaced: seen as "not yet"
        return []
    return sorted(gen.glob("*-*.h5")) if gen is not None and gen.is_dir() else []
