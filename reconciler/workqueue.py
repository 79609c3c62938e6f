"""A keyed work queue (controller-runtime's): one name is never handled twice at once, wake-ups collapse.

`add(name)` while the name is being handled marks it dirty: it runs once more afterwards, however
many wake-ups arrived meanwhile. `add_after(name, delay)` keeps only the earliest pending timer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


class WorkQueue:
    def __init__(self, handler: Callable[[str], Awaitable[None]]) -> None:
        self._handler = handler
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
                try:
                    await self._handler(name)
                except asyncio.CancelledError:
                    raise
                except Exception:    # a bug in one name must not stop the others
                    log.exception("reconcile of %s failed", name)
                if name not in self._dirty:
                    return
        finally:
            self._running.pop(name, None)
            if not self._running:
                self._idle.set()

    @property
    def idle(self) -> bool:
        return not self._running

    def pending_timer(self, name: str) -> float | None:
        timer = self._timers.get(name)
        return timer.when() if timer is not None else None

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
