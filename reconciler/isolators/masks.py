"""runc's masked and read-only paths: what a container's own /proc and /sys hide or keep read-only.

Masked (runc's defaults): files that read kernel memory or other tenants' secrets (kcore, keys,
timer_list, sched_debug...) get /dev/null bound over them, and directories of host hardware
(acpi, asound, scsi, /sys/firmware, powercap) an empty read-only tmpfs. Read-only: the kernel's
knobs (/proc/sys, sysrq-trigger, irq, bus, fs), or a root container could write
/proc/sys/kernel/core_pattern and have the host run a program of its choice.

Used by filesystem/linux (a container with an image) and namespaces/pid (one without, that gets its
own /proc): both build these mounts after their /proc and /sys, in the container's mount namespace.
A privileged container (`linux_info.privileged`) gets none of them, as with `docker run --privileged`.
"""

from __future__ import annotations

import os
from typing import Callable

from reconciler.launch_spec import Mount
from reconciler.linux import syscalls

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)
READ_ONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
_NOSUID_NODEV_NOEXEC = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC


def masking_mounts(at: Callable[[str], str]) -> tuple[list[Mount], dict[str, list[str]]]:
    """The mounts that mask and make read-only runc's paths, each at `at(path)`, and what the status shows.

    Only paths this kernel has are listed (the container's /proc and /sys show the same kernel's).
    """
    mounts: list[Mount] = []
    masked, read_only = [], []
    empty: str | None = None    # the first masked directory's tmpfs, bound over the others (binds are cheaper)
    for path in MASKED_PATHS:
        if os.path.isdir(path):
            if empty is None:
                empty = at(path)
                mounts.append({"source": "tmpfs", "target": empty, "fstype": "tmpfs", "data": "size=0,mode=0555",
                               "flags": _NOSUID_NODEV_NOEXEC | syscalls.MS_RDONLY})
            else:
                # A bind keeps its source's flags: read-only, nosuid, nodev, noexec.
                mounts.append({"source": empty, "target": at(path), "fstype": None, "data": None,
                               "flags": syscalls.MS_BIND})
        elif os.path.exists(path):
            mounts.append({"source": "/dev/null", "target": at(path), "fstype": None, "data": None,
                           "flags": syscalls.MS_BIND})
        else:
            continue
        masked.append(path)
    for path in READ_ONLY_PATHS:
        if os.path.exists(path):
            mounts.append({"source": at(path), "target": at(path), "fstype": None, "data": None,
                           "flags": syscalls.MS_BIND | syscalls.MS_REC})
            mounts.append({"source": None, "target": at(path), "fstype": None, "data": None,
                           "flags": syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY | _NOSUID_NODEV_NOEXEC})
            read_only.append(path)
    return mounts, {"masked_paths": masked, "read_only_paths": read_only}
