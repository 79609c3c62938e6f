"""Load a compiled seccomp filter into the calling thread: what a container's command does last before exec.

Standard library only: it runs in the command's process, a fork of the launch helper, which imports
neither pydantic nor libseccomp. The program is the raw array of `struct sock_filter` (8 bytes each,
host byte order) that reconciler.linux.seccomp compiled in the agent.

The kernel loads a filter only for a thread that has no_new_privs set or holds CAP_SYS_ADMIN (in its
user namespace) at that moment, so that a setuid program cannot be run under a filter that fools
it: a command that keeps root's CAP_SYS_ADMIN until then may load it without no_new_privs; any other
must ask for no_new_privs, which then lasts across exec. The filter applies to the calling thread
only (the command's process is single-threaded) and to everything it execs and forks; it cannot be
removed.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_INSTRUCTION_SIZE = 8
BPF_MAXINSNS = 4096


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# Resolved here, in the helper, not in each forked command: the first lookup costs more than the load.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl_fn = _libc.prctl
_prctl_fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl_fn.restype = ctypes.c_int


def _prctl(option: int, arg2: int, arg3: int, what: str) -> None:
    if _prctl_fn(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def install(program: bytes, no_new_privs: bool) -> None:
    """Load `program` for this thread (and what it execs); OSError names the call that failed (EACCES
    from prctl(PR_SET_SECCOMP): neither no_new_privs nor CAP_SYS_ADMIN)."""
    count, rest = divmod(len(program), BPF_INSTRUCTION_SIZE)
    if rest or not 0 < count <= BPF_MAXINSNS:
        raise ValueError(f"a seccomp program is 1 to {BPF_MAXINSNS} instructions of {BPF_INSTRUCTION_SIZE} bytes, "
                         f"not {len(program)} bytes")
    if no_new_privs:
        _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, "prctl(PR_SET_NO_NEW_PRIVS)")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(count, ctypes.addressof(buffer))
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), "prctl(PR_SET_SECCOMP)")
