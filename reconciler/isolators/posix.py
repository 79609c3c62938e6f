"""posix/cpu and posix/mem: no isolation, usage from the container's process tree (Mesos isolators/posix.hpp).

Mesos walks the tree under the init pid for each container. Reading every /proc/<pid>/stat once
per pass and sharing that table between containers keeps a pass over hundreds of containers cheap.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from reconciler.container import ContainerState
from reconciler.isolators.base import Isolator
from reconciler.linux import proc

if TYPE_CHECKING:
    from reconciler.config import AgentConfig

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TABLE_TTL = 0.5


class _SharedProcessTable:
    """One snapshot of /proc serves every container's usage within a short window."""

    def __init__(self) -> None:
        self._taken = 0.0
        self._table: dict[int, proc.ProcStat] = {}

    def get(self) -> dict[int, proc.ProcStat]:
        now = time.monotonic()
        if now - self._taken > _TABLE_TTL:
            self._table = proc.process_table()
            self._taken = now
        return self._table


_TABLE = _SharedProcessTable()


class _PosixIsolator(Isolator):
    def __init__(self, config: AgentConfig) -> None:
        super().__init__(config)
        self.pids: dict[str, int] = {}

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        for state in states:
            if state.pid is not None:
                self.pids[state.config.container_id] = state.pid

    def isolate(self, container_id: str, pid: int) -> None:
        self.pids[container_id] = pid

    def cleanup(self, container_id: str) -> None:
        self.pids.pop(container_id, None)

    def _tree(self, container_id: str) -> list[proc.ProcStat]:
        pid = self.pids.get(container_id)
        if pid is None:
            return []
        table = _TABLE.get()
        if pid not in table:
            return []
        return [table[p] for p in (proc.descendants(table, pid) | {pid}) if p in table]


class PosixCpuIsolator(_PosixIsolator):
    def usage(self, container_id: str) -> dict[str, float | int]:
        tree = self._tree(container_id)
        if not tree:
            return {}
        return {
            "cpus_user_time_secs": round(sum(p.utime for p in tree) / _CLK_TCK, 3),
            "cpus_system_time_secs": round(sum(p.stime for p in tree) / _CLK_TCK, 3),
            "processes": len(tree),
            "threads": sum(p.threads for p in tree),
        }


class PosixMemIsolator(_PosixIsolator):
    def usage(self, container_id: str) -> dict[str, float | int]:
        tree = self._tree(container_id)
        if not tree:
            return {}
        return {"mem_rss_bytes": sum(p.rss_pages for p in tree) * _PAGE}
