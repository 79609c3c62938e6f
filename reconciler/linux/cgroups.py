"""Cgroups v1 and v2 behind one small interface: find hierarchies, make cgroups, kill, remove.

A `Hierarchy` is one mounted cgroup tree (a v1 hierarchy with its controllers, or the v2 one).
Cgroups are named relative to it ("reconciler/<id>"), never by absolute path, so the same name
works on every hierarchy.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from reconciler.linux import proc, syscalls
from reconciler.linux.mountinfo import read_mountinfo

log = logging.getLogger(__name__)

# v1 controller names, for telling controllers from mount options in mountinfo. /proc/cgroups
# adds any this kernel has that the list lacks.
_KNOWN_V1_CONTROLLERS = frozenset(
    "cpuset cpu cpuacct blkio io memory devices freezer net_cls perf_event net_prio hugetlb pids rdma misc "
    "debug".split()
)

# How long one freeze attempt may sit in FREEZING before it is thawed and retried (Mesos does
# the same: a task in the middle of a fork or in uninterruptible sleep can hold FREEZING up).
_FREEZE_ATTEMPT_SECONDS = 1.0
# After signalling, how long to wait for the cgroup to empty before another round of kills.
_KILL_ROUND_SECONDS = 1.0
_POLL_SECONDS = 0.01


@dataclass(frozen=True)
class Hierarchy:
    """One mounted hierarchy. Methods take cgroup names relative to it; "" is its root."""

    version: int
    mountpoint: str
    controllers: frozenset[str] = frozenset()
    # Which cgroup of the hierarchy is mounted at mountpoint ("/" unless a sub-tree is bind
    # mounted, as inside a container); /proc/<pid>/cgroup paths include it.
    root: str = "/"

    def path(self, cgroup: str) -> str:
        parts = [p for p in cgroup.split("/") if p]
        if ".." in parts:
            raise ValueError(f"cgroup name {cgroup!r} must stay inside the hierarchy (no '..')")
        return os.path.join(self.mountpoint, *parts)

    def exists(self, cgroup: str) -> bool:
        return os.path.isdir(self.path(cgroup))

    def create(self, cgroup: str, controllers: frozenset[str] | set[str] | None = None) -> None:
        """mkdir -p the cgroup; existing levels are fine.

        On v2, `controllers` are enabled in each ancestor's cgroup.subtree_control where missing
        (that is what makes their files appear below). On a v1 cpuset hierarchy each new level
        inherits its parent's cpus and mems: a new cpuset starts empty and refuses processes.
        """
        wanted = frozenset(controllers or ())
        if self.version == 2 and wanted:
            self._check_offered(wanted)
        parts = [p for p in cgroup.split("/") if p]
        for depth in range(1, len(parts) + 1):
            parent, current = "/".join(parts[: depth - 1]), "/".join(parts[:depth])
            if self.version == 2 and wanted:
                self._delegate(parent, wanted)
            try:
                os.mkdir(self.path(current))
            except FileExistsError:
                continue
            if self.version == 1 and "cpuset" in self.controllers:
                self._inherit_cpuset(parent, current)

    def attach(self, cgroup: str, pid: int) -> None:
        """Move the whole process (all its threads) into the cgroup."""
        self.write(cgroup, "cgroup.procs", str(pid))

    def procs(self, cgroup: str, recursive: bool = False) -> list[int]:
        """Pids in the cgroup (and with recursive=True in all cgroups below it)."""
        pids = self._read_pids(cgroup)
        if recursive:
            for child in self.children(cgroup):
                pids.extend(self.procs(f"{cgroup}/{child}", recursive=True))
        return pids

    def children(self, cgroup: str) -> list[str]:
        try:
            entries = os.scandir(self.path(cgroup))
        except FileNotFoundError:  # removed while we walked the tree
            return []
        with entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    def read(self, cgroup: str, control: str) -> str:
        # Raw os.read, not open(): usage passes read several files per container, and the text
        # I/O stack costs several times the system calls themselves.
        fd = os.open(os.path.join(self.path(cgroup), control), os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks).decode()

    def write(self, cgroup: str, control: str, value: str | int) -> None:
        # One write(2) per value: the kernel parses each write separately, so a buffered writer
        # that split the value would make it see two bad values.
        path = os.path.join(self.path(cgroup), control)
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(value).encode())
        except OSError as e:
            raise OSError(e.errno, f"writing {str(value)!r}: {e.strerror}", path) from None
        finally:
            os.close(fd)

    def kill(self, cgroup: str, timeout: float = 10.0) -> None:
        """SIGKILL every process in the cgroup and below it, including ones forking right now,
        and return once it is empty. Raises TimeoutError if it does not empty in `timeout`."""
        self._refuse_root(cgroup, "kill")
        if self.version == 1 and "freezer" not in self.controllers:
            raise ValueError(
                f"cannot kill cgroup {cgroup!r} on {self.mountpoint}: on cgroups v1 a reliable kill "
                "needs the freezer hierarchy (use freezer_hierarchy())"
            )
        if not self.exists(cgroup):
            return
        deadline = time.monotonic() + timeout
        if self.version == 2:
            self._kill_v2(cgroup, deadline)
        else:
            self._kill_v1(cgroup, deadline)

    def remove(self, cgroup: str) -> None:
        """rmdir the cgroup and every cgroup below it, leaves first. Missing is fine.

        The kernel may report EBUSY for a short while after the last process died (its exit is
        not fully accounted yet), so that is retried a few times before giving up.
        """
        self._refuse_root(cgroup, "remove")
        for child in self.children(cgroup):
            self.remove(f"{cgroup}/{child}")
        path = self.path(cgroup)
        delay = 0.01
        for attempt in range(8):
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == 7:
                    raise
            time.sleep(delay)
            delay *= 2

    def _refuse_root(self, cgroup: str, action: str) -> None:
        # The hierarchy root holds every process on the host: an empty name here is a bug.
        if not [p for p in cgroup.split("/") if p]:
            raise ValueError(f"refusing to {action} the root cgroup of {self.mountpoint}")

    # --- killing ---------------------------------------------------------------------------

    def _kill_v2(self, cgroup: str, deadline: float) -> None:
        # cgroup.kill (Linux 5.14) kills the whole subtree atomically with respect to forks.
        if not os.path.exists(os.path.join(self.path(cgroup), "cgroup.kill")):
            raise OSError(errno.ENOTSUP, "cgroup.kill is missing: killing a cgroup v2 needs Linux 5.14 or newer",
                          self.path(cgroup))
        while True:
            if not self._populated(cgroup):
                return
            self.write(cgroup, "cgroup.kill", "1")
            # Repeat the kill if something was moved in meanwhile (a launcher racing us).
            round_end = min(deadline, time.monotonic() + _KILL_ROUND_SECONDS)
            while time.monotonic() < round_end and self._populated(cgroup):
                time.sleep(_POLL_SECONDS)
            if time.monotonic() >= deadline and self._populated(cgroup):
                raise TimeoutError(self._still_populated(cgroup))

    def _kill_v1(self, cgroup: str, deadline: float) -> None:
        # The Mesos sequence: freeze (so nothing forks between listing and signalling), SIGKILL
        # everything listed, thaw (a frozen task cannot act on SIGKILL), wait until empty.
        while True:
            if not self.procs(cgroup, recursive=True):
                return
            try:
                self._freeze_v1(cgroup, deadline)
                for pid in self.procs(cgroup, recursive=True):
                    self._kill_member(cgroup, pid)
            finally:
                self._thaw_v1(cgroup)
            round_end = min(deadline, time.monotonic() + _KILL_ROUND_SECONDS)
            while time.monotonic() < round_end and self.procs(cgroup, recursive=True):
                time.sleep(_POLL_SECONDS)
            if time.monotonic() >= deadline and self.procs(cgroup, recursive=True):
                raise TimeoutError(self._still_populated(cgroup))

    def _freeze_v1(self, cgroup: str, deadline: float) -> None:
        while True:
            self.write(cgroup, "freezer.state", "FROZEN")
            attempt_end = min(deadline, time.monotonic() + _FREEZE_ATTEMPT_SECONDS)
            while True:
                if self.read(cgroup, "freezer.state").strip() == "FROZEN":
                    return
                if time.monotonic() >= attempt_end:
                    break
                time.sleep(_POLL_SECONDS)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"cgroup {self.path(cgroup)} stayed FREEZING: a process in it is probably in "
                    "uninterruptible sleep (state D in ps); it was thawed again"
                )
            # Stuck in FREEZING: thaw and try again, as Mesos does.
            self._thaw_v1(cgroup)

    def _thaw_v1(self, cgroup: str) -> None:
        # Thaw the sub-cgroups too: one frozen on its own (by someone else) keeps its tasks
        # frozen under a thawed parent, and they could never die of their SIGKILL.
        for child in self.children(cgroup):
            self._thaw_v1(f"{cgroup}/{child}")
        try:
            self.write(cgroup, "freezer.state", "THAWED")
        except FileNotFoundError:
            pass

    def _kill_member(self, cgroup: str, pid: int) -> None:
        """SIGKILL `pid` if it is still this process in this cgroup.

        A pidfd pins the process, then /proc/<pid>/cgroup confirms it is (still) under the
        cgroup: the pid may have been reused by another process since it was listed, or the
        process moved elsewhere. Vanished processes are skipped.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            if self._contains(cgroup, pid):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    def _contains(self, cgroup: str, pid: int) -> bool:
        try:
            paths = proc.cgroup_paths(pid)
        except ProcessLookupError:
            return False
        actual = next((path for key, path in paths.items() if self._is_my_line(key)), None)
        if actual is None:
            return False
        expected = os.path.join(self.root, *[p for p in cgroup.split("/") if p])
        return actual == expected or actual.startswith(expected.rstrip("/") + "/")

    def _is_my_line(self, key: str) -> bool:
        """Whether a /proc/<pid>/cgroup controller field names this hierarchy."""
        if self.version == 2:
            return key == ""
        return frozenset(key.split(",")) == self.controllers

    def _populated(self, cgroup: str) -> bool:
        try:
            events = self.read(cgroup, "cgroup.events")
        except FileNotFoundError:
            return False
        return "populated 1" in events.splitlines()

    def _still_populated(self, cgroup: str) -> str:
        pids = self.procs(cgroup, recursive=True)
        return (
            f"cgroup {self.path(cgroup)} still has {len(pids)} process(es) after SIGKILL "
            f"(pids {pids[:10]}); a process stuck in uninterruptible sleep (state D) cannot die "
            "until its I/O completes, or something keeps moving processes in"
        )

    def _read_pids(self, cgroup: str) -> list[int]:
        try:
            return [int(line) for line in self.read(cgroup, "cgroup.procs").split()]
        except FileNotFoundError:
            return []

    # --- controllers -----------------------------------------------------------------------

    def _check_offered(self, controllers: frozenset[str]) -> None:
        available = set(self.read("", "cgroup.controllers").split())
        missing = controllers - available
        if missing:
            raise ValueError(
                f"cgroup v2 at {self.mountpoint} does not offer controller(s) {sorted(missing)} "
                f"(available: {sorted(available) or 'none'}); they are probably bound to a v1 hierarchy"
            )

    def _delegate(self, parent: str, controllers: frozenset[str]) -> None:
        enabled = set(self.read(parent, "cgroup.subtree_control").split())
        missing = controllers - enabled
        if missing:
            self.write(parent, "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(missing)))

    def _inherit_cpuset(self, parent: str, cgroup: str) -> None:
        for control in ("cpuset.cpus", "cpuset.mems"):
            if not self.read(cgroup, control).strip():
                self.write(cgroup, control, self.read(parent, control).strip())


@dataclass(frozen=True)
class CgroupMounts:
    """What is mounted where: v1 hierarchies by controller, the v2 hierarchy if any."""

    # Controller (or "name=<name>" for named hierarchies) → its hierarchy; co-mounted
    # controllers ("cpu,cpuacct") map to the same Hierarchy.
    v1: dict[str, Hierarchy] = field(default_factory=dict)
    v2: Hierarchy | None = None
    # True when cgroup2 is mounted at /sys/fs/cgroup itself (a "unified" host, no v1).
    unified: bool = False

    @property
    def v1_hierarchies(self) -> list[Hierarchy]:
        return list(dict.fromkeys(self.v1.values()))


def find_mounts(mountinfo: str = "/proc/self/mountinfo") -> CgroupMounts:
    known = _KNOWN_V1_CONTROLLERS | _kernel_controllers()
    v1: dict[str, Hierarchy] = {}
    v2: Hierarchy | None = None
    for entry in read_mountinfo(mountinfo):
        fstype, root, mountpoint = entry.fstype, entry.root, entry.mount_point
        if fstype == "cgroup2":
            # A host may show cgroup2 more than once (bind mounts); /sys/fs/cgroup wins.
            if v2 is None or mountpoint == "/sys/fs/cgroup":
                v2 = Hierarchy(2, mountpoint, frozenset(), root)
        elif fstype == "cgroup":
            options = entry.super_options
            controllers = frozenset(o for o in options if o in known or o.startswith("name="))
            hierarchy = Hierarchy(1, mountpoint, controllers, root)
            for controller in controllers:
                # The same hierarchy may be mounted twice; prefer a mount of its whole tree.
                current = v1.get(controller)
                if current is None or (current.root != "/" and root == "/"):
                    v1[controller] = hierarchy
    unified = v2 is not None and v2.mountpoint == "/sys/fs/cgroup"
    return CgroupMounts(v1, v2, unified)


def freezer_hierarchy(mounts: CgroupMounts) -> Hierarchy | None:
    """The hierarchy to track and kill processes with: v1 freezer if mounted, else cgroup v2
    (which has freeze and kill built in), else None."""
    return mounts.v1.get("freezer") or mounts.v2


def unified_hierarchy(mounts: CgroupMounts) -> Hierarchy | None:
    return mounts.v2


def hierarchy_for(mounts: CgroupMounts, controller: str) -> Hierarchy | None:
    """Where `controller` can be used: its v1 hierarchy, or v2 if the v2 root offers it."""
    if controller in mounts.v1:
        return mounts.v1[controller]
    if mounts.v2 is not None:
        try:
            available = mounts.v2.read("", "cgroup.controllers").split()
        except OSError:
            return None
        if controller in available:
            return mounts.v2
    return None


def mount_v1_hierarchy(controller: str, mountpoint: str) -> Hierarchy:
    """Mount a v1 hierarchy of one controller (Mesos does this for net_cls when it is enabled in
    the kernel but mounted nowhere). Already mounted at `mountpoint` is fine."""
    enabled = _kernel_controllers(enabled_only=True)
    if controller not in _kernel_controllers():
        raise ValueError(f"cgroup controller {controller!r} is not in this kernel (see /proc/cgroups)")
    if controller not in enabled:
        raise ValueError(
            f"cgroup controller {controller!r} is disabled in this kernel (see /proc/cgroups; "
            "check the cgroup_disable= kernel command line)"
        )
    current = find_mounts().v1.get(controller)
    if current is not None:
        if os.path.realpath(current.mountpoint) == os.path.realpath(mountpoint):
            return current
        raise ValueError(
            f"cgroup controller {controller!r} is already mounted at {current.mountpoint} "
            f"(with {','.join(sorted(current.controllers))}); use that hierarchy instead of {mountpoint}"
        )
    os.makedirs(mountpoint, exist_ok=True)
    try:
        syscalls.mount("cgroup", mountpoint, "cgroup", syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC,
                       controller)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise OSError(
                e.errno,
                f"cannot mount cgroup controller {controller!r}: it is bound elsewhere (a v1 hierarchy "
                "with other controllers in another mount namespace, or in use by cgroup v2)",
                mountpoint,
            ) from None
        raise
    return Hierarchy(1, mountpoint, frozenset({controller}))


def remove_children_except(hierarchy: Hierarchy, parent: str, keep: set[str]) -> None:
    """Kill and remove the cgroups directly under `parent` whose names are not in `keep` (with kill_and_remove).

    One that cannot be removed (a process stuck in uninterruptible sleep) is logged, and the others are
    removed all the same. A missing `parent` has nothing to remove.
    """
    if not hierarchy.exists(parent):
        return
    for child in hierarchy.children(parent):
        if child in keep:
            continue
        cgroup = f"{parent}/{child}"
        log.info("Removing unknown orphan cgroup %s", hierarchy.path(cgroup))
        try:
            kill_and_remove(hierarchy, cgroup)
        except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint makes an orphan, not a crash
            log.error("Failed to clean up unknown orphan cgroup %s: %s", hierarchy.path(cgroup), exc)


def kill_and_remove(hierarchy: Hierarchy, cgroup: str, timeout: float = 10.0) -> None:
    """Kill what a cgroup holds and remove it, on any hierarchy: Hierarchy.kill where a kill is reliable
    (v2's cgroup.kill, v1's freezer), else pidfd-checked SIGKILLs (a v1 hierarchy without freezer:
    net_cls, devices). TimeoutError when processes are still there after `timeout`."""
    if hierarchy.version == 2 or "freezer" in hierarchy.controllers:
        hierarchy.kill(cgroup, timeout)
    else:
        _kill_listed(hierarchy, cgroup, timeout)
    hierarchy.remove(cgroup)


def _kill_listed(hierarchy: Hierarchy, cgroup: str, timeout: float) -> None:
    """SIGKILL what a v1 hierarchy without freezer lists, until it is empty.

    A pidfd pins each process first; it is only signalled if, after that, its pid is still listed
    in the cgroup (so a pid reused by someone else's process is never hit).
    """
    deadline = time.monotonic() + timeout
    while pids := hierarchy.procs(cgroup, recursive=True):
        if time.monotonic() > deadline:
            raise TimeoutError(f"cgroup {hierarchy.path(cgroup)} still has processes {pids[:10]} after SIGKILL")
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                if pid in hierarchy.procs(cgroup, recursive=True):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)
        time.sleep(_POLL_SECONDS)


def _kernel_controllers(enabled_only: bool = False) -> frozenset[str]:
    try:
        with open("/proc/cgroups") as f:
            rows = [line.split() for line in f if not line.startswith("#")]
    except FileNotFoundError:
        return frozenset()
    return frozenset(row[0] for row in rows if len(row) >= 4 and (not enabled_only or row[3] == "1"))

