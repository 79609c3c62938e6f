"""disk/du (Mesos isolators/posix/disk.cpp, "posix/disk"): each sandbox's disk usage, measured the way
`du -s` counts it, every --container_disk_watch_interval; over its `disk` resource, a container is
destroyed with a DiskLimitation when --enforce_container_disk_quota is on.

reconciler.diskusage measures (walk, watch, schedule), in a child process of the agent (process);
this module keeps each container's limit and last figure, and judges each figure that arrives in the
loop: the status file's `disk` block (disk_status) and the limit. Unlike Mesos, every sandbox is
measured, not only those with a `disk` resource: usage is worth seeing without a limit. Nothing is
reported until the first measurement ends; `reconciler once`, which ends long before that, has the
sandboxes measured at once (`measure_unmeasured`) to publish and enforce as the daemon does.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reconciler.diskusage.process import MeasuringClient
from reconciler.diskusage.schedule import TrackedSandbox, measure_sandboxes
from reconciler.diskusage.walk import DiskUsage
from reconciler.isolators.base import (
    ContainerConfig,
    ContainerState,
    Isolator,
    LaunchInfo,
    Limitation,
    LimitationCallback,
)
from reconciler.isolators.disk_status import DiskStatus, status_news
from reconciler.units import MB, format_bytes, megabytes_to_bytes

if TYPE_CHECKING:
    from reconciler.config import AgentConfig
    from reconciler.models import Resources

log = logging.getLogger(__name__)


@dataclass
class _Tracked(TrackedSandbox):
    """A container's sandbox as the isolator knows it: its limit, its last figure and what the status shows."""
    limit_bytes: int | None
    used_bytes: int | None = None
    checked_at: float | None = None
    entries: int = 0
    limited: bool = False
    on_limitation: LimitationCallback | None = None
    shown: DiskStatus | None = None        # what the status file's `disk` block says


class DiskDuIsolator(Isolator):
    """Per container: what is measured (the sandbox), its limit and its last figure. The measuring itself
    happens in a child process, started at the first watch; its results arrive in the loop."""

    def __init__(self, config: "AgentConfig") -> None:
        super().__init__(config)
        self.enforce = config.enforce_container_disk_quota
        self.interval = config.container_disk_watch_interval
        self.tracked: dict[str, _Tracked] = {}
        self.measuring = MeasuringClient(self.interval, self._result)
        self.measurements = 0

    @staticmethod
    def _limit(config: ContainerConfig) -> int | None:
        disk = config.spec.resources.disk
        return megabytes_to_bytes(disk) if disk is not None else None

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        for state in states:
            config = state.config
            if config.container_id not in self.tracked:
                self.tracked[config.container_id] = _Tracked(config.container_id, config.sandbox, self._limit(config))

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        if container_id not in self.tracked:
            self.tracked[container_id] = _Tracked(container_id, config.sandbox, self._limit(config))
        return None

    def watch_limit(self, container_id: str, on_limitation: LimitationCallback,
                    loop: asyncio.AbstractEventLoop) -> None:
        tracked = self.tracked.get(container_id)
        if tracked is None or tracked.scheduled:
            return
        tracked.on_limitation, tracked.scheduled = on_limitation, True
        self.measuring.add(container_id, tracked.sandbox, loop)

    def update(self, container_id: str, resources: "Resources") -> None:
        tracked = self.tracked.get(container_id)
        if tracked is None:
            return
        tracked.limit_bytes = megabytes_to_bytes(resources.disk) if resources.disk is not None else None
        tracked.limited = False          # judged again against the new limit at the next measurement
        self._show(tracked)

    def _result(self, doc: dict[str, Any]) -> None:
        """In the loop: one measurement arrived."""
        tracked = self.tracked.get(doc.get("id", ""))
        if tracked is None:
            return                       # cleaned up meanwhile
        self.measurements += 1
        tracked.last_duration = doc.get("secs", 0.0)
        self._measured(tracked, DiskUsage(int(doc["used"]), int(doc["entries"])), float(doc["at"]))

    def _measured(self, tracked: _Tracked, usage: DiskUsage, at: float) -> None:
        tracked.used_bytes, tracked.entries, tracked.checked_at = usage.used_bytes, usage.entries, at
        self._show(tracked)
        limit = tracked.limit_bytes
        if not self.enforce or limit is None or usage.used_bytes <= limit or tracked.limited:
            return
        tracked.limited = True
        message = f"Disk usage ({format_bytes(usage.used_bytes)}) exceeds quota ({format_bytes(limit)})"
        limitation = Limitation(reason="DiskLimitation", message=message, resources={"disk": round(limit / MB, 6)})
        log.info("Container %s: %s", tracked.container_id, message)
        if tracked.on_limitation is not None:
            tracked.on_limitation(limitation)

    async def measure_unmeasured(self) -> int:
        """Measure now every watched sandbox that has no figure yet, and judge it against its limit as a
        periodic measurement would (status block, DiskLimitation); returns how many got a figure.

        For `reconciler once`, which ends long before the measuring process's first figure (a second
        after the watch at the soonest). In a thread: the loop keeps handling exits meanwhile."""
        due = [t for t in self.tracked.values() if t.scheduled and t.checked_at is None]
        if not due:
            return 0
        figures = await asyncio.to_thread(measure_sandboxes, [t.sandbox for t in due])
        measured = 0
        for tracked, figure in zip(due, figures, strict=True):
            if figure is None or self.tracked.get(tracked.container_id) is not tracked:
                continue                 # gone, or cleaned up while it was measured
            usage, at = figure
            self.measurements += 1
            self._measured(tracked, usage, at)
            measured += 1
        return measured

    def usage(self, container_id: str) -> dict[str, float | int]:
        tracked = self.tracked.get(container_id)
        if tracked is None:
            return {}
        stats: dict[str, float | int] = {}
        if tracked.limit_bytes is not None:
            stats["disk_limit_bytes"] = tracked.limit_bytes
        if tracked.used_bytes is not None:
            stats["disk_used_bytes"] = tracked.used_bytes
        return stats

    def _show(self, tracked: _Tracked) -> None:
        if tracked.used_bytes is None or tracked.checked_at is None:
            return
        now = DiskStatus(tracked.used_bytes, tracked.limit_bytes, tracked.checked_at,
                         bool(self.enforce and tracked.limit_bytes is not None))
        if status_news(tracked.shown, now):
            tracked.shown = now
            self.observer.isolator_status_changed(tracked.container_id)

    def status(self, container_id: str) -> dict[str, Any]:
        tracked = self.tracked.get(container_id)
        if tracked is None or tracked.shown is None:
            return {}
        return tracked.shown.block()

    def cleanup(self, container_id: str) -> None:
        if self.tracked.pop(container_id, None) is not None:
            self.measuring.remove(container_id)     # a walk of it under way stops at its next directory

    def agent_status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"watch_interval_secs": self.interval, "enforce_container_disk_quota": self.enforce,
                               "sandboxes_tracked": len(self.tracked), "measurements": self.measurements}
        if self.measuring.pid is not None:
            doc["measuring_pid"] = self.measuring.pid
        if self.measuring.restarts:
            doc["measuring_restarts"] = self.measuring.restarts
        return doc

    def close(self) -> None:
        self.measuring.close()
