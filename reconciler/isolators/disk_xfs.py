"""disk/xfs (Mesos isolators/xfs/disk.cpp): each sandbox is an XFS project with a quota.

At start, work_dir must be on XFS mounted with project quotas (prjquota / pquota) on a kernel that
has XFS quota support; otherwise the agent refuses to start, naming the flag and the reason.

`prepare` takes the lowest free project id of --xfs_project_range, puts the sandbox into it
(FS_IOC_FSSETXATTR with the inherit flag: every file created below is charged to it) and sets its
limits with quotactl, by --enforce_container_disk_quota and --xfs_kill_containers:

- accounting (no enforcement): no limits; usage is still reported;
- passive (enforce): soft = hard = the `disk` resource; writes beyond it fail with EDQUOT and the
  container is not killed (its command usually fails on its own);
- active (enforce + kill): soft = `disk`, hard = `disk` + --xfs_quota_headroom; a container whose
  usage passes the soft limit is destroyed with a DiskLimitation
  ("Disk usage (X) exceeded quota (Y)").

Usage and limits are read with quotactl every --container_disk_watch_interval in a background
thread (the status file shows the last reading). A project id is not freed when its container is
destroyed: symlinks cannot be taken out of a project, so it is reclaimed only once no directory
carries it (the sandbox was removed), as Mesos does since MESOS-9007. Recovery re-reads the project
ids of the sandboxes on disk, and gives one to live sandboxes that have none (disk/xfs just enabled).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reconciler.container import ContainerConfig, ContainerState
from reconciler.isolators.base import (
    Isolator,
    IsolatorSetupError,
    LaunchInfo,
    Limitation,
    LimitationCallback,
    ResourceExhaustedError,
)
from reconciler.isolators.disk_status import DiskStatus, status_news
from reconciler.linux import quota
from reconciler.units import format_bytes, megabytes_to_bytes

if TYPE_CHECKING:
    from reconciler.config import AgentConfig
    from reconciler.models import Resources

log = logging.getLogger(__name__)

_MB = 1024 * 1024
# How often directories scheduled for reclaim are looked at when nothing else asks (Mesos
# --disk_watch_interval, 1 min); a launch that needs an id looks at once.
RECLAIM_INTERVAL = 60.0

ACCOUNTING, PASSIVE, ACTIVE = "accounting", "enforcing_passive", "enforcing_active"


class ProjectIdExhausted(ResourceExhaustedError):
    """No project id is free: the container is Failed, and launched again once a destroy (and the removal
    of a sandbox) gives one back."""
    reason = "XfsProjectIdsExhausted"


class ProjectIdAllocator:
    """Project ids of --xfs_project_range: the lowest free first; an id stays taken while any directory
    that carries it exists (Mesos scheduleProjectRoot / reclaimProjectIds)."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.roots: dict[int, set[str]] = {}    # id -> directories carrying it (ids outside the range too)

    @property
    def total(self) -> int:
        return self.high - self.low + 1

    def in_range(self, project_id: int) -> bool:
        return self.low <= project_id <= self.high

    @property
    def free(self) -> int:
        return self.total - sum(1 for pid in self.roots if self.in_range(pid))

    def allocate(self, directory: str) -> int:
        candidate = self.low
        while candidate in self.roots:
            candidate += 1
        if candidate > self.high:
            raise ProjectIdExhausted("Failed to assign project ID, range exhausted")
        self.roots[candidate] = {directory}
        return candidate

    def add_root(self, project_id: int, directory: str) -> None:
        """A directory carries `project_id` (found at recovery, or assigned): the id is taken until it is gone."""
        self.roots.setdefault(project_id, set()).add(directory)

    def reclaim(self) -> list[int]:
        """Forget directories that no longer exist; return the ids no directory carries any more (freed)."""
        freed = []
        for project_id, directories in list(self.roots.items()):
            for directory in list(directories):
                if not os.path.lexists(directory):
                    directories.discard(directory)
            if not directories:
                del self.roots[project_id]
                freed.append(project_id)
        return freed


class KernelQuota:
    """The kernel side: the check at start, project ids (ioctls) and quota records (quotactl)."""

    def check(self, work_dir: str) -> None:
        """Raise IsolatorSetupError unless work_dir is on XFS with project quotas this kernel supports."""
        path = _existing_ancestor(work_dir)
        mount = quota.mount_of(path)
        where = f" (mounted at {mount.mountpoint})" if mount is not None else ""
        if not quota.is_xfs(path):
            fstype = mount.fstype if mount is not None else "another filesystem"
            raise IsolatorSetupError(
                f"flag --work_dir: disk/xfs: '{work_dir}' is not an XFS filesystem (it is on {fstype}{where}); "
                "put --work_dir on XFS mounted with -o prjquota")
        kernel_has_quota = quota.kernel_config("CONFIG_XFS_QUOTA")
        if mount is not None and not quota.has_project_quota_option(mount):
            hint = " with -o prjquota"
            if kernel_has_quota == "n":
                hint = (", and this kernel has no XFS quota support (CONFIG_XFS_QUOTA is not set), "
                        "so it cannot be mounted with -o prjquota; use a kernel built with it")
            else:
                hint = f": remount {mount.mountpoint}{hint} (XFS enables quotas only at mount time)"
            raise IsolatorSetupError(
                f"flag --work_dir: disk/xfs: XFS project quotas are not enabled on '{work_dir}'{where}{hint}")
        try:
            status = quota.quota_status(path)
        except quota.QuotaError as exc:
            raise IsolatorSetupError(f"flag --work_dir: disk/xfs: {exc}") from None
        if not status.accounting:
            raise IsolatorSetupError(
                f"flag --work_dir: disk/xfs: XFS project quotas are not enabled on '{work_dir}'{where}")

    def enforcing(self, path: str) -> bool:
        return quota.quota_status(path).enforcing

    def enable_enforcement(self, path: str) -> None:
        quota.enable_project_enforcement(path)

    def get_project_id(self, directory: str) -> int:
        return quota.get_project_id(directory)

    def set_project_id(self, directory: str, project_id: int) -> None:
        quota.set_project_id(directory, project_id)

    def get(self, path: str, project_id: int) -> quota.QuotaInfo | None:
        return quota.get_project_quota(path, project_id)

    def set(self, path: str, project_id: int, soft_limit: int, hard_limit: int) -> None:
        quota.set_project_quota(path, project_id, soft_limit, hard_limit)

    def clear(self, path: str, project_id: int) -> None:
        quota.clear_project_quota(path, project_id)


def _existing_ancestor(path: str) -> str:
    """work_dir may not exist before the first start: its filesystem is that of its nearest existing ancestor."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


@dataclass
class _Info:
    container_id: str
    sandbox: str
    project_id: int
    limit_bytes: int | None
    soft_limit: int = 0
    hard_limit: int = 0
    used_bytes: int | None = None
    checked_at: float | None = None
    limited: bool = False
    on_limitation: LimitationCallback | None = None
    loop: asyncio.AbstractEventLoop | None = None
    shown: DiskStatus | None = None        # what the status file's `disk` block says (see disk_status.status_news)


class DiskXfsIsolator(Isolator):
    def __init__(self, config: "AgentConfig", backend: KernelQuota | None = None) -> None:
        super().__init__(config)
        low, high = config.xfs_project_range
        if high > quota.MAX_PROJECT_ID:
            raise IsolatorSetupError(f"flag --xfs_project_range: Project ID {high} is out of range "
                                     f"(project ids are 32 bits: at most {quota.MAX_PROJECT_ID})")
        if low <= quota.NON_PROJECT_ID:
            raise IsolatorSetupError("flag --xfs_project_range: XFS project ID range contains illegal 0 value")
        if os.geteuid() != 0:
            raise IsolatorSetupError("flag --isolation: disk/xfs: The XFS disk isolator requires running as root.")
        self.kernel = backend if backend is not None else KernelQuota()
        self.work_dir = config.work_dir
        self.kernel.check(self.work_dir)
        self.quota_path = _existing_ancestor(self.work_dir)     # any path on the filesystem names it to quotactl
        self.policy = ACCOUNTING
        if config.enforce_container_disk_quota:
            self.policy = ACTIVE if config.xfs_kill_containers else PASSIVE
            if not self.kernel.enforcing(self.quota_path):
                # Mounted with pqnoenforce: turn enforcement on, as Mesos does (apache/mesos#475).
                try:
                    self.kernel.enable_enforcement(self.quota_path)
                except quota.QuotaError as exc:
                    raise IsolatorSetupError(f"flag --enforce_container_disk_quota: disk/xfs: {exc}") from None
        self.headroom = megabytes_to_bytes(config.xfs_quota_headroom)
        if self.policy == ACTIVE and self.headroom == 0:
            log.warning("disk/xfs: --xfs_kill_containers with --xfs_quota_headroom=0: the hard limit equals the "
                        "soft one, so writes fail at the limit before a container can pass it and be killed")
        self.interval = config.container_disk_watch_interval
        self.allocator = ProjectIdAllocator(low, high)
        self.infos: dict[str, _Info] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reclaim = 0.0
        log.info("Allocating %d XFS project IDs from the range [%d-%d] (%s)", self.allocator.total, low, high,
                 self.policy)

    # --- quota records ------------------------------------------------------------------------
    def _limits(self, limit: int | None) -> tuple[int, int] | None:
        """(soft, hard) for the policy; None means no limits (accounting, or no `disk` resource)."""
        if limit is None or self.policy == ACCOUNTING:
            return None
        limit = max(limit, quota.BASIC_BLOCK_SIZE)
        return (limit, limit + self.headroom) if self.policy == ACTIVE else (limit, limit)

    def _apply(self, info: _Info) -> None:
        limits = self._limits(info.limit_bytes)
        try:
            if limits is None:
                self.kernel.clear(self.quota_path, info.project_id)
                info.soft_limit = info.hard_limit = 0
            else:
                self.kernel.set(self.quota_path, info.project_id, *limits)
                info.soft_limit, info.hard_limit = limits
        except quota.QuotaError as exc:
            raise RuntimeError(f"Failed to update quota for project {info.project_id}: {exc}") from None
        log.info("Set quota on container %s for project %d to %s/%s", info.container_id, info.project_id,
                 format_bytes(info.soft_limit), format_bytes(info.hard_limit))

    def _reclaim(self) -> None:
        with self._lock:
            self._last_reclaim = time.monotonic()
            for project_id in self.allocator.reclaim():
                try:
                    self.kernel.clear(self.quota_path, project_id)
                except quota.QuotaError as exc:
                    log.error("Failed to clear quota for project ID %d: %s", project_id, exc)
                log.info("Reclaimed project ID %d", project_id)

    # --- the protocol --------------------------------------------------------------------------
    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        live = {state.config.container_id: state.config for state in states}
        sandboxes = self.config.sandboxes_path
        try:
            names = sorted(os.listdir(sandboxes))
        except FileNotFoundError:
            names = []
        with self._lock:
            for name in names:
                directory = os.path.join(sandboxes, name)
                if os.path.islink(directory) or not os.path.isdir(directory):
                    continue
                try:
                    project_id = self.kernel.get_project_id(directory)
                except quota.QuotaError as exc:
                    raise RuntimeError(f"Failed to recover the project ID of {directory}: {exc}") from None
                if project_id == quota.NON_PROJECT_ID:
                    continue
                self.allocator.add_root(project_id, directory)
                config = live.get(name)
                if config is not None:
                    self.infos[name] = _Info(name, directory, project_id, self._limit(config))
            for container_id, config in live.items():
                info = self.infos.get(container_id)
                if info is None:
                    # Started before disk/xfs was enabled (Mesos RecoverOldContainers): give it a project now.
                    info = self._assign(container_id, config)
                self._apply(info)

    @staticmethod
    def _limit(config: ContainerConfig) -> int | None:
        disk = config.spec.resources.disk
        return megabytes_to_bytes(disk) if disk is not None else None

    def _assign(self, container_id: str, config: ContainerConfig) -> _Info:
        project_id = self.allocator.allocate(config.sandbox)
        info = _Info(container_id, config.sandbox, project_id, self._limit(config))
        self.infos[container_id] = info
        try:
            self.kernel.set_project_id(config.sandbox, project_id)
        except (quota.QuotaError, OSError) as exc:
            raise RuntimeError(f"Failed to assign project {project_id}: {exc}") from None
        log.info("Assigned project %d to '%s'", project_id, config.sandbox)
        return info

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        with self._lock:
            if container_id in self.infos:
                return None
            try:
                info = self._assign(container_id, config)
            except ProjectIdExhausted:
                self._reclaim()            # removed sandboxes may have given ids back since the last look
                info = self._assign(container_id, config)
            self._apply(info)
        return None

    def watch_limit(self, container_id: str, on_limitation: LimitationCallback,
                    loop: asyncio.AbstractEventLoop) -> None:
        info = self.infos.get(container_id)
        if info is None:
            return    # a container recovered without a sandbox project: not tracked (as Mesos)
        info.on_limitation, info.loop = on_limitation, loop
        self._ensure_thread()
        self._wake.set()

    def update(self, container_id: str, resources: "Resources") -> None:
        with self._lock:
            info = self.infos.get(container_id)
            if info is None:
                return
            info.limit_bytes = megabytes_to_bytes(resources.disk) if resources.disk is not None else None
            info.limited = False
            self._apply(info)
            self._show(info)

    def usage(self, container_id: str) -> dict[str, float | int]:
        info = self.infos.get(container_id)
        if info is None:
            return {}
        stats: dict[str, float | int] = {}
        if info.limit_bytes is not None:
            stats["disk_limit_bytes"] = info.limit_bytes     # the requested quota, even when accounting only
        if info.used_bytes is not None:
            stats["disk_used_bytes"] = info.used_bytes
        return stats

    def _show(self, info: _Info) -> None:
        if info.used_bytes is None or info.checked_at is None:
            return
        now = DiskStatus(info.used_bytes, info.limit_bytes, info.checked_at,
                         self.policy != ACCOUNTING and info.limit_bytes is not None)
        if status_news(info.shown, now):
            info.shown = now
            self.observer.isolator_status_changed(info.container_id)   # from the watcher thread: thread-safe

    def status(self, container_id: str) -> dict[str, Any]:
        info = self.infos.get(container_id)
        if info is None or info.shown is None:
            return {}
        return info.shown.block()

    def cleanup(self, container_id: str) -> None:
        # The id stays with the sandbox until the sandbox is removed (then it is reclaimed).
        with self._lock:
            self.infos.pop(container_id, None)

    def agent_status(self) -> dict[str, Any]:
        if time.monotonic() - self._last_reclaim >= RECLAIM_INTERVAL:
            self._reclaim()
        with self._lock:
            return {"policy": self.policy, "project_ids_total": self.allocator.total,
                    "project_ids_free": self.allocator.free, "quota_headroom_bytes": self.headroom}

    async def measure_unmeasured(self) -> int:
        """`once`: read now the quota of every container not read yet (the watcher thread reads every
        --container_disk_watch_interval), publish it and, under the active policy, report a container
        past its soft limit; a few quotactl calls."""
        with self._lock:
            unread = sum(1 for info in self.infos.values() if info.used_bytes is None)
        if unread:
            await asyncio.to_thread(self.check)
        return unread

    # --- the watcher thread ----------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch_loop, name="disk-xfs", daemon=True)
            self._thread.start()

    def _watch_loop(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.check()
                if time.monotonic() - self._last_reclaim >= RECLAIM_INTERVAL:
                    self._reclaim()
            except Exception:   # the watcher must survive one bad reading (logged with its traceback)
                log.exception("disk/xfs: checking quotas failed")

    def check(self) -> None:
        """Read every container's usage; under the active policy, report those past their soft limit."""
        with self._lock:
            infos = list(self.infos.values())
        for info in infos:
            try:
                record = self.kernel.get(self.quota_path, info.project_id)
            except quota.QuotaError as exc:
                log.warning("Failed to check disk usage for container '%s' in '%s': %s", info.container_id,
                            info.sandbox, exc)
                continue
            info.used_bytes = record.used if record is not None else 0
            info.checked_at = time.time()
            self._show(info)
            if self.policy != ACTIVE or info.limited or not info.soft_limit or info.used_bytes <= info.soft_limit:
                continue
            info.limited = True
            message = f"Disk usage ({format_bytes(info.used_bytes)}) exceeded quota ({format_bytes(info.soft_limit)})"
            log.info("Container %s disk usage %s exceeded quota %s in '%s'", info.container_id,
                     format_bytes(info.used_bytes), format_bytes(info.soft_limit), info.sandbox)
            limitation = Limitation(reason="DiskLimitation", message=message,
                                    resources={"disk": float(info.used_bytes // _MB)})
            if info.loop is not None and info.on_limitation is not None and not info.loop.is_closed():
                info.loop.call_soon_threadsafe(info.on_limitation, limitation)
