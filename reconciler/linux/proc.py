"""Process facts read straight from /proc (no psutil: these run in hot loops and at recovery)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

# /proc/<pid>/stat is "pid (comm) state ppid ...". comm is chosen by the process and may hold
# spaces and parentheses, so fields are counted from the *last* ')'. After it, index 0 is
# field 3 (state).
_STATE = 0  # field 3
_PPID = 1  # field 4
_STARTTIME = 19  # field 22, in clock ticks since boot

# Big enough for any stat line (comm is at most 64 bytes; the rest is ~52 numbers).
_STAT_READ_SIZE = 4096


def _read_stat_fields(pid: int) -> list[bytes] | None:
    """The stat fields after `(comm)`, or None if the process does not exist (any more)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        data = os.read(fd, _STAT_READ_SIZE)
    except ProcessLookupError:  # exited between open and read
        return None
    finally:
        os.close(fd)
    return data[data.rindex(b")") + 2 :].split()


def start_time_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot; None if there is no such process.

    Together with the pid this names one process for the life of the boot: a pid that is
    reused gets a different start time.
    """
    fields = _read_stat_fields(pid)
    return None if fields is None else int(fields[_STARTTIME])


def boot_id() -> str:
    """A random id the kernel picks at each boot: start times are only comparable within it."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


@dataclass(frozen=True)
class ProcessIdentity:
    """A pid pinned to one process by its start time, so a reused pid is not mistaken for it."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        start = start_time_ticks(pid)
        return None if start is None else cls(pid, start)

    def is_alive(self) -> bool:
        """True while this very process runs. A zombie (exited, not yet reaped) is not alive:
        it runs no code any more and only waits for its parent to collect the exit status."""
        fields = _read_stat_fields(self.pid)
        if fields is None or int(fields[_STARTTIME]) != self.start_time:
            return False
        return fields[_STATE] not in (b"Z", b"X")


def cgroup_paths(pid: int) -> dict[str, str]:
    """The cgroup of `pid` in each hierarchy, from /proc/<pid>/cgroup.

    Keys are the controller field as the kernel prints it: "freezer", "cpu,cpuacct",
    "name=systemd", or "" for the cgroup v2 hierarchy. Paths are as seen from the reader's
    cgroup namespace. Raises ProcessLookupError if there is no such process.
    """
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}", f"/proc/{pid}/cgroup") from None
    paths: dict[str, str] = {}
    for line in text.splitlines():
        # "hierarchy-id:controllers:path"; the path itself may contain ':'.
        _, controllers, path = line.split(":", 2)
        paths[controllers] = path
    return paths


@dataclass(frozen=True)
class ProcStat:
    """What one read of /proc/<pid>/stat tells about a process (what usage and killing need)."""

    pid: int
    ppid: int
    session: int
    state: str        # R, S, D, Z (zombie: exited, waiting for its parent to reap it) …
    utime: int        # clock ticks
    stime: int        # clock ticks
    threads: int
    rss_pages: int


def process_table() -> dict[int, ProcStat]:
    """Every process's ProcStat, in one pass over /proc (shared by all containers' usage)."""
    table: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        f = _read_stat_fields(pid)
        if f is None:
            continue
        # after "(comm)": 0 state, 1 ppid, 2 pgrp, 3 session, 11 utime, 12 stime, 17 num_threads, 21 rss
        table[pid] = ProcStat(pid, int(f[1]), int(f[3]), f[0].decode(), int(f[11]), int(f[12]), int(f[17]), int(f[21]))
    return table


def descendants(table: dict[int, ProcStat], root: int) -> set[int]:
    """Every process below `root` in the table's process tree (root itself excluded)."""
    children: dict[int, list[int]] = {}
    for entry in table.values():
        children.setdefault(entry.ppid, []).append(entry.pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found

