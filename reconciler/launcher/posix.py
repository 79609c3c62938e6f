"""The posix launcher: plain fork/exec in a session of its own, no isolation (Mesos's PosixLauncher).

Killing walks the container's session and process tree (Mesos killtree with groups and sessions),
which is the best that can be done without cgroups: a process that starts its own session and is
re-parented away from the init escapes it, as it does in Mesos.
"""

from __future__ import annotations

import os
import signal
import time

from reconciler.launch_spec import InitSpec
from reconciler.launcher.base import Forked, Launcher, signal_pid
from reconciler.linux import proc


class PosixLauncher(Launcher):
    name = "posix"

    def fork(self, container_id: str, spec: InitSpec, clone_flags: int) -> Forked:
        if clone_flags:
            raise ValueError("the posix launcher cannot create namespaces; use --launcher=linux")
        return self.helper.fork(spec, 0)

    def destroy(self, container_id: str, identity: proc.ProcessIdentity | None, pid_namespace: bool) -> None:
        if identity is None:
            return
        deadline = time.monotonic() + 10.0
        while True:
            members = self._members(identity)
            if not members:
                return
            for pid in members:
                signal_pid(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Failed to kill all processes in the container: {sorted(members)} still alive")
            time.sleep(0.005)

    def _members(self, identity: proc.ProcessIdentity) -> set[int]:
        """The init (if it is still that process), its session, and its descendants."""
        table = proc.process_table()
        if identity.pid in table and proc.start_time_ticks(identity.pid) != identity.start_time:
            return set()   # the pid was reused: that process and its session are someone else's
        members: set[int] = set()
        if identity.is_alive():
            members.add(identity.pid)
            members |= proc.descendants(table, identity.pid)
        members |= {pid for pid, entry in table.items() if entry.session == identity.pid}
        # A zombie is already dead: only its parent can make it go, and it may be the host's init.
        members = {pid for pid in members if pid in table and table[pid].state not in ("Z", "X")}
        members.discard(os.getpid())
        return members

    def recover(self, known: set[str]) -> set[str]:
        return set()
