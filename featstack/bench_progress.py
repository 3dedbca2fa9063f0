"""The bench's progress bar: it moves during long fits and says which cell is slow.

One tick per task left the bar at 0/5 with no ETA for ten minutes when one fit took minutes.
Here every task (in this process, in a loky worker or in a local dask worker) writes a tiny
heartbeat file when it starts and after each fit; a timer thread in the caller reads them every
second and sets the bar to the fits done (plus the elapsed part of each running fit, from the
measured time of fits like it), an ETA from measured per-fit times of the same kind of fit
(head, stage, feature width), and names the task that has been running longest once it has run
for :data:`LONG_TASK_S`. Files work alike for every backend and cost one small write per task and
per fit (at most every :data:`BEAT_EVERY_S`); a worker that cannot write there (a remote dask
worker) just stays silent, and the bar then moves per task.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

REFRESH_S = 1.0     # how often the bar is redrawn from the heartbeats
BEAT_EVERY_S = 0.5  # a task rewrites its heartbeat at most this often (always when it starts)
LONG_TASK_S = 60.0  # a task running longer than this is named on the bar
RUNNING_CAP = 0.95  # a running fit counts for at most this fraction of a fit until it ends


@dataclass
class Heartbeat:
    """What one running task tells the bar: "start fits fit_seconds last_fit_end" in a file."""

    folder: str | None
    name: str
    every: float = BEAT_EVERY_S
    _state: list = field(default_factory=lambda: [0.0, 0, 0.0, 0.0, 0.0])  # start, fits, fit s, last end, last write

    def start(self) -> None:
        now = time.time()
        self._state[:] = [now, 0, 0.0, now, 0.0]
        self._write(now, force=True)

    def fit(self, seconds: float) -> None:
        now = time.time()
        st = self._state
        st[1] += 1
        st[2] += seconds
        st[3] = now
        self._write(now)

    def _write(self, now: float, force: bool = False) -> None:
        st = self._state
        if self.folder is None or (not force and now - st[4] < self.every):
            return
        st[4] = now
        path = os.path.join(self.folder, self.name)
        try:
            with open(path + ".tmp", "w") as fh:
                fh.write(f"{st[0]!r} {st[1]} {st[2]!r} {st[3]!r}")
            os.replace(path + ".tmp", path)
        except OSError:  # not this machine's folder (remote worker) or gone (bench finished)
            self.folder = None


@dataclass
class _Task:
    label: str      # what the bar names when the task runs long
    units: int      # fits (bar ticks) the task makes
    kind: tuple     # fits of one kind take about as long: (head, stage, feature width)
    width: int      # feature columns a fit of this task sees (to scale a neighbour's time)


class BenchProgress:
    """The bar of one bench run; a context manager (the timer thread and the heartbeat folder
    live inside it). ``workers``: tasks running at once, for the ETA."""

    def __init__(self, total: int, workers: int, enabled: bool = True, refresh_s: float | None = None,
                 long_task_s: float | None = None):
        from tqdm.auto import tqdm

        self.workers = max(1, workers)
        self.enabled = enabled
        self.refresh_s = REFRESH_S if refresh_s is None else refresh_s
        self.long_task_s = LONG_TASK_S if long_task_s is None else long_task_s
        self.bar = tqdm(total=total, desc="bench", unit="fit", disable=not enabled, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} fits [{elapsed}{postfix}]")
        self.folder = tempfile.mkdtemp(prefix="featstack-bench-") if enabled else None
        self.tasks: dict[str, _Task] = {}
        self.finished: set[str] = set()
        self.done_units = 0
        self.measured: dict[tuple, list] = {}   # kind -> [seconds, fits] of finished tasks
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="featstack-bench-progress", daemon=True)

    # ---- the caller's side
    def __enter__(self) -> "BenchProgress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if not any(exc):
            self.refresh()
        self.bar.close()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def heartbeat(self, label: str, units: int, kind: tuple, width: int) -> Heartbeat:
        """A new task's heartbeat (what the task is, how many fits it makes, which kind)."""
        name = str(len(self.tasks))
        self.tasks[name] = _Task(label, units, kind, width)
        return Heartbeat(self.folder, name)

    def drop(self, units: int) -> None:
        """Planned fits that will not run (their cell failed before them)."""
        with self._lock:
            self.bar.total -= units

    def finish(self, beat: Heartbeat, fit_seconds: float | None) -> None:
        """A task's result arrived: its fits are done; ``fit_seconds`` (None for a failed task)
        is what they took, for the ETA of the fits of the same kind still to come."""
        task = self.tasks[beat.name]
        with self._lock:
            self.finished.add(beat.name)
            self.done_units += task.units
            if fit_seconds is not None and task.units:
                m = self.measured.setdefault(task.kind, [0.0, 0])
                m[0] += fit_seconds
                m[1] += task.units
        if self.folder:
            try:
                os.remove(os.path.join(self.folder, beat.name))
            except OSError:
                pass
        if not self.enabled:
            return
        if self._thread.is_alive():
            with self._lock:
                self.bar.n = max(self.bar.n, self.done_units)  # the timer thread redraws
        else:
            self.refresh()

    # ---- the timer thread
    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def _beats(self) -> dict[str, tuple]:
        out = {}
        try:
            names = os.listdir(self.folder) if self.folder else []
        except OSError:
            return out
        for name in names:
            if name.endswith(".tmp"):
                continue
            try:
                with open(os.path.join(self.folder, name)) as fh:
                    start, fits, fit_s, last = fh.read().split()
                out[name] = (float(start), int(fits), float(fit_s), float(last))
            except (OSError, ValueError):
                continue  # replaced or removed while reading: the next refresh sees it
        return out

    def state(self, now: float | None = None) -> tuple[float, float | None, tuple[str, float] | None]:
        """(fits done, counting the elapsed part of running fits; ETA in seconds or None;
        (label, seconds) of the longest-running task, or None)."""
        now = time.time() if now is None else now
        beats = self._beats()
        with self._lock:
            running = {n: b for n, b in beats.items() if n in self.tasks and n not in self.finished}
            measured = {k: list(v) for k, v in self.measured.items()}
            for n, (_, fits, fit_s, _) in running.items():  # running tasks' finished fits count too
                if fits:
                    m = measured.setdefault(self.tasks[n].kind, [0.0, 0])
                    m[0] += fit_s
                    m[1] += fits
            done = float(self.done_units)
            per_fit: dict[tuple, float | None] = {}  # one estimate per kind of fit, not per task
            fits_left: dict[tuple, float] = {}
            for n, task in self.tasks.items():
                if n in self.finished:
                    continue
                if task.kind not in per_fit:
                    per_fit[task.kind] = estimate_fit_seconds(measured, task.kind, task.width)
                est = per_fit[task.kind]
                units = float(task.units)
                if n in running:
                    _, fits, _, last = running[n]
                    part = min(RUNNING_CAP, (now - last) / est) if est else 0.0
                    done += fits + part
                    units = max(0.0, units - fits - part)
                fits_left[task.kind] = fits_left.get(task.kind, 0.0) + units
            unknown = any(per_fit[k] is None for k in fits_left)
            left = sum(fits_left[k] * per_fit[k] for k in fits_left if per_fit[k] is not None)
            n_open = len(self.tasks) - len(self.finished) or 1
        eta = None if unknown or not measured else left / min(self.workers, n_open)
        longest = None
        if running:
            name, beat = min(running.items(), key=lambda nb: nb[1][0])
            if now - beat[0] >= self.long_task_s:
                longest = (self.tasks[name].label, now - beat[0])
        return done, eta, longest

    def refresh(self) -> None:
        if not self.enabled:
            return
        try:
            done, eta, longest = self.state()
        except Exception:  # noqa: BLE001 - an estimate must never cost the grid its results
            done, eta, longest = self.done_units, None, None
        parts = [f"ETA {_clock(eta)}" if eta is not None else "ETA measuring"]
        if longest:
            parts.append(f"running {_clock(longest[1])}: {longest[0]}")
        with self._lock:
            self.bar.n = min(max(done, self.done_units), self.bar.total)
            self.bar.set_postfix_str(", ".join(parts), refresh=False)
            self.bar.refresh()


def estimate_fit_seconds(measured: dict, kind: tuple, width: int) -> float | None:
    """Expected seconds of one fit of ``kind`` (head, stage, feature width): the mean of the
    measured fits of that kind; else the same head and stage measured at other widths, scaled
    by the width; else any measured fit of that head, scaled; else None (not measured yet)."""
    m = measured.get(kind)
    if m and m[1]:
        return m[0] / m[1]
    for same in (lambda k: k[:2] == kind[:2], lambda k: k[0] == kind[0]):
        near = [(k, v) for k, v in measured.items() if same(k) and v[1]]
        if near:
            per_col = sum(v[0] for _, v in near) / sum(v[1] * max(1, k[2]) for k, v in near)
            return per_col * max(1, width)
    return None


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
