"""Bind remounts that change one flag and keep the rest, and the nosuid,nodev bind of an agent directory.

A bind remount replaces every per-mount flag (nosuid, nodev, noexec, read-only, atime): clearing one
by accident would weaken the mount, and the kernel refuses (EPERM) to clear one that is locked (a
mount inherited from a more privileged namespace). So each remount starts from the flags the mount
has, read with statvfs.
"""

from __future__ import annotations

import os

from reconciler.linux import syscalls
from reconciler.linux.quota import mount_of

_KEPT_FLAGS = (
    (os.ST_RDONLY, syscalls.MS_RDONLY),
    (os.ST_NOSUID, syscalls.MS_NOSUID),
    (os.ST_NODEV, syscalls.MS_NODEV),
    (os.ST_NOEXEC, syscalls.MS_NOEXEC),
    (os.ST_SYNCHRONOUS, syscalls.MS_SYNCHRONOUS),
    (os.ST_NOATIME, syscalls.MS_NOATIME),
    (os.ST_NODIRATIME, syscalls.MS_NODIRATIME),
    (os.ST_RELATIME, syscalls.MS_RELATIME),
)


def remount_flags(path: str, add: int) -> int:
    """The flags of a bind remount of the mount at `path` that adds `add` and keeps every flag it has."""
    f_flag = os.statvfs(path).f_flag
    flags = syscalls.MS_BIND | syscalls.MS_REMOUNT | add
    for st_flag, ms_flag in _KEPT_FLAGS:
        if f_flag & st_flag:
            flags |= ms_flag
    if not f_flag & (os.ST_NOATIME | os.ST_RELATIME):
        flags |= syscalls.MS_STRICTATIME
    return flags


def ensure_nosuid_nodev(path: str) -> bool:
    """Make the directory `path` a bind mount of itself with nosuid and nodev, unless it is one already.

    What containers write below it (a setuid-root copy of a shell, a device node) then gives a host
    user who reaches it nothing. Returns whether a mount was made. The mount stays when the agent
    stops (as Mesos's own work_dir mounts do): the next agent finds it and leaves it.
    """
    real = os.path.realpath(path)
    mount = mount_of(real)
    if mount is not None and mount.mountpoint == real and {"nosuid", "nodev"} <= mount.options:
        return False
    if mount is None or mount.mountpoint != real:
        syscalls.mount(real, real, None, syscalls.MS_BIND)
    syscalls.mount(None, real, None, remount_flags(real, syscalls.MS_NOSUID | syscalls.MS_NODEV))
    return True
