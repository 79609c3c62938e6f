"""namespaces/pid and namespaces/ipc (Mesos isolators/namespaces/{pid,ipc}.cpp).

The init is cloned into the namespaces; the mounts they need (a private mount tree, a fresh /proc,
a private /dev/shm) are applied by the init before the command starts, so nothing is mounted on the
host and nothing a container mounts propagates back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reconciler.container import ContainerConfig, ContainerState
from reconciler.isolators.base import PRIVATE_ROOT, Isolator, LaunchInfo, PermanentError
from reconciler.isolators.masks import masking_mounts
from reconciler.launch_spec import MountStep
from reconciler.linux.syscalls import CLONE_NEWIPC, CLONE_NEWNS, CLONE_NEWPID, MS_NODEV, MS_NOEXEC, MS_NOSUID

if TYPE_CHECKING:
    from reconciler.config import AgentConfig



class PidNamespaceIsolator(Isolator):
    """A container without an image gets a /proc of its own here, with runc's masked and read-only paths
    (reconciler/isolators/masks.py); filesystem/linux does the same in an image's root filesystem."""

    def __init__(self, config: "AgentConfig") -> None:
        super().__init__(config)
        self._masked: dict[str, dict[str, list[str]]] = {}

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        for state in states:
            if self._masks(state.config):
                self._masked[state.config.container_id] = masking_mounts(str)[1]

    def status(self, container_id: str) -> dict[str, Any]:
        masked = self._masked.get(container_id)
        return {"security": dict(masked)} if masked is not None else {}

    def cleanup(self, container_id: str) -> None:
        self._masked.pop(container_id, None)

    @staticmethod
    def _masks(config: ContainerConfig) -> bool:
        linux_info = config.spec.container.linux_info if config.spec.container else None
        shares = linux_info is not None and bool(linux_info.share_pid_namespace)
        return not shares and config.rootfs is None and not config.privileged

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        linux_info = config.spec.container.linux_info if config.spec.container else None
        if linux_info is not None and linux_info.share_pid_namespace:
            if self.config.disallow_sharing_agent_pid_namespace:
                raise PermanentError("Sharing agent pid namespace with containers is disallowed")
            return None
        if config.rootfs is not None:
            # filesystem/linux mounts the rootfs's /proc itself, with its kernel knobs read-only: another
            # proc mounted over it would undo that.
            return LaunchInfo(clone_namespaces=CLONE_NEWPID | CLONE_NEWNS)
        mounts: list[MountStep] = [PRIVATE_ROOT, {"source": "proc", "target": "/proc", "fstype": "proc",
                                                  "flags": MS_NOSUID | MS_NODEV | MS_NOEXEC, "data": None}]
        if self._masks(config):
            masks, self._masked[container_id] = masking_mounts(str)
            mounts += masks
        return LaunchInfo(clone_namespaces=CLONE_NEWPID | CLONE_NEWNS, mounts=mounts)


class IpcNamespaceIsolator(Isolator):
    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        linux_info = config.spec.container.linux_info if config.spec.container else None
        mode = linux_info.ipc_mode if linux_info is not None else None
        if mode == "SHARE_PARENT":
            if linux_info is not None and linux_info.shm_size is not None:
                raise PermanentError("Only support specifying the size of /dev/shm when the IPC mode is `PRIVATE`")
            return None
        info = LaunchInfo(clone_namespaces=CLONE_NEWIPC)
        if mode == "PRIVATE":
            size = f",size={linux_info.shm_size}m" if linux_info is not None and linux_info.shm_size else ""
            info.clone_namespaces |= CLONE_NEWNS
            info.mounts = [PRIVATE_ROOT, {"source": "tmpfs", "target": config.in_rootfs("/dev/shm"), "fstype": "tmpfs",
                                          "mkdir": config.rootfs is not None,
                                          "flags": MS_NOSUID | MS_NODEV, "data": f"mode=1777{size}"}]
        return info
