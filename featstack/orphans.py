"""Worker processes that do not outlive the command that started them.

A killed ``featstack bench`` (SIGKILL, an OOM kill, a closed terminal) used to leave its joblib
(loky) workers running, re-parented to init, until their current fit ended and loky's idle
timeout passed: minutes of two busy cores on a shared machine. The command marks itself as the
parent before its workers start; each worker, on its first task, starts a daemon thread that
exits the process as soon as that parent is gone. Only processes started by a featstack command
watch: the command itself keeps running when *its* parent shell goes away (``nohup`` stays valid).
"""
from __future__ import annotations

import os
import threading

PARENT_ENV = "FEATSTACK_WORKER_PARENT"
_POLL_SECONDS = 0.5
_watching = False
_lock = threading.Lock()


def mark_parent() -> None:
    """Record this process as the parent of the workers it is about to start (they inherit the
    environment when loky spawns them)."""
    os.environ[PARENT_ENV] = str(os.getpid())


def exit_with_parent() -> None:
    """In a worker process started by a featstack command: exit as soon as that command is gone.
    A no-op in the command's own process, in unrelated processes and after the first call."""
    global _watching
    want = os.environ.get(PARENT_ENV, "")
    if _watching or not want.isdigit():
        return
    parent = int(want)
    if parent == os.getpid() or parent != os.getppid():
        return
    with _lock:
        if _watching:
            return
        _watching = True
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="featstack-exit-with-parent").start()


def _watch(parent: int) -> None:
    # The parent's death re-parents us (getppid changes); polling the kernel is the portable way
    # to notice (PR_SET_PDEATHSIG follows the spawning *thread*, which loky may retire).
    stop = threading.Event()
    while os.getppid() == parent:
        stop.wait(_POLL_SECONDS)
    os._exit(1)
