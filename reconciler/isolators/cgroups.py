"""cgroups/cpu and cgroups/mem (Mesos isolators/cgroups/subsystems/{cpu,cpuacct,memory}.cpp, and cgroups2).

Each container gets `<hierarchy>/<cgroups_root>/<container_id>` in the hierarchies of its
controllers: on cgroups v1 one per controller (cpu and cpuacct may be separate hierarchies), on
cgroups v2 the one cgroup of the unified tree, created with the controller enabled above it.
Resources are applied in `prepare` (before the init exists) and again on every `update`; the init
is moved in by `isolate` before it runs anything, so everything the command forks is inside.

Numbers are Mesos's: cpu.shares = 1024 per cpu (at least 2), CFS quota over a 100 ms period (at
least 1 ms), memory at least 32 MB. Unset resources mean unlimited. The kernel OOM killer stays
on; an OOM in the container's cgroup becomes a `MemoryLimit` limitation, and the containerizer
destroys the container.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import TYPE_CHECKING, Callable

from reconciler.container import ContainerConfig, ContainerState
from reconciler.isolators.base import (
    Isolator,
    IsolatorSetupError,
    LaunchInfo,
    Limitation,
    LimitationCallback,
    PermanentError,
)
from reconciler.linux import cgroups, inotify
from reconciler.linux.cgroups import CgroupMounts, Hierarchy

if TYPE_CHECKING:
    from reconciler.config import AgentConfig
    from reconciler.models import Resources

log = logging.getLogger(__name__)

CPU_SHARES_PER_CPU = 1024
MIN_CPU_SHARES = 2
CPU_CFS_PERIOD_US = 100_000
MIN_CPU_CFS_QUOTA_US = 1_000
MIN_MEMORY_BYTES = 32 * 1024 * 1024
_MB = 1024 * 1024
_USER_HZ = os.sysconf("SC_CLK_TCK")
# How often cgroup v2 memory.events is re-read when inotify is not available.
_OOM_POLL_SECONDS = 0.1


def cpu_shares(cpus: float | None) -> int:
    """Mesos: max(1024 × cpus, 2); unset cpus keeps the kernel's default weight."""
    if cpus is None:
        return CPU_SHARES_PER_CPU
    return max(int(CPU_SHARES_PER_CPU * cpus), MIN_CPU_SHARES)


def cfs_quota_us(cpus: float | None) -> int:
    """Mesos: max(100 ms × cpus, 1 ms) per 100 ms period; -1 (unlimited) when cpus is unset."""
    if cpus is None:
        return -1
    return max(int(CPU_CFS_PERIOD_US * cpus), MIN_CPU_CFS_QUOTA_US)


def cpu_weight(shares: int) -> int:
    """cgroup v2 cpu.weight from v1 shares, as runc converts them ([2, 262144] → [1, 10000])."""
    return 1 + ((shares - 2) * 9999) // 262142


def memory_limit_bytes(mem_mb: float | None) -> int | None:
    """Mesos: at least 32 MB; None means unlimited."""
    if mem_mb is None:
        return None
    return max(int(round(mem_mb * _MB)), MIN_MEMORY_BYTES)


def format_mb(value: float) -> str:
    """64.0 → "64MB", 63.5 → "63.5MB" (the Mesos message speaks megabytes)."""
    return f"{round(value, 2):g}MB"


def _parse_flat_keyed(text: str) -> dict[str, int]:
    """ "key value" lines (cpu.stat, memory.stat, memory.events, oom_control) → {key: int}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def _require(mounts: CgroupMounts, isolator: str, controller: str) -> Hierarchy:
    hierarchy = cgroups.hierarchy_for(mounts, controller)
    if hierarchy is None:
        raise IsolatorSetupError(
            f"flag --isolation: {isolator} needs the {controller} cgroup controller, which is not mounted")
    return hierarchy


class _CgroupsIsolator(Isolator):
    """What both isolators share: one cgroup per container in each of their hierarchies."""

    def __init__(self, config: "AgentConfig") -> None:
        super().__init__(config)
        self.root = config.cgroups_root.strip("/")
        self.hierarchies: list[Hierarchy] = []        # distinct, primary first
        self.controllers: frozenset[str] = frozenset()  # what to enable on v2

    @property
    def primary(self) -> Hierarchy:
        return self.hierarchies[0]

    def cgroup(self, container_id: str) -> str:
        return f"{self.root}/{container_id}"

    def _known(self, container_id: str) -> bool:
        return self.primary.exists(self.cgroup(container_id))

    def _create(self, container_id: str) -> None:
        for hierarchy in self.hierarchies:
            controllers = self.controllers if hierarchy.version == 2 else None
            hierarchy.create(self.cgroup(container_id), controllers=controllers)

    def isolate(self, container_id: str, pid: int) -> None:
        for hierarchy in self.hierarchies:
            if not hierarchy.exists(self.cgroup(container_id)):
                raise RuntimeError(f"Failed to isolate container {container_id}: cgroup "
                                   f"{hierarchy.path(self.cgroup(container_id))} does not exist (prepare did not run)")
            hierarchy.attach(self.cgroup(container_id), pid)

    def cleanup(self, container_id: str) -> None:
        # The launcher has killed every process already; only the (empty) cgroups are left.
        for hierarchy in self.hierarchies:
            hierarchy.remove(self.cgroup(container_id))

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        """Unknown orphans (MESOS-2367): cgroups under our root that no checkpoint owns are killed and removed.

        Known orphans are left to the containerizer, which kills them through the launcher
        (freezer or cgroup.kill) and then calls cleanup.
        """
        known = {state.config.container_id for state in states} | orphans
        for hierarchy in self.hierarchies:
            cgroups.remove_children_except(hierarchy, self.root, known)

    def _read(self, hierarchy: Hierarchy, container_id: str, control: str) -> str | None:
        try:
            return hierarchy.read(self.cgroup(container_id), control)
        except FileNotFoundError:
            return None


# --------------------------------------------------------------------------------------------
# cgroups/cpu
# --------------------------------------------------------------------------------------------

class CgroupsCpuIsolator(_CgroupsIsolator):
    """cpu.shares and CFS quota (v2: cpu.weight and cpu.max); cpu time, throttling and process counts."""

    def __init__(self, config: "AgentConfig", mounts: CgroupMounts | None = None) -> None:
        super().__init__(config)
        mounts = mounts if mounts is not None else cgroups.find_mounts()
        self.cpu = _require(mounts, "cgroups/cpu", "cpu")
        # On v2 cpu.stat has the times; on v1 they are in cpuacct, which may be its own hierarchy.
        self.cpuacct = self.cpu if self.cpu.version == 2 else _require(mounts, "cgroups/cpu", "cpuacct")
        self.hierarchies = list(dict.fromkeys([self.cpu, self.cpuacct]))
        self.controllers = frozenset({"cpu"})

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        self._create(container_id)
        self._apply(container_id, config.spec.resources.cpus)
        return None

    def update(self, container_id: str, resources: "Resources") -> None:
        if not self._known(container_id):
            return
        self._apply(container_id, resources.cpus)

    def _apply(self, container_id: str, cpus: float | None) -> None:
        cgroup = self.cgroup(container_id)
        shares, quota = cpu_shares(cpus), cfs_quota_us(cpus)
        if self.cpu.version == 2:
            self.cpu.write(cgroup, "cpu.weight", cpu_weight(shares))
            self.cpu.write(cgroup, "cpu.max", f"{'max' if quota < 0 else quota} {CPU_CFS_PERIOD_US}")
            return
        self.cpu.write(cgroup, "cpu.shares", shares)
        self.cpu.write(cgroup, "cpu.cfs_period_us", CPU_CFS_PERIOD_US)
        self.cpu.write(cgroup, "cpu.cfs_quota_us", quota)

    def usage(self, container_id: str) -> dict[str, float | int]:
        stats: dict[str, float | int] = {}
        if self.cpu.version == 2:
            cpu_stat = self._read(self.cpu, container_id, "cpu.stat")
            if cpu_stat is None:
                return {}
            values = _parse_flat_keyed(cpu_stat)
            for key, field, scale in (
                ("user_usec", "cpus_user_time_secs", 1e-6),
                ("system_usec", "cpus_system_time_secs", 1e-6),
                ("nr_periods", "cpus_nr_periods", None),
                ("nr_throttled", "cpus_nr_throttled", None),
                ("throttled_usec", "cpus_throttled_time_secs", 1e-6),
            ):
                if key in values:
                    stats[field] = values[key] if scale is None else round(values[key] * scale, 6)
            threads_control = "cgroup.threads"
        else:
            acct = self._read(self.cpuacct, container_id, "cpuacct.stat")
            if acct is not None:
                values = _parse_flat_keyed(acct)
                if "user" in values and "system" in values:
                    stats["cpus_user_time_secs"] = round(values["user"] / _USER_HZ, 3)
                    stats["cpus_system_time_secs"] = round(values["system"] / _USER_HZ, 3)
            cpu_stat = self._read(self.cpu, container_id, "cpu.stat")
            if cpu_stat is not None:
                values = _parse_flat_keyed(cpu_stat)
                if "nr_periods" in values:
                    stats["cpus_nr_periods"] = values["nr_periods"]
                if "nr_throttled" in values:
                    stats["cpus_nr_throttled"] = values["nr_throttled"]
                if "throttled_time" in values:
                    stats["cpus_throttled_time_secs"] = round(values["throttled_time"] / 1e9, 6)
            threads_control = "tasks"
        procs = self._read(self.cpu, container_id, "cgroup.procs")
        if procs is not None:
            stats["processes"] = len(procs.split())
        threads = self._read(self.cpu, container_id, threads_control)
        if threads is not None:
            stats["threads"] = len(threads.split())
        return stats


# --------------------------------------------------------------------------------------------
# cgroups/mem
# --------------------------------------------------------------------------------------------

class CgroupsMemIsolator(_CgroupsIsolator):
    """memory limit (v1 limit_in_bytes + soft limit, v2 memory.max), usage, and OOM → MemoryLimit."""

    def __init__(self, config: "AgentConfig", mounts: CgroupMounts | None = None) -> None:
        super().__init__(config)
        mounts = mounts if mounts is not None else cgroups.find_mounts()
        self.memory = _require(mounts, "cgroups/mem", "memory")
        self.hierarchies = [self.memory]
        self.controllers = frozenset({"memory"})
        self.requested: dict[str, float | None] = {}     # mem MB as the manifest asks, for the OOM message
        self.watches: dict[str, _OomWatch] = {}

    @property
    def v2(self) -> bool:
        return self.memory.version == 2

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        for state in states:
            self.requested[state.config.container_id] = state.config.spec.resources.mem
        super().recover(states, orphans)

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        self._create(container_id)
        mem = config.spec.resources.mem
        self._write_limit(container_id, memory_limit_bytes(mem))
        self.requested[container_id] = mem
        return None

    def update(self, container_id: str, resources: "Resources") -> None:
        """Raise always; lower only above what the container uses now (Mesos never lowers at all)."""
        if not self._known(container_id):
            return
        new = memory_limit_bytes(resources.mem)
        current = self._limit(container_id)
        if new is not None and (current is None or new < current):
            used = self._usage_bytes(container_id)
            if used is not None and new < used:
                raise PermanentError(
                    f"cannot lower the memory limit to {format_mb(new / _MB)}: the container uses "
                    f"{format_mb(used / _MB)} now, and a limit below usage would have the kernel OOM-kill it. "
                    f"The limit stays {self._describe(current)}; set mem to at least {format_mb(used / _MB)}, "
                    "or change another field of the spec to replace the container with the lower limit")
        self._write_limit(container_id, new)
        self.requested[container_id] = resources.mem

    def _describe(self, limit: int | None) -> str:
        return "unlimited" if limit is None else format_mb(limit / _MB)

    def _write_limit(self, container_id: str, limit: int | None) -> None:
        cgroup = self.cgroup(container_id)
        if self.v2:
            self.memory.write(cgroup, "memory.max", "max" if limit is None else limit)
            return
        value = -1 if limit is None else limit
        try:
            self.memory.write(cgroup, "memory.limit_in_bytes", value)
        except OSError as exc:
            if exc.errno == errno.EBUSY:  # the kernel could not reclaim down to the new limit
                raise PermanentError(
                    f"cannot lower the memory limit to {self._describe(limit)}: the kernel could not reclaim the "
                    "container's memory below it; set mem higher") from None
            raise
        self.memory.write(cgroup, "memory.soft_limit_in_bytes", value)

    def _limit(self, container_id: str) -> int | None:
        """The hard limit in force; None when unlimited."""
        text = self._read(self.memory, container_id, "memory.max" if self.v2 else "memory.limit_in_bytes")
        if text is None or text.strip() == "max":
            return None
        value = int(text)
        return None if value >= (1 << 62) else value   # v1 shows "unlimited" as PAGE_COUNTER_MAX pages

    def _usage_bytes(self, container_id: str) -> int | None:
        text = self._read(self.memory, container_id, "memory.current" if self.v2 else "memory.usage_in_bytes")
        return None if text is None else int(text)

    def _max_usage_bytes(self, container_id: str) -> int | None:
        if self.v2:
            # memory.peak is Linux 5.19+; before that the current usage is the best we have.
            text = self._read(self.memory, container_id, "memory.peak")
            if text is not None:
                return int(text)
            return self._usage_bytes(container_id)
        text = self._read(self.memory, container_id, "memory.max_usage_in_bytes")
        return None if text is None else int(text)

    def usage(self, container_id: str) -> dict[str, float | int]:
        stats: dict[str, float | int] = {}
        total = self._usage_bytes(container_id)
        if total is None:
            return {}
        stats["mem_total_bytes"] = total
        stat_text = self._read(self.memory, container_id, "memory.stat")
        values = _parse_flat_keyed(stat_text or "")
        keys: tuple[tuple[str, str], ...]
        if self.v2:
            keys = (("anon", "mem_rss_bytes"), ("file", "mem_cache_bytes"),
                    ("file_mapped", "mem_mapped_file_bytes"), ("unevictable", "mem_unevictable_bytes"))
            swap = self._read(self.memory, container_id, "memory.swap.current")
            if swap is not None:
                stats["mem_swap_bytes"] = int(swap)
        else:
            # total_* include sub-cgroups, as Mesos reads them.
            keys = (("total_rss", "mem_rss_bytes"), ("total_cache", "mem_cache_bytes"),
                    ("total_mapped_file", "mem_mapped_file_bytes"), ("total_swap", "mem_swap_bytes"),
                    ("total_unevictable", "mem_unevictable_bytes"))
        for key, field in keys:
            if key in values:
                stats[field] = values[key]
        return stats

    # OOM ----------------------------------------------------------------------------------------
    def watch_limit(self, container_id: str, on_limitation: LimitationCallback,
                    loop: asyncio.AbstractEventLoop) -> None:
        if container_id in self.watches or not self._known(container_id):
            return
        fire = lambda: self._on_oom(container_id, on_limitation)  # noqa: E731
        cgroup = self.cgroup(container_id)
        watch: _OomWatch
        if self.v2:
            watch = _EventsFileWatch(self.memory, cgroup, loop, fire)
        else:
            watch = _EventFdWatch(self.memory, cgroup, loop, fire)
        self.watches[container_id] = watch

    def _on_oom(self, container_id: str, on_limitation: LimitationCallback) -> None:
        watch = self.watches.pop(container_id, None)
        if watch is not None:
            watch.close()
        requested = self.requested.get(container_id)
        max_used = self._max_usage_bytes(container_id)
        message = "Memory limit exceeded: "
        if requested is not None:
            message += f"Requested: {format_mb(requested)} "
        if max_used is not None:
            message += f"Maximum Used: {format_mb(max_used / _MB)}\n"
        stat_text = self._read(self.memory, container_id, "memory.stat")
        if stat_text is not None:
            message += f"\nMEMORY STATISTICS: \n{stat_text}"
        resources = {"mem": round(max_used / _MB, 2)} if max_used is not None else {}
        log.info("Container %s hit its memory limit (maximum used %s)", container_id,
                 "unknown" if max_used is None else format_mb(max_used / _MB))
        on_limitation(Limitation(reason="MemoryLimit", message=message, resources=resources))

    def cleanup(self, container_id: str) -> None:
        watch = self.watches.get(container_id)
        if watch is not None:
            # An OOM whose notice is still unread (the init's exit was handled first) is reported
            # now, while the destroy is under way, so the termination can still say MemoryLimit.
            watch.flush()
        watch = self.watches.pop(container_id, None)
        if watch is not None:
            watch.close()
        self.requested.pop(container_id, None)
        super().cleanup(container_id)


class _OomWatch:
    def flush(self) -> None:
        """Handle a notification that arrived but was not read yet."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _EventFdWatch(_OomWatch):
    """cgroup v1: an eventfd registered for memory.oom_control through cgroup.event_control.

    The kernel signals it when the cgroup enters OOM, before the OOM killer picks its victim (so
    the oom_kill counter may not have moved yet when we look), and also when the cgroup is
    removed: an event counts unless the cgroup is gone.
    """

    def __init__(self, hierarchy: Hierarchy, cgroup: str, loop: asyncio.AbstractEventLoop,
                 fire: Callable[[], None]) -> None:
        self.hierarchy, self.cgroup, self.loop, self.fire = hierarchy, cgroup, loop, fire
        self.closed = False
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.control_fd = os.open(os.path.join(hierarchy.path(cgroup), "memory.oom_control"),
                                      os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self.efd)
            raise
        try:
            hierarchy.write(cgroup, "cgroup.event_control", f"{self.efd} {self.control_fd}")
            loop.add_reader(self.efd, self._readable)
        except BaseException:
            os.close(self.efd)
            os.close(self.control_fd)
            raise

    def flush(self) -> None:
        if not self.closed:
            self._readable()

    def _readable(self) -> None:
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            return
        if not self.hierarchy.exists(self.cgroup):
            self.close()   # the removal notice, not an OOM
            return
        self.fire()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.efd)
        except Exception:  # noqa: BLE001 - the loop may be closed already
            pass
        os.close(self.efd)
        os.close(self.control_fd)


# cgroup v2 memory.events is watched with inotify: the kernel reports a modification on every event.


class _EventsFileWatch(_OomWatch):
    """cgroup v2: memory.events, noticed by inotify (else polled every 100 ms).

    An increase of `oom` (the cgroup hit its limit and reclaim failed: the OOM killer runs next)
    or of `oom_kill` counts. Reacting to `oom` as v1's notification does keeps the limitation
    ahead of the victim's exit; the kernel rate-limits these notifications to one per 10 ms.
    """

    def __init__(self, hierarchy: Hierarchy, cgroup: str, loop: asyncio.AbstractEventLoop,
                 fire: Callable[[], None]) -> None:
        self.hierarchy, self.cgroup, self.loop, self.fire = hierarchy, cgroup, loop, fire
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.inotify_fd: int | None = None
        self.baseline = self._counters() or (0, 0)
        path = os.path.join(hierarchy.path(cgroup), "memory.events")
        try:
            fd = inotify.init()
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                inotify.add_watch(fd, path, inotify.IN_MODIFY)
                self.inotify_fd = fd
                loop.add_reader(fd, self._readable)
            except OSError:
                os.close(fd)
        if self.inotify_fd is None:
            log.debug("inotify is not available for %s: polling it", path)
            self.timer = loop.call_later(_OOM_POLL_SECONDS, self._poll)

    def _counters(self) -> tuple[int, int] | None:
        try:
            events = _parse_flat_keyed(self.hierarchy.read(self.cgroup, "memory.events"))
        except FileNotFoundError:
            return None
        return events.get("oom", 0), events.get("oom_kill", 0)

    def _check(self) -> None:
        counters = self._counters()
        if counters is None:
            self.close()
        elif counters[0] > self.baseline[0] or counters[1] > self.baseline[1]:
            self.fire()

    def flush(self) -> None:
        if not self.closed:
            self._check()

    def _readable(self) -> None:
        assert self.inotify_fd is not None
        try:
            while os.read(self.inotify_fd, 4096):
                pass
        except BlockingIOError:
            pass
        self._check()

    def _poll(self) -> None:
        self.timer = None
        if self.closed:
            return
        self._check()
        if not self.closed:
            self.timer = self.loop.call_later(_OOM_POLL_SECONDS, self._poll)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.inotify_fd is not None:
            try:
                self.loop.remove_reader(self.inotify_fd)
            except Exception:  # noqa: BLE001
                pass
            os.close(self.inotify_fd)
            self.inotify_fd = None
