"""Advisory OS file locks: one writer per (cache, backbone), one index build at a time.

``fcntl.flock`` on a small lock file beside the data. The kernel drops the lock when its holder
exits, however it exits (SIGKILL included), so a crashed writer never leaves a stale lock; the
file's content (pid, host, since when) only serves the message shown to a second writer.

Network file systems: flock works on local disks and on NFSv4 (Linux emulates it with byte-range
locks since 2.6.12); on NFSv3 without a lock daemon, some FUSE, CIFS or Lustre mounts it may fail
(ENOLCK, EOPNOTSUPP: reported as one error) or, worse, lock only on the local machine. Writers on
several machines of such a file system are not kept apart: run one writer per backbone there, or
give each its own cache. ``FEATSTACK_NO_LOCK=1`` (or ``featstack extract --no-lock``) turns the
locks off; the fingerprint re-check before every shard and the generation switch still hold.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from .errors import CacheError

NO_LOCK_ENV = "FEATSTACK_NO_LOCK"


class CacheLockedError(CacheError):
    """Another process holds the write lock of this (cache, backbone)."""


def locking_enabled(explicit: bool | None = None) -> bool:
    """Locks on unless turned off by the caller (``False``) or by ``FEATSTACK_NO_LOCK=1``."""
    if explicit is False:
        return False
    return os.environ.get(NO_LOCK_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def job_id() -> str:
    """What ties the ranks of one torchrun job together (empty outside torchrun)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run:
        return f"torchrun:{run}"
    if os.environ.get("MASTER_ADDR") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun:{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '')}"
    return ""


def read_holder(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process (holder unknown)"
    return f"pid {holder['pid']} on host {holder.get('host', '?')} since {holder.get('since', '?')}"


class FileLock:
    """An exclusive flock on ``path``; ``what`` names the locked thing in messages."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: bool = False, on_wait=None) -> None:
        """Take the lock; without ``wait`` a held lock raises :class:`CacheLockedError` at once."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = describe_holder(read_holder(self.path))
                if not wait:
                    raise CacheLockedError(
                        f"{self.what} is being written by {holder} (lock {self.path}); "
                        "wait for it to finish or pass --wait") from None
                if on_wait is not None:
                    on_wait(f"waiting for {self.what}, written by {holder}")
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise CacheError(f"{self.path}: this file system cannot lock files ({e.strerror}); "
                                 f"pass --no-lock (or set {NO_LOCK_ENV}=1) and run one writer at a time") from e
            raise CacheError(f"{self.path}: cannot take the write lock ({e.strerror})") from e
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "job": job_id(),
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # the lock holds without its description

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor drops the flock

    def __del__(self):
        self.release()


def check_job_holds(path: str | os.PathLike, what: str) -> None:
    """For torchrun ranks > 0: the lock must be held by rank 0 of this same job."""
    holder = read_holder(Path(path))
    mine = job_id()
    if not mine or holder.get("job") != mine:
        raise CacheLockedError(f"{what}: the write lock {path} is not held by this job's rank 0 "
                               f"(held by {describe_holder(holder)})")
