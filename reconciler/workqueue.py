"""A keyed work queue (controller-runtime's): one name is never handled twice at once, wake-ups collapse.

`add(name)` while the name is being handled marks it dirty: it runs once more afterwards, however
many wake-ups arrived meanwhile. `add_after(name, delay)` keeps only the earliest pending timer.

The handler returns when the name wants handling again (seconds, or None): the queue schedules it. A
handler that raises (a bug: every expected failure is a result) is logged and its name tried again
with per-name exponential backoff (1 s doubling to 60 s), forgotten at its next success, as
controller-runtime's rate-limited queue does; before, such a name waited for the next resync.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from reconciler.backoff import exponential

log = logging.getLogger(__name__)

FAILURE_BACKOFF_INITIAL = 1.0
FAILURE_BACKOFF_MAX = 60.0


class WorkQueue:
    def __init__(self, handler: Callable[[str], Awaitable[float | None]]) -> None:
        self._handler = handler
        self._failures: dict[str, int] = {}     # handler exceptions in a row, by name
        self._running: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        if name in self._running:
            self._dirty.add(name)
            return
        self._idle.clear()
        self._running[name] = asyncio.get_running_loop().create_task(self._run(name), name=f"reconcile:{name}")

    def add_after(self, name: str, delay: float) -> None:
        if delay <= 0:
            self.add(name)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        existing = self._timers.get(name)
        if existing is not None and existing.when() <= when:
            return
        if existing is not None:
            existing.cancel()
        self._timers[name] = loop.call_at(when, self._fire, name)

    def _fire(self, name: str) -> None:
        self._timers.pop(name, None)
        self.add(name)

    async def _run(self, name: str) -> None:
        try:
            while True:
                self._dirty.discard(name)
                requeue_after: float | None
                try:
                    requeue_after = await self._handler(name)
                    self._failures.pop(name, None)
                except asyncio.CancelledError:
                    raise
                except Exception:    # a bug in one name must not stop the others
                    failures = self._failures[name] = self._failures.get(name, 0) + 1
                    requeue_after = exponential(failures, FAILURE_BACKOFF_INITIAL, FAILURE_BACKOFF_MAX)
                    log.exception("reconcile of %s failed (%d in a row; again in %.0fs)", name, failures,
                                  requeue_after)
                if requeue_after is not None and requeue_after <= 0:
                    await asyncio.sleep(0)       # "again now": another pass, after the others had their turn
                    continue
                if name not in self._dirty:
                    if requeue_after is not None:
                        self.add_after(name, requeue_after)
                    return
        finally:
            self._running.pop(name, None)
            if not self._running:
                self._idle.set()

    @property
    def idle(self) -> bool:
        return not self._running

    def failures(self, name: str) -> int:
        """Handler exceptions in a row for the name (0 once it succeeded)."""
        return self._failures.get(name, 0)

    async def wait_idle(self) -> None:
        """Until nothing is being handled (timers may still be pending)."""
        while self._running:
            self._idle.clear()
            await self._idle.wait()

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
