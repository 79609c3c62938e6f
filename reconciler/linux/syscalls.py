"""Thin ctypes wrappers for the Linux calls the standard library lacks.

Every wrapper raises OSError(errno, "<call>: <strerror>", path) on failure, so a caller can
match on `e.errno` and a user reading the message sees which call failed and on what.

unshare, setns, capset and the prctl calls act on the *calling thread* only: call them in a
single-threaded child (after fork, before exec), never in a process that runs threads.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)

# Namespaces (<linux/sched.h>).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags (<linux/mount.h>).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# umount2(2) flags.
MNT_FORCE = 1
MNT_DETACH = 2
MNT_EXPIRE = 4
UMOUNT_NOFOLLOW = 8

# prctl(2) options (<linux/prctl.h>).
PR_CAPBSET_READ = 23

# The calls with no libc wrapper, by number per architecture (<asm/unistd.h>): one table. (The container's
# init and the launch helper, which import only the standard library, keep their own pivot_root and clone.)
SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "pivot_root": {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217},
    "bpf": {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280, "ppc64le": 361, "ppc64": 361,
            "s390x": 351, "i686": 357, "armv7l": 386},
    "quotactl_fd": {"x86_64": 443, "aarch64": 443, "armv7l": 443, "ppc64le": 443, "s390x": 443, "riscv64": 443},
}


def syscall_number(name: str, machine: str | None = None) -> int | None:
    """The number of `name` on this machine's architecture (platform.machine()), None where unknown."""
    return SYSCALL_NUMBERS[name].get(machine or platform.machine())

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _raise(call: str, path: str | None = None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{call}: {os.strerror(err)}", path)


def _path(value: str | bytes | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(_path(source), _path(target), _path(fstype), flags, _path(data)) != 0:
        _raise("mount", target)


def umount2(target: str, flags: int = 0) -> None:
    if _libc.umount2(_path(target), flags) != 0:
        _raise("umount2", target)


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        _raise("unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace `fd` refers to (an open /proc/<pid>/ns/<type> or a pidfd).

    nstype=0 accepts any type; passing the CLONE_NEW* constant makes the kernel check that the
    fd is of that type, which catches a wrong path early.
    """
    if _libc.setns(fd, nstype) != 0:
        _raise("setns")


def pivot_root(new_root: str, put_old: str) -> None:
    number = syscall_number("pivot_root")
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root: no syscall number known for {platform.machine()}", new_root)
    if _libc.syscall(ctypes.c_long(number), _path(new_root), _path(put_old)) != 0:
        _raise("pivot_root", new_root)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result: int = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if result == -1:
        _raise("prctl")
    return result


# Capabilities, version 3: two 32-bit data structs make up each 64-bit set.


class _CapHeader(ctypes.Structure):  # struct __user_cap_header_struct
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):  # struct __user_cap_data_struct
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CapDataPair = _CapData * 2
_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


@dataclass(frozen=True)
class CapabilitySets:
    """The three per-thread capability sets as 64-bit masks: bit n is capability n."""

    effective: int
    permitted: int
    inheritable: int


def capget(pid: int = 0) -> CapabilitySets:
    """The capability sets of `pid` (0: the calling thread)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid)
    data = _CapDataPair()
    if _libc.capget(ctypes.byref(header), data) != 0:
        _raise("capget")

    def join(field: str) -> int:
        return int(getattr(data[0], field)) | (int(getattr(data[1], field)) << 32)

    return CapabilitySets(join("effective"), join("permitted"), join("inheritable"))


def capset(caps: CapabilitySets) -> None:
    """Set the calling thread's capability sets (the kernel allows only the calling thread)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (caps.effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (caps.permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (caps.inheritable >> shift) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        _raise("capset")


def bounding_is_set(cap: int) -> bool:
    return prctl(PR_CAPBSET_READ, cap) == 1


@functools.cache
def last_capability() -> int:
    """The highest capability number this kernel knows (/proc/sys/kernel/cap_last_cap)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        # Older kernels lack the file; probe the bounding set instead (EINVAL past the last one).
        number = 0
        while True:
            try:
                bounding_is_set(number + 1)
            except OSError:
                return number
            number += 1
