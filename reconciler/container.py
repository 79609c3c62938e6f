"""A container as the containerizer launches it and its checkpoint records it: what it is launched from
(ContainerConfig, with its image once provisioned) and what recovery knows of a live one (ContainerState).

Plain dataclasses, shared by the containerizer, the checkpoints and the isolators (whose protocol,
isolators/base.py, takes them), so that none of these has to import another to name a container.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reconciler.models import ContainerSpec

# In the sandbox: the overlay's upper (writable) and work directories and its mount point, so what a
# container writes to its root filesystem is sandbox usage (disk/du) and goes with the sandbox.
ROOTFS_DIR = ".rootfs"
# Where a container with its own root filesystem finds its sandbox (Mesos: flags.sandbox_directory).
CONTAINER_SANDBOX = "/mnt/mesos/sandbox"


@dataclass
class ProvisionedImage:
    """A container's image once the provisioner has it (Mesos ProvisionInfo): the reference asked for,
    the resolved image id, the stored layer directories (lowest first) and the image's runtime config,
    the "config" object of a Docker/OCI image config (Entrypoint, Cmd, Env, WorkingDir, User)."""
    reference: str
    id: str
    layers: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ContainerConfig:
    """What a container is launched from; checkpointed as `config` before any isolator prepares."""
    container_id: str
    name: str
    manifest: str
    spec: ContainerSpec
    spec_hash: str
    resources_free_hash: str
    sandbox: str
    restarts: int = 0
    backoff_step: int = 0
    created_at: float = 0.0
    image: ProvisionedImage | None = None     # set by the provisioner before isolators prepare

    @property
    def rootfs(self) -> str | None:
        """Where the container's root filesystem is mounted (in its own mount namespace) when it has an
        image: `<sandbox>/.rootfs`, over its own `upper` and `work` directories (the overlay keeps them)."""
        return os.path.join(self.sandbox, ROOTFS_DIR) if self.image is not None else None

    @property
    def privileged(self) -> bool:
        """`linux_info.privileged`: the default security profile does not apply (--allow_privileged)."""
        container = self.spec.container
        return bool(container is not None and container.linux_info is not None and container.linux_info.privileged)

    def in_rootfs(self, path: str) -> str:
        """`path` as the init sees it before it enters the rootfs (the path itself without a rootfs)."""
        rootfs = self.rootfs
        return path if rootfs is None else os.path.join(rootfs, path.lstrip("/"))


@dataclass
class ContainerState:
    """Mesos ContainerState: what an isolator is told of a live container at recovery."""
    config: ContainerConfig
    pid: int | None
