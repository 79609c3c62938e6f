"""cgroups/net_cls (Mesos isolators/cgroups/subsystems/net_cls.cpp) and its NetClsHandleManager.

Every container gets `<net_cls hierarchy>/<cgroups_root>/<container_id>`. Without
`--cgroups_net_cls_primary_handle` that is all: the operator manages classids. With it, each
container gets a handle `0xAAAABBBB` (primary AAAA, secondary BBBB) from NetClsHandleManager, the
lowest free secondary within `--cgroups_net_cls_secondary_handles`, which traffic control and
`iptables -m cgroup --cgroup` can then match.

The classid is written in `prepare`, before the init exists, and `isolate` moves the init in before
it runs anything: no packet of the container ever leaves untagged. `cleanup` removes the cgroup and
then frees the handle (a handle whose cgroup could not be removed stays taken). `recover` reads
each live container's `net_cls.classid` and reserves it, so it is never handed out twice; one that
cannot be reserved (outside a since-narrowed range, another primary, or a duplicate) is reported in
the log and in `_agent.json`, and is never given to another container.

net_cls exists only in cgroups v1. When the kernel has it but it is mounted nowhere (common on
hybrid hosts), it is mounted at `/sys/fs/cgroup/net_cls`, as Mesos does; a host with only cgroup v2
is refused at start.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reconciler.container import ContainerConfig, ContainerState
from reconciler.isolators.base import Isolator, IsolatorSetupError, LaunchInfo, ResourceExhaustedError
from reconciler.linux import cgroups
from reconciler.linux.cgroups import CgroupMounts, Hierarchy

if TYPE_CHECKING:
    from reconciler.config import AgentConfig

log = logging.getLogger(__name__)

# Where Mesos mounts a hierarchy it needs (--cgroups_hierarchy defaults to /sys/fs/cgroup).
NET_CLS_MOUNTPOINT = "/sys/fs/cgroup/net_cls"
_SECONDARIES = 0x10000


def hexify(value: int) -> str:
    """Mesos's hexify(): lowercase hex without padding ("0x12", "0xffff"), as in its messages."""
    return f"0x{value:x}"


class NetClsError(Exception):
    """A handle operation the manager refuses; the message is Mesos's."""


@dataclass(frozen=True, order=True)
class NetClsHandle:
    """A net_cls classid, 0xAAAABBBB: primary (major) AAAA, secondary (minor) BBBB."""
    primary: int
    secondary: int

    @classmethod
    def from_classid(cls, classid: int) -> "NetClsHandle":
        return cls(classid >> 16 & 0xFFFF, classid & 0xFFFF)

    @property
    def classid(self) -> int:
        return self.primary << 16 | self.secondary

    def __str__(self) -> str:
        return hexify(self.classid)

    def status(self) -> dict[str, Any]:
        """The status-file block (SPEC): zero-padded hex, as `tc` and iptables print them."""
        return {"classid": f"0x{self.classid:08x}", "classid_int": self.classid,
                "primary": f"0x{self.primary:04x}", "secondary": f"0x{self.secondary:04x}"}


Ranges = list[tuple[int, int]]     # closed intervals, as Mesos's IntervalSet<uint32_t>


def _contains(ranges: Ranges, value: int) -> bool:
    return any(low <= value <= high for low, high in ranges)


class NetClsHandleManager:
    """Mesos's NetClsHandleManager: per primary, a map of the 65536 secondaries.

    A primary's map starts with every secondary taken except those in the configured ranges, so
    `alloc` hands out the lowest free secondary scanning up from 1 (deterministic: range
    0x11,0x12 gives 0x11 first), and `reserve`/`free` refuse handles outside the ranges.
    """

    def __init__(self, primaries: Ranges, secondaries: Ranges | None = None) -> None:
        self.primaries = list(primaries)
        self.secondaries = list(secondaries) if secondaries else [(1, 0xFFFF)]
        self.used: dict[int, bytearray] = {}     # primary -> 1 per secondary taken (or outside the ranges)

    def _bitmap(self, primary: int) -> bytearray:
        bitmap = self.used.get(primary)
        if bitmap is None:
            bitmap = bytearray(b"\x01") * _SECONDARIES
            for low, high in self.secondaries:
                bitmap[low:high + 1] = bytes(high - low + 1)
            self.used[primary] = bitmap
        return bitmap

    def alloc(self, primary: int | None = None) -> NetClsHandle:
        if primary is None:
            # The primary ranges are a singleton (the flag); its lower bound is the primary.
            primary = self.primaries[0][0]
        if not _contains(self.primaries, primary):
            raise NetClsError(f"Primary handle {hexify(primary)} not present in primary handle range")
        bitmap = self._bitmap(primary)
        secondary = bitmap.find(0, 1)
        if secondary < 0:
            raise NetClsError(f"No free handles remaining for primary handle {hexify(primary)}")
        bitmap[secondary] = 1
        return NetClsHandle(primary, secondary)

    def reserve(self, handle: NetClsHandle) -> None:
        self._check_ranges(handle)
        bitmap = self._bitmap(handle.primary)
        if bitmap[handle.secondary]:
            raise NetClsError(f"The secondary handle {hexify(handle.secondary)}, for the primary handle "
                              f"{hexify(handle.primary)} has already been allocated")
        bitmap[handle.secondary] = 1

    def free(self, handle: NetClsHandle) -> None:
        self._check_ranges(handle)
        bitmap = self.used.get(handle.primary)
        if bitmap is None:
            raise NetClsError("No secondary handles have been allocated from this primary handle "
                              f"{hexify(handle.primary)}")
        if not bitmap[handle.secondary]:
            raise NetClsError(f"Secondary handle {hexify(handle.secondary)} is not allocated for primary handle "
                              f"{hexify(handle.primary)}")
        bitmap[handle.secondary] = 0

    def is_used(self, handle: NetClsHandle) -> bool:
        if not _contains(self.primaries, handle.primary):
            raise NetClsError(f"Primary handle: {hexify(handle.primary)} is not within the primary's range")
        if not _contains(self.secondaries, handle.secondary):
            raise NetClsError(f"Secondary handle {hexify(handle.secondary)} not present in secondary handle range")
        bitmap = self.used.get(handle.primary)
        return bool(bitmap is not None and bitmap[handle.secondary])

    def alloc_primary(self) -> int:
        raise NetClsError("Not Implemented")

    def _check_ranges(self, handle: NetClsHandle) -> None:
        if not _contains(self.primaries, handle.primary):
            raise NetClsError(f"Primary handle {hexify(handle.primary)} not present in primary handle range")
        if not _contains(self.secondaries, handle.secondary):
            # Mesos's message ends with a space; kept, so that operators' log searches still match.
            raise NetClsError(f"Secondary handle {hexify(handle.secondary)} not present in secondary handle range ")

    # What _agent.json shows -------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Secondaries per primary: the size of the configured ranges (without overlaps)."""
        covered = bytearray(_SECONDARIES)
        for low, high in self.secondaries:
            covered[low:high + 1] = b"\x01" * (high - low + 1)
        return covered.count(1)

    def used_count(self, primary: int) -> int:
        bitmap = self.used.get(primary)
        if bitmap is None:
            return 0
        return sum(bitmap[low:high + 1].count(1) for low, high in _merged(self.secondaries))


def _merged(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


class HandlesExhausted(ResourceExhaustedError):
    """Every handle of the range is taken: the container is Failed, and launched as soon as one is freed."""
    reason = "NetClsHandlesExhausted"


@dataclass
class _Info:
    handle: NetClsHandle | None = None
    reserved: bool = False          # the manager holds it (False: recovered outside the ranges)


class NetClsIsolator(Isolator):
    def __init__(self, config: "AgentConfig", mounts: CgroupMounts | None = None,
                 mountpoint: str = NET_CLS_MOUNTPOINT) -> None:
        super().__init__(config)
        self.root = config.cgroups_root.strip("/")
        self.mounted_by_agent = False
        self.hierarchy = self._find_or_mount(mounts if mounts is not None else cgroups.find_mounts(), mountpoint)
        self.manager: NetClsHandleManager | None = None
        primary = config.cgroups_net_cls_primary_handle
        if primary is not None:
            low, high = config.cgroups_net_cls_secondary_handles
            self.manager = NetClsHandleManager([(primary, primary)], [(low, high)])
        self.infos: dict[str, _Info] = {}
        self.unreserved: dict[str, str] = {}     # container id -> why its recovered handle is not reserved
        self._lock = threading.Lock()            # status()/agent_status() may be read from other threads

    # --- the hierarchy -------------------------------------------------------------------------
    def _find_or_mount(self, mounts: CgroupMounts, mountpoint: str) -> Hierarchy:
        found = mounts.v1.get("net_cls")
        if found is not None:
            return found
        if mounts.unified:
            raise IsolatorSetupError(
                "flag --isolation: cgroups/net_cls needs the cgroup v1 net_cls controller, and this host has only "
                "cgroup v2 at /sys/fs/cgroup (net_cls does not exist in v2; Mesos refuses it there too)")
        kernel = _kernel_controllers()
        if "net_cls" not in kernel:
            raise IsolatorSetupError(
                "flag --isolation: cgroups/net_cls: this kernel has no net_cls cgroup controller "
                "(not listed in /proc/cgroups: CONFIG_CGROUP_NET_CLASSID is off)")
        if not kernel["net_cls"]:
            raise IsolatorSetupError(
                "flag --isolation: cgroups/net_cls: the net_cls cgroup controller is disabled in this kernel "
                "(/proc/cgroups; see cgroup_disable= on the kernel command line)")
        if _no_v1("net_cls"):
            raise IsolatorSetupError(
                "flag --isolation: cgroups/net_cls: the kernel command line has cgroup_no_v1= covering net_cls, "
                "so it cannot be mounted as a cgroup v1 hierarchy")
        try:
            hierarchy = cgroups.mount_v1_hierarchy("net_cls", mountpoint)
        except (OSError, ValueError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise IsolatorSetupError(
                f"flag --isolation: cgroups/net_cls: cannot mount the net_cls hierarchy at {mountpoint}: {detail}"
            ) from None
        self.mounted_by_agent = True
        log.info("Mounted the net_cls cgroup hierarchy at %s", mountpoint)
        return hierarchy

    def cgroup(self, container_id: str) -> str:
        return f"{self.root}/{container_id}"

    # --- the protocol --------------------------------------------------------------------------
    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        with self._lock:
            info = self.infos.get(container_id)
            if info is None:
                info = _Info()
                if self.manager is not None:
                    try:
                        info.handle = self.manager.alloc()
                    except NetClsError as exc:
                        message = f"Failed to allocate a net_cls handle: {exc}"
                        if str(exc).startswith("No free handles"):
                            raise HandlesExhausted(message) from None
                        raise RuntimeError(message) from None
                    info.reserved = True
                    log.info("Allocated a net_cls handle: %s to container %s", info.handle, container_id)
                self.infos[container_id] = info
        cgroup = self.cgroup(container_id)
        self.hierarchy.create(cgroup)
        if info.handle is not None:
            # Before the init exists: the first packet it sends is already tagged.
            try:
                self.hierarchy.write(cgroup, "net_cls.classid", info.handle.classid)
            except OSError as exc:
                raise RuntimeError(f"Failed to assign a net_cls handle to the cgroup: {exc}") from None
        return None

    def isolate(self, container_id: str, pid: int) -> None:
        cgroup = self.cgroup(container_id)
        if container_id not in self.infos or not self.hierarchy.exists(cgroup):
            raise RuntimeError(f"Failed to isolate subsystem 'net_cls': Unknown container {container_id}")
        self.hierarchy.attach(cgroup, pid)

    def status(self, container_id: str) -> dict[str, Any]:
        info = self.infos.get(container_id)
        if info is None or info.handle is None:
            return {}
        return {"net_cls": info.handle.status()}

    def cleanup(self, container_id: str) -> None:
        # The launcher has killed the container's processes: the cgroup is empty.
        self.hierarchy.remove(self.cgroup(container_id))
        with self._lock:
            info = self.infos.pop(container_id, None)
            self.unreserved.pop(container_id, None)
            if info is not None and info.handle is not None and info.reserved and self.manager is not None:
                try:
                    self.manager.free(info.handle)
                except NetClsError as exc:
                    raise RuntimeError(f"Could not free the net_cls handle: {exc}") from None

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        live = {state.config.container_id for state in states}
        # Orphans are recovered too (their handles reserved), and freed by their cleanup.
        for container_id in sorted(live) + sorted(orphans - live):
            if container_id in self.infos or not self.hierarchy.exists(self.cgroup(container_id)):
                continue
            self.infos[container_id] = self._recover_handle(container_id)
        cgroups.remove_children_except(self.hierarchy, self.root, live | orphans)

    def _recover_handle(self, container_id: str) -> _Info:
        try:
            classid = int(self.hierarchy.read(self.cgroup(container_id), "net_cls.classid").strip() or "0")
        except (OSError, ValueError) as exc:
            log.warning("Failed to read 'net_cls.classid' of container %s: %s", container_id, exc)
            return _Info()
        if classid == 0:
            return _Info()
        handle = NetClsHandle.from_classid(classid)
        if self.manager is None:
            # Handles are not managed (now): keep the operator's classid, report nothing, as Mesos.
            return _Info()
        try:
            self.manager.reserve(handle)
        except NetClsError as exc:
            # Mesos fails the whole recovery here ("Failed to recover the net_cls handle: Failed to reserve
            # the handle: ..."). Keeping the container and saying so serves operators better: the handle is
            # outside what the manager hands out (or already taken), so it is never given to another container.
            why = f"Failed to reserve the handle {handle}: {exc}"
            log.warning("Container %s keeps its net_cls handle %s, which the handle manager does not hold: %s",
                        container_id, handle, exc)
            self.unreserved[container_id] = why
            return _Info(handle=handle, reserved=False)
        log.info("Recovered the net_cls handle %s of container %s", handle, container_id)
        return _Info(handle=handle, reserved=True)

    def agent_status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"hierarchy": self.hierarchy.mountpoint, "mounted_by_agent": self.mounted_by_agent,
                               "managed": self.manager is not None}
        if self.manager is None:
            return doc
        with self._lock:
            primary = self.manager.primaries[0][0]
            total = self.manager.total
            used = self.manager.used_count(primary)
            low, high = self.manager.secondaries[0]
            doc.update({
                "primary": f"0x{primary:04x}",
                "secondary_handles": f"0x{low:04x},0x{high:04x}",
                "handles_total": total, "handles_used": used, "handles_free": total - used,
            })
            if self.unreserved:
                handles = {cid: info.handle for cid, info in self.infos.items() if info.handle is not None}
                doc["unreserved_handles"] = [
                    {"container_id": cid, "classid": handles[cid].status()["classid"], "reason": why}
                    for cid, why in sorted(self.unreserved.items()) if cid in handles]
        return doc


def _kernel_controllers() -> dict[str, bool]:
    """/proc/cgroups: controller -> enabled."""
    try:
        with open("/proc/cgroups") as f:
            rows = [line.split() for line in f if not line.startswith("#")]
    except FileNotFoundError:
        return {}
    return {row[0]: row[3] == "1" for row in rows if len(row) >= 4}


def _no_v1(controller: str) -> bool:
    try:
        with open("/proc/cmdline") as f:
            words = f.read().split()
    except OSError:
        return False
    for word in words:
        if word.startswith("cgroup_no_v1="):
            listed = word.split("=", 1)[1].split(",")
            if "all" in listed or controller in listed:
                return True
    return False
