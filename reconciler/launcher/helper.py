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
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import socket
import sys

from reconciler.launcher import init

SYS_CLONE = 56  # x86_64
CLONE_PIDFD = 0x00001000
MAX_MESSAGE = 1 << 20

_pydll = ctypes.PyDLL(None, use_errno=True)  # PyDLL keeps the GIL across the call: needed around fork
_pydll.syscall.restype = ctypes.c_long


def clone(flags: int) -> tuple[int, int]:
    """fork(2) with namespace flags: returns (pid, pidfd) in the parent and (0, -1) in the child.

    Done as os.fork does it (PyOS_BeforeFork / AfterFork hooks) but through the raw syscall, so the
    child can start in new namespaces and the parent gets a pidfd atomically (CLONE_PIDFD).
    """
    pidfd = ctypes.c_int(-1)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _pydll.syscall(ctypes.c_long(SYS_CLONE), ctypes.c_ulong(flags | CLONE_PIDFD | signal.SIGCHLD),
                         ctypes.c_void_p(0), ctypes.byref(pidfd), ctypes.c_void_p(0), ctypes.c_ulong(0))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0, -1
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid, pidfd.value


def launch(sock: socket.socket, request: dict) -> None:
    spec = request["spec"]
    try:
        checkpoint_fd = os.open(spec["checkpoint_dir"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        sock.send(json.dumps({"error": f"cannot open the checkpoint directory: {exc}"}).encode())
        return
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid, pidfd = clone(int(request.get("clone_flags", 0)))
    except OSError as exc:
        os.close(go_r), os.close(go_w), os.close(checkpoint_fd)
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
        keep = sorted({go_r, checkpoint_fd})
        low = 3
        for fd in keep:
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 65536)
        os.set_inheritable(go_r, False)
        init.child_main(spec, go_r, checkpoint_fd)
    os.close(go_r)
    os.close(checkpoint_fd)
    try:
        socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [pidfd, go_w])
    finally:
        os.close(pidfd)
        os.close(go_w)


def serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    # Every object the helper holds is moved out of the collector's reach and collection is off:
    # a collection in a forked init would write to each object's header and copy its page.
    init.warm_up()
    gc.collect()
    gc.freeze()
    gc.disable()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps inits: exits reach the agent by pidfd
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a ^C at the agent's terminal must not reach here
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the agent stops us by closing the socket
    while True:
        data = sock.recv(MAX_MESSAGE)
        if not data:
            return
        request = json.loads(data)
        if request.get("op") == "launch":
            launch(sock, request)
        elif request.get("op") == "ping":
            sock.send(b'{"pong": true}')


if __name__ == "__main__":
    serve(int(sys.argv[1]))
