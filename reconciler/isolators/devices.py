"""linux/devices (Mesos's isolators/linux/devices.cpp, with runc's default allowlist): which device nodes a
container may open.

Part of the default security profile: always on with the linux launcher, whatever `--isolation`
names (Mesos's cgroups/devices allows every device unless told). Every container may make any node
(mknod) but open only runc's defaults (null, zero, full, random, urandom, tty, console, ptmx, pts),
so that a root container cannot make a node of the host's disk and read it. A privileged container
(`linux_info.privileged`, with `--allow_privileged`) gets no restriction.

Where: the v1 devices controller when it is mounted (`<devices>/<cgroups_root>/<id>`, its list
written before the init may run anything); otherwise cgroup v2, through a BPF device program
attached to the container's cgroup `<cgroups_root>/<id>` there (the launcher's own cgroup on a
cgroup v2 host). The kernel drops the program with the cgroup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reconciler.isolators.base import ContainerConfig, ContainerState, Isolator, IsolatorSetupError, LaunchInfo
from reconciler.linux import cgroups, devices

if TYPE_CHECKING:
    from reconciler.config import AgentConfig

DEFAULT, UNRESTRICTED = "default", "unrestricted"


class LinuxDevicesIsolator(Isolator):
    def __init__(self, config: "AgentConfig", mounts: cgroups.CgroupMounts | None = None) -> None:
        super().__init__(config)
        mounts = mounts if mounts is not None else cgroups.find_mounts()
        hierarchy = mounts.v1.get("devices") or mounts.v2
        if hierarchy is None:
            raise IsolatorSetupError("flag --isolation: linux/devices needs the cgroup v1 devices controller or a "
                                     "cgroup v2 hierarchy mounted, and neither is")
        self.hierarchy: cgroups.Hierarchy = hierarchy
        self.root = config.cgroups_root.strip("/")
        self._modes: dict[str, str] = {}

    def cgroup(self, container_id: str) -> str:
        return f"{self.root}/{container_id}"

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        if config.privileged:
            self._modes[container_id] = UNRESTRICTED
            return None
        cgroup = self.cgroup(container_id)
        self.hierarchy.create(cgroup)
        if self.hierarchy.version == 1:
            devices.write_v1_rules(self.hierarchy.path(cgroup), devices.DEFAULT_RULES)
        else:
            devices.restrict_v2(self.hierarchy.path(cgroup), devices.DEFAULT_RULES)
        self._modes[container_id] = DEFAULT
        return None

    def isolate(self, container_id: str, pid: int) -> None:
        if self._modes.get(container_id) == DEFAULT:
            # On a cgroup v2 host this is the launcher's own cgroup, which the init is in already.
            self.hierarchy.attach(self.cgroup(container_id), pid)

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        for state in states:
            self._modes[state.config.container_id] = UNRESTRICTED if state.config.privileged else DEFAULT
        for orphan in orphans:
            self.cleanup(orphan)

    def status(self, container_id: str) -> dict[str, Any]:
        mode = self._modes.get(container_id)
        return {"security": {"devices": mode}} if mode is not None else {}

    def cleanup(self, container_id: str) -> None:
        self._modes.pop(container_id, None)
        if self.hierarchy.exists(self.cgroup(container_id)):
            self.hierarchy.remove(self.cgroup(container_id))
