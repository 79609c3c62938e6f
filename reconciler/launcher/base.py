"""What every launcher shares: the client of the launch helper, and the Launcher protocol (Mesos launcher.hpp)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from reconciler.launch_spec import InitSpec
from reconciler.linux import proc


@dataclass
class Forked:
    """A container init that exists but waits for its go-ahead."""
    pid: int
    start_time: int
    pidfd: int
    go_fd: int

    def go(self) -> None:
        """Let the init run the command (Mesos: exec() writes to the pipe)."""
        try:
            os.write(self.go_fd, b"\x01")
        finally:
            self.close_go()

    def close_go(self) -> None:
        if self.go_fd >= 0:
            os.close(self.go_fd)
            self.go_fd = -1


# The static program every init becomes once its command runs (pid1.c), built when the package is installed.
PID1_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pid1")
_HELPER_MAIN = ("import sys; sys.path.insert(0, sys.argv[1]); from reconciler.launcher.helper import serve; "
                "serve(int(sys.argv[2]), sys.argv[3])")


def missing_pid1() -> None:
    """Raises FileNotFoundError, saying how to build it, when the container init program was not built."""
    if not os.access(PID1_PATH, os.X_OK):
        raise FileNotFoundError(
            f"the container init {PID1_PATH} is missing: it is built when reconciler is installed; install a C "
            "compiler and static libc (Debian: gcc libc6-dev), then reinstall (pip install -e . or pip install .)")


class LaunchHelper:
    """Client of `reconciler.launcher.helper`, started once per agent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        # Called with the helper's pid each time it (re)starts: the linux launcher places it in cgroups
        # every container then inherits (see LinuxLauncher), which costs no write per launch.
        self.on_start: Callable[[int], None] | None = None

    @property
    def pid(self) -> int | None:
        """The running helper's pid, if it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        with self._lock:
            if self._sock is None:
                self._start()

    def _start(self) -> None:
        missing_pid1()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # An empty environment, and -I so that no PYTHON* variable or user site can change what runs: each
        # init is a fork of this process, and its /proc/<pid>/environ is what the helper was given.
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _HELPER_MAIN, package_root, str(theirs.fileno()), PID1_PATH],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env={}, cwd="/",
            start_new_session=True,  # a ^C or SIGTERM to the agent's process group must not reach containers
        )
        theirs.close()
        self._sock = ours
        if self.on_start is not None:
            self.on_start(self._proc.pid)

    def fork(self, spec: InitSpec, clone_flags: int) -> Forked:
        with self._lock:
            if self._sock is None or (self._proc is not None and self._proc.poll() is not None):
                self._start()
            assert self._sock is not None
            self._sock.send(json.dumps({"op": "launch", "spec": spec, "clone_flags": clone_flags}).encode())
            data, fds, _flags, _addr = socket.recv_fds(self._sock, 65536, 2)
            if not data:
                self._sock.close()
                self._sock = None
                raise OSError("Failed to fork: the launch helper exited")
        reply = json.loads(data)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise OSError(f"Failed to fork: {reply['error']}")
        pid = int(reply["pid"])
        pidfd, go_fd = fds
        start_time = proc.start_time_ticks(pid)
        if start_time is None:
            os.close(pidfd)
            os.close(go_fd)
            raise OSError(f"Failed to fork: the container's init (pid {pid}) vanished before it started")
        return Forked(pid=pid, start_time=start_time, pidfd=pidfd, go_fd=go_fd)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None


def signal_pid(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def wait_gone(identity: proc.ProcessIdentity, timeout: float) -> bool:
    """Poll until the process is gone (or replaced by another with the same pid)."""
    deadline = time.monotonic() + timeout
    while identity.is_alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


class Launcher(ABC):
    """Mesos's launcher: forks a container's init and kills all of a container's processes."""

    name: str

    def __init__(self, helper: LaunchHelper) -> None:
        self.helper = helper

    @abstractmethod
    def fork(self, container_id: str, spec: InitSpec, clone_flags: int) -> Forked:
        """Fork the init; on return it is in every cgroup the launcher manages, and blocked."""

    @abstractmethod
    def destroy(self, container_id: str, identity: proc.ProcessIdentity | None, pid_namespace: bool) -> None:
        """Kill every process of the container (SIGKILL), wait until they are gone, free launcher state."""

    @abstractmethod
    def recover(self, known: set[str]) -> set[str]:
        """Container ids the launcher finds that are not in `known`: orphans to destroy."""

    def belongs(self, container_id: str, pid: int) -> bool:
        """Whether a live pid is the container's init (recovery checks more than pid reuse)."""
        return True

    def terminate(self, identity: proc.ProcessIdentity, sig: int = signal.SIGTERM) -> None:
        """Graceful stop: the init forwards it to the command."""
        if identity.is_alive():
            signal_pid(identity.pid, sig)
