"""The linux launcher: clones the namespaces isolators ask for and keeps every container in a cgroup.

As Mesos's LinuxLauncher, each container gets `<hierarchy>/<cgroups_root>/<id>` in the freezer
hierarchy (cgroup v1) or the unified hierarchy (v2), entered before the init may run anything.
Destroy kills the pid namespace's init when there is one (the kernel then ends the rest) and the
whole cgroup otherwise (freezer or cgroup.kill), so nothing that forked or daemonised survives.
Recovery lists `<cgroups_root>`: a cgroup no checkpoint owns is an orphan.

In every other hierarchy the init starts in `<hierarchy>/<cgroups_root>`, where the launch helper
that forks it was placed once (the cgroups isolators then move it on to its own cgroup in theirs), so
no container process stays in the agent's own cgroups: a container runtime that clears the agent's
pod on a rolling update, or systemd stopping the agent's unit, then cannot kill containers (Mesos
moves its executors out of the agent's systemd unit into mesos_executors.slice for the same reason).
"""

from __future__ import annotations

import logging
import signal

from reconciler.launch_spec import InitSpec
from reconciler.launcher.base import Forked, Launcher, LaunchHelper, signal_pid, wait_gone
from reconciler.linux import cgroups, proc

log = logging.getLogger(__name__)


def _offers_controllers(hierarchy: cgroups.Hierarchy) -> bool:
    """Whether a v2 hierarchy offers a controller the cgroups isolators may enable below <cgroups_root>."""
    try:
        return bool(set(hierarchy.read("", "cgroup.controllers").split()) & {"cpu", "memory", "cpuset", "io", "pids"})
    except OSError:
        return False


class LinuxLauncher(Launcher):
    name = "linux"

    def __init__(self, helper: LaunchHelper, cgroups_root: str, hierarchy: cgroups.Hierarchy) -> None:
        super().__init__(helper)
        self.cgroups_root = cgroups_root.strip("/")
        self.hierarchy = hierarchy
        self.hierarchy.create(self.cgroups_root)
        self.others = self._leave_agent_cgroups_in()
        # The launch helper, which forks every init, sits in `<cgroups_root>` of those hierarchies: each
        # init inherits that at fork, without a cgroup.procs write per launch (each costs ~1 ms).
        helper.on_start = self._place_helper
        if helper.pid is not None:
            self._place_helper(helper.pid)

    def cgroup(self, container_id: str) -> str:
        return f"{self.cgroups_root}/{container_id}"

    def fork(self, container_id: str, spec: InitSpec, clone_flags: int) -> Forked:
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

    def _place_helper(self, pid: int) -> None:
        for other in self.others:
            try:
                other.attach(self.cgroups_root, pid)
            except OSError as exc:
                log.warning("containers stay in the agent's cgroup of %s: moving the launch helper (pid %d) to %s "
                            "failed: %s", other.mountpoint, pid, self.cgroups_root, exc)

    def _leave_agent_cgroups_in(self) -> list[cgroups.Hierarchy]:
        """The other mounted hierarchies, each with its `<cgroups_root>` made (not the named ones
        the kernel shows but nothing mounts: nobody can kill through those)."""
        mounts = cgroups.find_mounts()
        hierarchies = list(mounts.v1_hierarchies) + ([mounts.v2] if mounts.v2 else [])
        others = []
        for hierarchy in hierarchies:
            if hierarchy.mountpoint == self.hierarchy.mountpoint or hierarchy.root != "/":
                continue
            if hierarchy.version == 2 and _offers_controllers(hierarchy):
                # A v2 hierarchy beside a v1 freezer (a hybrid host with cpu or memory moved to v2): the
                # helper in <cgroups_root> would be an internal process there, and cgroups v2 then
                # refuses to enable controllers for the containers below it.
                log.info("containers start in the agent's cgroup of %s (a cgroup v2 hierarchy with controllers)",
                         hierarchy.mountpoint)
                continue
            try:
                hierarchy.create(self.cgroups_root)
            except OSError as exc:
                log.warning("cannot create %s in %s: containers stay in the agent's cgroup there: %s",
                            self.cgroups_root, hierarchy.mountpoint, exc)
                continue
            others.append(hierarchy)
        return others

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
