"""Load a compiled seccomp filter into the calling thread: what a container's command does last before exec.

Standard library only: it runs in the command's process, a fork of the launch helper, which imports
neither pydantic nor libseccomp. The program is the raw array of `struct sock_filter` (8 bytes each)
that reconciler.linux.seccomp compiled in the agent.

The kernel loads a filter only for a thread with no_new_privs set or holding CAP_SYS_ADMIN (so that
a setuid program cannot be run under a filter that fools it); the caller says which applies.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_INSTRUCTION_SIZE = 8
BPF_MAXINSNS = 4096

_libc = ctypes.CDLL(None, use_errno=True)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _prctl(option: int, arg2: int, arg3: object, what: str) -> None:
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), arg3, ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def install(program: bytes, no_new_privs: bool) -> None:
    """Load `program` for this thread (and what it execs); OSError names the call that failed."""
    count, rest = divmod(len(program), BPF_INSTRUCTION_SIZE)
    if rest or not 0 < count <= BPF_MAXINSNS:
        raise ValueError(f"a seccomp program is 1 to {BPF_MAXINSNS} instructions of {BPF_INSTRUCTION_SIZE} bytes, "
                         f"not {len(program)} bytes")
    if no_new_privs:
        _prctl(PR_SET_NO_NEW_PRIVS, 1, ctypes.c_ulong(0), "prctl(PR_SET_NO_NEW_PRIVS)")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(count, ctypes.cast(buffer, ctypes.c_void_p))
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), "prctl(PR_SET_SECCOMP)")
