"""Write-then-rename for folders of several files (saved models, networks).

A reader sees either the old files or the new ones, never a half-written file: each file is
written under a temporary name beside its final path and renamed onto it only once every write of
the block has succeeded. Temporaries are removed whatever happens.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_paths(*finals: Path) -> Iterator[list[Path]]:
    """Temporary paths for ``finals``; renamed onto them, in order, when the block succeeds."""
    tag = uuid.uuid4().hex
    tmps = [Path(f).with_name(f".{Path(f).name}.{tag}.tmp") for f in finals]
    try:
        yield tmps
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
