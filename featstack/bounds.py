"""Bounds on numbers and output paths, checked before any work starts.

A value out of range ends in one line naming the option or key and the allowed range, instead
of a traceback deep inside numpy (a seed >= 2**32), an allocation the OOM killer answers (an
input size of 100000), or a long run whose results cannot be written (an output under /proc).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from .errors import ConfigError

SEED_LIMIT = 2 ** 32          # numpy / scikit-learn random_state: 0 <= seed < 2**32
INPUT_SIZE_MIN = 16
INPUT_SIZE_MAX = 2048         # raise with --max-input-size or FEATSTACK_MAX_INPUT_SIZE
MAX_INPUT_SIZE_ENV = "FEATSTACK_MAX_INPUT_SIZE"

# YAML keys with bounds the stage configs' minimums do not express: name -> (lowest, highest)
BOUNDS = {"seed": (0, SEED_LIMIT - 1)}


def check_int(value, name: str, lo: int | None = None, hi: int | None = None, hint: str = "") -> int:
    """``value`` as an int within [lo, hi], or a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
        shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:20]}... ({len(str(value))} digits)"
        raise ConfigError(f"{name} must be {rng}, got {shown}{hint}")
    return value


def check_seed(value, name: str = "--seed") -> int:
    return check_int(value, name, 0, SEED_LIMIT - 1)


def max_input_size(explicit: int | None = None) -> int:
    if explicit is not None:
        return explicit
    raw = os.environ.get(MAX_INPUT_SIZE_ENV, "")
    try:
        return int(raw) if raw else INPUT_SIZE_MAX
    except ValueError:
        raise ConfigError(f"{MAX_INPUT_SIZE_ENV}={raw!r} is not an integer") from None


def check_input_size(value, name: str = "--input-size", limit: int | None = None) -> int | None:
    """None (the model's own size) or INPUT_SIZE_MIN..limit (2048 unless raised explicitly)."""
    if value is None:
        return None
    hi = max_input_size(limit)
    return check_int(value, name, INPUT_SIZE_MIN, hi,
                     hint=f" (raise the limit with --max-input-size or {MAX_INPUT_SIZE_ENV})"
                     if isinstance(value, int) and value > hi else "")


def check_key(key: str, value, where: str) -> None:
    """Bounds of a YAML key by its last name (``bench.seed`` -> ``seed``); ``where`` names it."""
    leaf = key.rsplit(".", 1)[-1]
    if value is None or not isinstance(value, int) or isinstance(value, bool):
        return
    if leaf == "input_size" and value > max_input_size():
        check_input_size(value, where)
    elif leaf in BOUNDS:
        check_int(value, where, *BOUNDS[leaf])


def check_output_dir(path: str | os.PathLike, name: str = "--out") -> Path:
    """Create ``path`` (a folder for results) and prove it writable now, not after the work."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{name} {p}: exists and is not a folder")
    probe = p / f".featstack-write-test.{uuid.uuid4().hex}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{name} {p}: cannot write there ({e.strerror or e})") from None
    return p


def check_output_file(path: str | os.PathLike, name: str = "--out") -> Path:
    """A file about to be written: not an existing folder, its folder writable."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{name} {p}: is an existing folder; give a file name (e.g. {p / 'predictions.csv'})")
    check_output_dir(p.parent if str(p.parent) else ".", name=f"{name} {p}: folder")
    return p
