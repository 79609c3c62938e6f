"""When sandboxes are measured: `DiskUsageCollector` measures each one again `interval` after its last
measurement ended, one at a time, earliest due first (Mesos runs one `du` at a time too), in one
thread; `measure_sandboxes` measures a list of them at once (`reconciler once`).

With an inotify instance the collector measures a sandbox incrementally (watch.TreeUsage); without,
by a full walk each time. Removing a sandbox drops it from the schedule and cancels a walk of it under
way (checked between directories).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from dataclasses import KW_ONLY, dataclass
from typing import Callable

from reconciler.diskusage.mounts import MountTable
from reconciler.diskusage.walk import Cancelled, DiskUsage, du_measure
from reconciler.diskusage.watch import Inotify, TreeUsage

log = logging.getLogger(__name__)


@dataclass
class TrackedSandbox:
    """A sandbox on the schedule, named by its container's id."""
    container_id: str
    sandbox: str
    _: KW_ONLY
    last_duration: float = 0.0
    cancelled: bool = False
    scheduled: bool = False
    tree: TreeUsage | None = None          # the collector thread's incremental view of the sandbox


class DiskUsageCollector:
    """One thread; each tracked sandbox is measured again `interval` after its last measurement ended.

    With `inotify`, a sandbox is measured incrementally (TreeUsage); without, by a full walk each time.
    """

    def __init__(self, interval: float, on_measured: Callable[[TrackedSandbox, DiskUsage], None],
                 mounts: MountTable | None = None, inotify: Inotify | None = None) -> None:
        self.interval = interval
        self.on_measured = on_measured
        self.mounts = mounts
        self.inotify = inotify
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, TrackedSandbox]] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.current: TrackedSandbox | None = None     # under measurement now
        self.measurements = 0

    def add(self, tracked: TrackedSandbox, delay: float = 0.0) -> None:
        with self._cond:
            if tracked.scheduled or tracked.cancelled:
                return
            tracked.scheduled = True
            self._push(tracked, time.monotonic() + delay)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="disk-du", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, tracked: TrackedSandbox) -> None:
        """Never measured again; a walk of it under way stops at its next directory."""
        with self._cond:
            tracked.cancelled = True
            self._cond.notify()

    def _push(self, tracked: TrackedSandbox, due: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, tracked))

    def _next_batch(self) -> list[TrackedSandbox] | None:
        """Wait for the earliest due sandbox; take it with every other one due within `slack`, so that
        200 sandboxes on a 1 s interval wake the thread a few times a second, not 200."""
        with self._cond:
            while not self._stopped:
                while self._heap and self._heap[0][2].cancelled:
                    self._forget(heapq.heappop(self._heap)[2])
                if not self._heap:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if self._heap[0][0] > now:
                    self._cond.wait(self._heap[0][0] - now)
                    continue
                horizon = now + min(0.1, self.interval / 10)
                batch = []
                while self._heap and self._heap[0][0] <= horizon:
                    tracked = heapq.heappop(self._heap)[2]
                    if tracked.cancelled:
                        self._forget(tracked)
                    else:
                        batch.append(tracked)
                if batch:
                    return batch
        return None

    @staticmethod
    def _forget(tracked: TrackedSandbox) -> None:
        tracked.scheduled = False
        if tracked.tree is not None:
            tracked.tree.close()           # its watches go
            tracked.tree = None

    def _measure(self, tracked: TrackedSandbox) -> DiskUsage:
        excludes = self.mounts.below(tracked.sandbox) if self.mounts is not None else []
        cancelled = lambda: tracked.cancelled  # noqa: E731
        if self.inotify is None:
            return du_measure(tracked.sandbox, excludes, cancelled)
        if tracked.tree is None:
            tracked.tree = TreeUsage(tracked.sandbox, self.inotify)
        return tracked.tree.measure(excludes, cancelled, drain=False)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if self.inotify is not None:
                self.inotify.drain()       # once for the whole batch
            for tracked in batch:
                self._measure_one(tracked)

    def _measure_one(self, tracked: TrackedSandbox) -> None:
        with self._cond:
            if tracked.cancelled:
                self._forget(tracked)
                return
            self.current = tracked
        started = time.monotonic()
        try:
            usage: DiskUsage | None = self._measure(tracked)
        except Cancelled:
            usage = None
        except FileNotFoundError:
            usage = None     # not created yet, or already removed
        except Exception as exc:  # noqa: BLE001 - one bad sandbox must not stop the others
            log.warning("Failed to measure the disk usage of %s: %s", tracked.sandbox, exc)
            usage = None
        tracked.last_duration = time.monotonic() - started
        with self._cond:
            self.current = None
            if usage is not None and not tracked.cancelled:
                self.measurements += 1
                try:
                    self.on_measured(tracked, usage)
                except Exception:
                    log.exception("disk/du: handling the measurement of %s failed", tracked.sandbox)
            if not tracked.cancelled:
                self._push(tracked, time.monotonic() + self.interval)
            else:
                self._forget(tracked)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


def measure_sandboxes(sandboxes: list[str]) -> list[tuple[DiskUsage, float] | None]:
    """Each sandbox's usage now, by a full walk (GNU du, as Mesos measures), with the moment it ended; None for
    a sandbox that is gone or could not be measured. Blocking: run it in a thread."""
    try:
        mounts: MountTable | None = MountTable()
    except OSError:
        mounts = None            # volumes are then excluded only when they are on another device
    figures: list[tuple[DiskUsage, float] | None] = []
    try:
        for sandbox in sandboxes:
            try:
                usage = du_measure(sandbox, mounts.below(sandbox) if mounts is not None else [])
            except FileNotFoundError:
                usage = None
            except OSError as exc:
                log.warning("Failed to measure the disk usage of %s: %s", sandbox, exc)
                usage = None
            figures.append(None if usage is None else (usage, time.time()))
    finally:
        if mounts is not None:
            mounts.close()
    return figures
