"""The launch helper: one small, single-threaded Python process per agent that forks every container's init.

Why a separate process rather than forking the agent itself:
- the agent is multi-threaded (watcher, asyncio executors) and large; forking it is slower and each
  child would copy-on-write pages of a big heap. This helper imports only the standard library, so a
  forked init stays well under 1 MB of unique memory;
- it can clone(2) with namespace flags directly, so the init is PID 1 of a new pid namespace without
  a double fork.

Protocol (SOCK_SEQPACKET, one JSON message per request): the agent sends
`{"op": "launch", "spec": {...}, "clone_flags": N}` and gets `{"pid": P}` (or `{"error": "..."}`)
with two file descriptors attached: a pidfd of the init and the write end of its go-ahead pipe.
The init blocks until the agent writes one byte there (after isolate) or closes it (abort).

Children are reaped by the kernel (SIGCHLD ignored): the agent learns of exits through the pidfd and
the exit status through the checkpoint the init writes. When the agent goes away (EOF on the socket)
the helper exits and the inits are re-parented; containers outlive the agent.

What an init holds of the host is kept to the container's own `status` file: the helper opens it
(created empty, 0600) and passes that one file, never a directory, so that no path through
/proc/1/fd leads out of the container. The helper runs with an empty environment (the agent's may
hold credentials, and an init's /proc/<pid>/environ is the helper's), and keeps `pid1` (the static
program each init becomes once its command runs, see pid1.c) in a sealed memfd: what a container's
/proc/1/exe leads to can be neither written nor swapped (runc's cloned-binary defence against
CVE-2019-5736).
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import json
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from reconciler.launcher import init

if TYPE_CHECKING:
    from reconciler.launch_spec import InitSpec

# clone(2)'s number where its arguments are (flags, stack, parent_tid, ...), as below; it was x86_64's
# alone (s390x swaps flags and stack: not supported).
_SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220, "loongarch64": 220, "ppc64le": 120, "ppc64": 120}
CLONE_PIDFD = 0x00001000
MAX_MESSAGE = 1 << 20

_pydll = ctypes.PyDLL(None, use_errno=True)  # PyDLL keeps the GIL across the call: needed around fork
_pydll.syscall.restype = ctypes.c_long


def clone(flags: int) -> tuple[int, int]:
    """fork(2) with namespace flags: returns (pid, pidfd) in the parent and (0, -1) in the child.

    Done as os.fork does it (PyOS_BeforeFork / AfterFork hooks) but through the raw syscall, so the
    child can start in new namespaces and the parent gets a pidfd atomically (CLONE_PIDFD).
    """
    number = _SYS_CLONE.get(os.uname().machine)
    if number is None:
        raise OSError(38, f"clone: no system call number known for {os.uname().machine}")   # ENOSYS
    pidfd = ctypes.c_int(-1)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _pydll.syscall(ctypes.c_long(number), ctypes.c_ulong(flags | CLONE_PIDFD | signal.SIGCHLD),
                         ctypes.c_void_p(0), ctypes.byref(pidfd), ctypes.c_void_p(0), ctypes.c_ulong(0))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0, -1
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid, pidfd.value


def sealed_copy(path: str) -> int:
    """A memfd holding the file at `path`, sealed against every change (F_SEAL_WRITE, SHRINK, GROW, SEAL).

    Exec'ing it gives each init an executable that no process, root in a container included, can
    rewrite through /proc/<pid>/exe, and that a later `pip install` cannot change under running inits.
    """
    fd = os.memfd_create("reconciler-init", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with open(path, "rb") as f:
            data = f.read()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_status(checkpoint_dir: str) -> int:
    """The container's `status` file, created empty for the init to write its command's end into.

    A file, not its directory: through /proc/1/fd a container could walk a directory fd up to the host's /.
    """
    return os.open(os.path.join(checkpoint_dir, init.STATUS_FILE),
                   os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def launch(sock: socket.socket, request: dict, pid1_fd: int) -> None:
    spec: InitSpec = request["spec"]
    try:
        status_fd = open_status(spec["checkpoint_dir"])
    except OSError as exc:
        sock.send(json.dumps({"error": f"cannot create the container's status file: {exc}"}).encode())
        return
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid, pidfd = clone(int(request.get("clone_flags", 0)))
    except OSError as exc:
        for fd in (go_r, go_w, status_fd):
            os.close(fd)
        sock.send(json.dumps({"error": str(exc)}).encode())
        return
    if pid == 0:
        # The init: drop everything of the helper's but what it needs. Its own stdio must not be the
        # agent's (a caller reading the agent's output would otherwise wait for every container).
        sock.close()
        os.close(go_w)
        null = os.open("/dev/null", os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        if null > 2:
            os.close(null)
        os.setsid()
        keep = sorted({go_r, status_fd, pid1_fd})
        low = 3
        for fd in keep:
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 65536)
        init.child_main(spec, go_r, status_fd, pid1_fd)
    os.close(go_r)
    os.close(status_fd)
    try:
        socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [pidfd, go_w])
    finally:
        os.close(pidfd)
        os.close(go_w)


def serve(fd: int, pid1_path: str) -> None:
    sock = socket.socket(fileno=fd)
    pid1_fd = sealed_copy(pid1_path)
    # Every object the helper holds is moved out of the collector's reach and collection is off:
    # a collection in a forked init would write to each object's header and copy its page.
    init.warm_up()
    gc.collect()
    gc.freeze()
    gc.disable()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps inits: exits reach the agent by pidfd
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a ^C at the agent's terminal must not reach here
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the agent stops us by closing the socket
    try:
        while True:
            data = sock.recv(MAX_MESSAGE)
            if not data:
                return
            request = json.loads(data)
            if request.get("op") == "launch":
                launch(sock, request, pid1_fd)
            elif request.get("op") == "ping":
                sock.send(b'{"pong": true}')
    except ConnectionError:
        # The agent was killed (ECONNRESET, EPIPE): no one to answer. An init forked for it sees its
        # go-ahead pipe close and ends, saying its command never started; the others run on.
        return


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
