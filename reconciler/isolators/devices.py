"""linux/devices (Mesos's name; the rules are runc's default allowlist): which device nodes a container
may open.

Part of the default security profile: always on with the linux launcher, whatever `--isolation`
names (Mesos's cgroups/devices allows every device unless told). A container may make any node
(mknod) but open only runc's defaults (null, zero, full, random, urandom, tty, pts, ptmx, net/tun),
so that root in a container cannot make a node of the host's disk and read it. A privileged
container (`linux_info.privileged`, which --allow_privileged lets a manifest ask for) gets no rules.

Where:
- the v1 devices controller when it is mounted: `<devices>/<cgroups_root>/<id>`, its list written at
  prepare, before the init exists; isolate moves the init in (it starts in `<cgroups_root>`, where the
  launch helper sits, and runs nothing of the container's before isolate is done);
- otherwise cgroup v2: a BPF device program attached at prepare to `<cgroups_root>/<id>` of the
  unified hierarchy (on a cgroup v2 host, the cgroup the launcher puts the init in). It needs no
  controller, so it also works on a hybrid host's empty /sys/fs/cgroup/unified. The kernel drops the
  program with the cgroup.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from reconciler.container import ContainerConfig, ContainerState
from reconciler.isolators.base import Isolator, IsolatorSetupError, LaunchInfo
from reconciler.linux import cgroups, devices

if TYPE_CHECKING:
    from reconciler.config import AgentConfig

log = logging.getLogger(__name__)

# What the status's security.devices says.
DEFAULT, UNRESTRICTED = "default", "unrestricted"


class LinuxDevicesIsolator(Isolator):
    def __init__(self, config: "AgentConfig", mounts: cgroups.CgroupMounts | None = None) -> None:
        super().__init__(config)
        mounts = mounts if mounts is not None else cgroups.find_mounts()
        hierarchy = mounts.v1.get("devices") or mounts.v2
        if hierarchy is None:
            raise IsolatorSetupError("flag --isolation: linux/devices needs the cgroup v1 devices controller or a "
                                     "cgroup v2 hierarchy mounted, and neither is")
        if hierarchy.version == 2:
            self._check_bpf(hierarchy)
        self.hierarchy: cgroups.Hierarchy = hierarchy
        self.root = config.cgroups_root.strip("/")
        self._modes: dict[str, str] = {}

    @staticmethod
    def _check_bpf(hierarchy: cgroups.Hierarchy) -> None:
        """Device programs need Linux 4.15 and a kernel built with CONFIG_CGROUP_BPF: say so at start,
        not at each launch."""
        try:
            fd = devices.load_device_program(devices.DEFAULT_RULES)
        except OSError as exc:
            raise IsolatorSetupError(
                f"flag --isolation: linux/devices on cgroup v2 ({hierarchy.mountpoint}) needs BPF device programs "
                f"(Linux 4.15, CONFIG_CGROUP_BPF), and {exc.strerror}") from None
        os.close(fd)

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
            # On a cgroup v2 host the launcher has put it there already: the write is then a no-op.
            self.hierarchy.attach(self.cgroup(container_id), pid)

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        """What the kernel enforces for each live container; unknown orphan cgroups killed and removed.

        Known orphans are the containerizer's: it kills them through the launcher, then calls cleanup.
        """
        live = {state.config.container_id for state in states}
        for state in states:
            container_id = state.config.container_id
            restricted = self._restricted(container_id)
            self._modes[container_id] = DEFAULT if restricted else UNRESTRICTED
            if not restricted and not state.config.privileged:
                log.warning("Container %s runs without device rules (it was launched without linux/devices); "
                            "its next launch gets them", container_id)
        cgroups.remove_children_except(self.hierarchy, self.root, live | orphans)

    def _restricted(self, container_id: str) -> bool:
        path = self.hierarchy.path(self.cgroup(container_id))
        try:
            if self.hierarchy.version == 1:
                return devices.V1_UNRESTRICTED not in devices.read_v1_rules(path)
            return bool(devices.device_program_ids(path))
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("Cannot tell which devices container %s may use: %s", container_id, exc)
            return False

    def status(self, container_id: str) -> dict[str, Any]:
        mode = self._modes.get(container_id)
        return {"security": {"devices": mode}} if mode is not None else {}

    def cleanup(self, container_id: str) -> None:
        self._modes.pop(container_id, None)
        cgroup = self.cgroup(container_id)
        if self.hierarchy.exists(cgroup):
            self.hierarchy.remove(cgroup)
