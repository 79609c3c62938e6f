"""filesystem/shared (Mesos isolators/filesystem/shared.cpp): the host's filesystem, with volumes bound in.

Every container gets its own mount namespace whose tree is made private first, so nothing the
container mounts (its volumes included) propagates to the host or to other containers, and
nothing is left to unmount: the mounts go away with the namespace. Mesos creates the namespace
only when the container has a ContainerInfo; we always do, so that a container's own mounts never
reach the host. The volumes' rules are in reconciler/isolators/volumes.py (filesystem/linux binds
them the same way for a container without an image).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reconciler.isolators.base import Isolator, LaunchInfo
from reconciler.isolators.volumes import check_mount_namespaces, shared_filesystem

if TYPE_CHECKING:
    from reconciler.config import AgentConfig
    from reconciler.container import ContainerConfig


class SharedFilesystemIsolator(Isolator):
    def __init__(self, config: AgentConfig) -> None:
        super().__init__(config)
        check_mount_namespaces("filesystem/shared")

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        return shared_filesystem(config)
