"""inotify(7) through ctypes: the standard library has no binding. One home for the calls and the
constants (disk/du watches sandboxes with it, cgroups/mem a cgroup v2 memory.events file)."""

from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]

IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_Q_OVERFLOW, IN_IGNORED = 0x100, 0x200, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
EVENT = struct.Struct("iIII")            # struct inotify_event: wd, mask, cookie, len (then the name)


def init() -> int:
    """A new non-blocking, close-on-exec inotify instance; OSError when the kernel refuses one."""
    fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    return fd


def add_watch(fd: int, path: str, mask: int) -> int:
    """The watch descriptor (the same one for a path watched already); OSError naming the path."""
    wd = _libc.inotify_add_watch(fd, os.fsencode(path), mask)
    if wd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", path)
    return wd


def rm_watch(fd: int, wd: int) -> None:
    _libc.inotify_rm_watch(fd, wd)     # a watch the kernel dropped already (IN_IGNORED) is no error
