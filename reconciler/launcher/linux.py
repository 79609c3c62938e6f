"""The linux launcher: clones the namespaces isolators ask for and keeps every container in a cgroup.

As Mesos's LinuxLauncher, each container gets `<hierarchy>/<cgroups_root>/<id>` in the freezer
hierarchy (cgroup v1) or the unified hierarchy (v2), entered before the init may run anything.
Destroy kills the pid namespace's init when there is one (the kernel then ends the rest) and the
whole cgroup otherwise (freezer or cgroup.kill), so nothing that forked or daemonised survives.
Recovery lists `<cgroups_root>`: a cgroup no checkpoint owns is an orphan.
"""

from __future__ import annotations

import signal

from reconciler.launcher.base import Forked, LaunchHelper, Launcher, signal_pid, wait_gone
from reconciler.linux import cgroups, proc


class LinuxLauncher(Launcher):
    name = "linux"

    def __init__(self, helper: LaunchHelper, cgroups_root: str, hierarchy: cgroups.Hierarchy) -> None:
        super().__init__(helper)
        self.cgroups_root = cgroups_root.strip("/")
        self.hierarchy = hierarchy
        self.hierarchy.create(self.cgroups_root)

    def cgroup(self, container_id: str) -> str:
        return f"{self.cgroups_root}/{container_id}"

    def fork(self, container_id: str, spec: dict, clone_flags: int) -> Forked:
        cgroup = self.cgroup(container_id)
        self.hierarchy.create(cgroup)
        forked = self.helper.fork(spec, clone_flags)
        try:
            self.hierarchy.attach(cgroup, forked.pid)
        except BaseException:
            signal_pid(forked.pid, signal.SIGKILL)
            forked.close_go()
            raise
        return forked

    def destroy(self, container_id: str, identity: proc.ProcessIdentity | None, pid_namespace: bool) -> None:
        cgroup = self.cgroup(container_id)
        if pid_namespace and identity is not None and identity.is_alive():
            signal_pid(identity.pid, signal.SIGKILL)
            wait_gone(identity, 5.0)
        if self.hierarchy.exists(cgroup):
            # Also when the pid namespace's init is gone: a process could have been moved in by hand.
            self.hierarchy.kill(cgroup)
            self.hierarchy.remove(cgroup)

    def recover(self, known: set[str]) -> set[str]:
        return {c for c in self.hierarchy.children(self.cgroups_root) if c not in known}

    def belongs(self, container_id: str, pid: int) -> bool:
        expected = "/" + self.cgroup(container_id)
        for controllers, path in proc.cgroup_paths(pid).items():
            if self._is_our_hierarchy(controllers) and path.rstrip("/").endswith(expected):
                return True
        return False

    def _is_our_hierarchy(self, controllers: str) -> bool:
        if self.hierarchy.version == 2:
            return controllers == ""
        return set(controllers.split(",")) == set(self.hierarchy.controllers)
